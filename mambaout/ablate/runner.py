"""`run_ablation`: the same network trained with each token mixer, and each combination of further settings, under
one recipe, budget and set of seeds, for classification or semantic segmentation.

The rows of an ablation are every combination of its axes: the token mixers first, then each `--grid KEY=V1,V2`
in the order given (`itertools.product`, first values first). A grid key that is a run setting (a field of the
task's config, `TrainConfig` or `SegmentConfig`: epochs, iters, base_lr, lr, drop_path, input_size, crop_size,
data, ...) overrides the recipe's; any other key is a model constructor argument (kernel_size, conv_ratio, dims,
mixer_kwargs, ...) and joins `model_kwargs` beside the mixer (for segmentation, the backbone's).

    mambaout ablate --mixers conv --grid kernel_size=3,7,11 --seeds 3
    mambaout ablate --mixers conv,conv_ssm --grid data=pathfinder:32-6,pathfinder:32-14
    mambaout ablate --task segment --mixers conv,conv_ssm --data pathfinder-seg:32-6 --metric iou:target_joined \
        --seeds 3

Every run is an ordinary training run of the one engine (`mambaout.train.prepare.prepare_run` +
`mambaout.train.runner.run_training` with the task: `mambaout train`'s classification, or `mambaout segment train`'s
segmentation) in `DIR/runs/<mixer>[-key=value...]-seed<k>/` (`DIR/runs/<mixer>-seed<k>/` without a grid), so its
checkpoints work with the task's eval / predict (and export) and `--resume auto`. A segmentation run's last
checkpoint is then evaluated as `mambaout segment eval` evaluates it, for its per-class IoU. After each run one line
goes to `DIR/results.jsonl` (with the row's `settings`) and `DIR/results.md` (each row's metric against the first
row's, paired by seed, with a 95% interval) and `DIR/ablation.png` are redrawn. The metric (`--metric`: top1 or
top5; miou, macc, aacc or iou:CLASS) belongs to the report, not to the ablation: the same runs may be reported with
another. Rerunning the same command skips the runs that have their line, resumes an unfinished one from its
`last.pth`, and refuses a DIR that holds an ablation with other settings; the mixers, the values of each grid key
and the seeds may grow between reruns (only the new runs train), the grid's keys may not change.
"""

import contextlib
import dataclasses
import difflib
import inspect
import io
import itertools
import json
import re
import shlex
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from mambaout.ablate.report import (
    CLASS_IOU,
    CLASSIFY_METRICS,
    SEGMENT_METRICS,
    plot_ablation,
    record_settings,
    results_markdown,
    row_label,
    settings_key,
)
from mambaout.bench.harness import BenchPath, load_average, measure
from mambaout.data import resolve_data
from mambaout.dense.config import SegmentConfig
from mambaout.dense.examples import ihc_ade
from mambaout.dense.inference import load_dense_model, validation_loader
from mambaout.dense.tasks import Segmentation, build_segmenter, evaluate_segmentation, read_class_names
from mambaout.errors import UserError, one_line
from mambaout.layers import TOKEN_MIXERS
from mambaout.models import model_complexity
from mambaout.models.mambaout import MambaOut
from mambaout.outputs import OUTPUT_KINDS, check_output
from mambaout.rundir import RunDir
from mambaout.train import load_classifier
from mambaout.train.checkpoint import read_checkpoint
from mambaout.train.config import RunConfig, build_config, load_config_file, load_yaml
from mambaout.train.distributed import init_distributed
from mambaout.train.engine import resolve_amp
from mambaout.train.prepare import prepare_run
from mambaout.train.runner import run_training
from mambaout.train.task import Task
from mambaout.train.trainer import Classification
from mambaout.weights.io import atomic_write

__all__ = [
    "DEFAULT_METRICS",
    "DEFAULT_MIXERS",
    "DEFAULT_RECIPES",
    "TASKS",
    "AblationSettings",
    "parse_grid",
    "run_ablation",
]

DEFAULT_MIXERS = ("conv", "conv_ssm", "causal_conv", "attention", "causal_attention")
TASKS: dict[str, type[Task]] = {"classify": Classification, "segment": Segmentation}
DEFAULT_RECIPES = {"classify": "ablate_digits", "segment": "ablate_pathfinder_seg"}
DEFAULT_METRICS = {"classify": "top1", "segment": "miou"}
# what must be the same for two runs to be compared (and for a rerun to continue an ablation); "grid" is the list
# of grid keys, absent (no grid) in the ablation.json of ablations from before the grid, "task" absent (classify)
# in those from before segmentation
_IDENTITY = ("task", "config", "model", "model_kwargs", "data", "epochs", "grid")
_LEGACY_IDENTITY = {"grid": [], "task": "classify"}
# grid keys an ablation sets in other ways
_NOT_AXES = {
    "seed": "--seeds sets the seeds",
    "output": "--output sets the ablation's folder",
    "model": "--model sets the model",
    "model_kwargs": "give each constructor argument as its own key",
}
# the files an ablation writes in its folder, and their kinds of `mambaout.outputs.check_output`
_OUTPUTS = {
    "ablation.json": "ablation-json",
    "results.jsonl": "ablation-results",
    "results.md": "ablation-md",
    "ablation.png": "png",
}
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-3: YAML 1.1 reads a float only with a dot


def parse_grid(items: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """`--grid KEY=V1,V2 ...` as {key: values}: values are YAML (`3` an int, `0.5` a float, `[16, 32]` a list),
    split on the commas outside brackets and quotes.

    Raises:
        UserError: An item without `=`, a key given twice, no value, an empty value or YAML that does not parse.
    """
    grid: dict[str, tuple[Any, ...]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--grid {one_line(repr(item), 60)}: expects KEY=V1,V2,...")
        if key in grid:
            raise UserError(f"--grid {key}: given twice; give all its values once, comma-separated")
        if not text.strip():
            raise UserError(f"--grid {key}: give at least one value, e.g. {key}=V1,V2")
        grid[key] = tuple(_grid_value(key, part) for part in _split_values(key, text))
    return grid


def _split_values(key: str, text: str) -> list[str]:
    """`text` split at the commas outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        if depth < 0:
            break
    if depth or quote:
        raise UserError(f"--grid {key}: unbalanced brackets or quotes in {one_line(repr(text), 80)}")
    return [*parts, text[start:]]


def _grid_value(key: str, text: str) -> Any:
    text = text.strip()
    if not text:
        raise UserError(f"--grid {key}: an empty value; give V1,V2,... without empty items")
    try:
        value = load_yaml(text)
    except yaml.YAMLError as e:
        problem = one_line(str(e), 100)
        raise UserError(f"--grid {key}: {one_line(repr(text), 60)} is not valid YAML ({problem})") from None
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    try:
        json.dumps(value)
    except TypeError:
        return text  # YAML's dates and the like: kept as the text given, which is what a setting takes
    return value


def _value_arg(value: Any) -> str:
    """`value` as `parse_grid` reads it back (YAML flow style, quoted where YAML needs it)."""
    return yaml.safe_dump([value], default_flow_style=True, width=float("inf")).strip()[1:-1]


def _name_part(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(map(_name_part, value))
    if isinstance(value, dict):
        return "x".join(f"{k}.{_name_part(v)}" for k, v in value.items())
    return value if isinstance(value, str) else json.dumps(value)


def _model_arguments() -> list[str]:
    return [p for p in inspect.signature(MambaOut).parameters if p != "token_mixer"]


def _run_settings(task: str) -> frozenset[str]:
    """The run settings of `task`'s runs: its config's fields."""
    return frozenset(f.name for f in dataclasses.fields(TASKS[task].config_class))


def _metric_choices(task: str) -> str:
    if task == "classify":
        return ", ".join(CLASSIFY_METRICS)
    return f"{', '.join(SEGMENT_METRICS)} or {CLASS_IOU}CLASS (a class's IoU, e.g. {CLASS_IOU}target_joined)"


@dataclass
class AblationSettings:
    """One ablation; maps 1:1 to `mambaout ablate` flags.

    Attributes:
        task: "classify" (`mambaout train` runs) or "segment" (`mambaout segment train` runs).
        mixers: Token mixer names (`mambaout.layers.TOKEN_MIXERS`), the first axis; None: `grid["token_mixer"]`
            when given, else `DEFAULT_MIXERS`.
        grid: Further axes, {key: values}: run settings (fields of the task's config, `TrainConfig` or
            `SegmentConfig`) or model (backbone) constructor arguments. A `token_mixer` key is the same as `mixers`
            (it moves there).
        config: The recipe every run starts from (a path, or a name in `mambaout/configs/`, for segmentation in
            `mambaout/configs/segment/`); None: the task's `DEFAULT_RECIPES` (ablate_digits, ablate_pathfinder_seg).
        model: Registered model to train instead of the recipe's (its own architecture unless `model_kwargs`); the
            backbone for segmentation.
        model_kwargs: Constructor arguments on top of the recipe's (or `model`'s); the mixer and the grid's
            model keys are added to them.
        data: Classification: an ImageFolder root with train/ and val/ or pathfinder:...; segmentation: an
            ADE20K-style root or pathfinder-seg:...; None: the recipe's.
        epochs: Epochs per run; None: the recipe's. Not for recipes that train by `iters` steps (segmentation's):
            give `grid={"iters": ...}` or a recipe.
        seeds: Runs per row, with seeds 0..seeds-1.
        metric: The figure the report compares (top1 or top5; miou, macc, aacc or iou:CLASS); None: the task's
            first (top1, miou). Not part of the ablation: the same runs can be reported with another.
        output: The ablation's folder.
        force: Replace files in `output` that an ablation did not write (its ablation.json, results.jsonl,
            results.md and ablation.png); never another ablation's settings, nor an input.
    """

    task: str = "classify"
    mixers: tuple[str, ...] | None = None
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    config: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    epochs: int | None = None
    seeds: int = 3
    metric: str | None = None
    output: str = "runs/ablate"
    force: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"--task {one_line(str(self.task), 40)}: choose from {', '.join(TASKS)}")
        self.config = self.config or DEFAULT_RECIPES[self.task]
        self.metric = self.metric or DEFAULT_METRICS[self.task]
        plain = CLASSIFY_METRICS if self.task == "classify" else SEGMENT_METRICS
        per_class = self.task == "segment" and self.metric.startswith(CLASS_IOU) and self.metric != CLASS_IOU
        if self.metric not in plain and not per_class:
            choices = _metric_choices(self.task)
            raise UserError(f"--metric {one_line(self.metric, 60)}: choose from {choices} (for --task {self.task})")
        grid = {str(k): tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in self.grid.items()}
        for key, values in grid.items():
            self._check_axis(key, values)
        mixers = grid.pop("token_mixer", None)
        if mixers is not None and self.mixers is not None:
            raise UserError("--mixers and --grid token_mixer=... both give the token mixers: give them once")
        mixers = mixers if mixers is not None else self.mixers if self.mixers is not None else DEFAULT_MIXERS
        self.mixers = tuple(dict.fromkeys(map(str, mixers)))  # in order, without repeats
        # each key's values in order, without repeats (lists are values too, so not dict.fromkeys)
        self.grid = {k: tuple({json.dumps(v, sort_keys=True): v for v in vs}.values()) for k, vs in grid.items()}
        unknown = [m for m in self.mixers if m not in TOKEN_MIXERS]
        if unknown or not self.mixers:
            raise UserError(f"--mixers {','.join(unknown) or '(none)'}: choose from {', '.join(TOKEN_MIXERS)}")
        if "token_mixer" in self.model_kwargs:
            raise UserError("--model-kwargs: leave token_mixer out, --mixers sets it for every run")
        if self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        folders: dict[str, dict[str, Any]] = {}
        for row in self.rows():
            other = folders.setdefault(self.run_name(row), row)
            if other is not row:
                raise UserError(
                    f"--grid: rows {row_label(other)} and {row_label(row)} would share the run folder "
                    f"runs/{self.run_name(row)}-seed<k>: give values that differ in letters, digits or . _ = -"
                )

    def _check_axis(self, key: str, values: tuple[Any, ...]) -> None:
        if not values:
            raise UserError(f"--grid {key}: give at least one value, e.g. {key}=V1,V2")
        if key == "token_mixer":
            return
        if key in _NOT_AXES:
            raise UserError(f"--grid {key}: not a grid key ({_NOT_AXES[key]})")
        if key in self.model_kwargs:
            raise UserError(f"--grid {key} and --model-kwargs both set {key}: give it in one of them")
        if key in ("data", "epochs") and getattr(self, key) is not None:
            raise UserError(f"--grid {key} and --{key} both set {key}: give it in one of them")
        arguments, run_settings = _model_arguments(), _run_settings(self.task)
        if key not in run_settings and key not in arguments:
            close = difflib.get_close_matches(key, [*run_settings, *arguments], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"--grid {key}: neither a run setting (`{TASKS[self.task].command} --help`) nor a model constructor "
                f"argument ({', '.join(arguments)}){hint}"
            )

    def rows(self) -> list[dict[str, Any]]:
        """Every combination of the axes, in order: {"token_mixer": mixer, key: value, ...}."""
        axes = {"token_mixer": self.mixers, **self.grid}
        return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]

    def run_name(self, row: dict[str, Any]) -> str:
        """The row's run folder name without its seed: `conv`, `conv-kernel_size=7`, `conv-dims=16x32x64x96`."""
        parts = [f"{k}={_name_part(v)}" if k != "token_mixer" else str(v) for k, v in row.items()]
        return re.sub(r"[^A-Za-z0-9_.=-]", "_", "-".join(parts))

    def identity(self) -> dict[str, Any]:
        """The settings two runs must share to be compared (the mixers, grid values and seeds may grow between
        reruns; the grid's keys may not)."""
        return {**{k: v for k, v in asdict(self).items() if k in _IDENTITY}, "grid": list(self.grid)}

    def overrides(self, row: dict[str, Any], seed: int, run_dir: Path) -> dict[str, Any]:
        """The `mambaout train` (`mambaout segment train`) settings of one run (a row of `rows()` and a seed), on
        top of the recipe."""
        run_settings = _run_settings(self.task)
        recipe = self.recipe().model_kwargs if self.model is None else {}
        model = {k: v for k, v in row.items() if k not in run_settings and k != "token_mixer"}
        overrides: dict[str, Any] = {
            "output": str(run_dir),
            "seed": seed,
            "model_kwargs": {**recipe, **self.model_kwargs, **model, "token_mixer": row["token_mixer"]},
        }
        for key in ("model", "data", "epochs"):
            if getattr(self, key) is not None:
                overrides[key] = getattr(self, key)
        overrides.update({k: v for k, v in row.items() if k in run_settings})
        return overrides

    def recipe(self) -> RunConfig:
        """The recipe every run starts from, as the engine reads it."""
        task = TASKS[self.task]
        return build_config(None, load_config_file(self.config, task.config_class, task.recipes), cls=task.config_class)

    def command(self) -> str:
        """The `mambaout ablate` command line that reproduces these settings (and the report's metric)."""
        args = ["mambaout", "ablate", *(["--task", self.task] if self.task != "classify" else [])]
        args += ["--mixers", ",".join(self.mixers or ())]
        if self.grid:
            args += ["--grid", *(f"{k}={','.join(map(_value_arg, vs))}" for k, vs in self.grid.items())]
        args += ["--seeds", str(self.seeds)]
        if self.metric != DEFAULT_METRICS[self.task]:
            args += ["--metric", str(self.metric)]
        if self.config != DEFAULT_RECIPES[self.task]:
            args += ["--config", str(self.config)]
        for key in ("model", "data", "epochs"):
            if getattr(self, key) is not None:
                args += [f"--{key}", str(getattr(self, key))]
        if self.model_kwargs:
            args += ["--model-kwargs", json.dumps(self.model_kwargs)]
        return shlex.join([*args, "--output", self.output])


def run_ablation(settings: AblationSettings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every (row, seed) run not yet recorded, then write the results, table and plot.

    Every row still to train is first checked by building its run config (and its model, on the meta device), and
    an `iou:CLASS` metric against the classes of every row's data and every recorded run, so that a bad grid value
    or class stops the ablation before anything trains or is written.

    Returns:
        Every recorded run of the ablation (one dict per line of `results.jsonl`).

    Raises:
        UserError: Bad settings, an output that is a file, an output folder holding an ablation with other
            settings, or (unless `settings.force`) files of another program where the ablation's go.
        TrainingInterrupted: SIGINT/SIGTERM during a run (saved; rerun the command to resume it).
    """
    out = Path(settings.output).expanduser()
    inputs = [Path(p).expanduser() for p in (settings.data, settings.config) if p and Path(p).expanduser().exists()]
    for name, kind in _OUTPUTS.items():
        check_output(out / name, "--output", kind, inputs=inputs, force=settings.force)
    claimed = _check_claim(out, settings)
    results = read_results(out)
    rows = settings.rows()
    done = {(settings_key(record_settings(r)), r["seed"]) for r in results}
    todo = [(row, s) for s in range(settings.seeds) for row in rows if (settings_key(row), s) not in done]
    configs = _check_rows(settings, list({settings_key(row): row for row, _ in todo}.values()), out)
    _check_class(settings, results, configs)
    task = TASKS[settings.task]
    out.mkdir(parents=True, exist_ok=True)
    if not claimed:
        with atomic_write(out / "ablation.json") as f:
            f.write(json.dumps(settings.identity(), indent=2).encode())
    skipped = len(rows) * settings.seeds - len(todo)
    if skipped:
        log(f"{out}: {skipped} run(s) already recorded in results.jsonl, {len(todo)} to go")
    for i, (row, seed) in enumerate(todo):
        run_dir = out / "runs" / f"{settings.run_name(row)}-seed{seed}"
        log(f"=== [{i + 1}/{len(todo)}] {row_label(row)}, seed {seed}: {run_dir}")
        files = RunDir(run_dir)
        if files.config.exists() and not any(p.exists() for p in (files.last, files.best, files.metrics)):
            files.config.unlink()  # stopped inside its first epoch: nothing to resume, so it starts again
        config, checkpoint = prepare_run(task, settings.config, settings.overrides(row, seed, run_dir), "auto")
        result = run_training(task, config, checkpoint)
        if task is Segmentation:
            results.append(_segmentation_record(row, seed, result.metrics, run_dir, config.device))
        else:
            results.append(_record(row, seed, result.metrics, run_dir))
        write_results(out, results, settings)
    if not todo:
        write_results(out, results, settings)
    log(f"wrote {out / 'results.jsonl'}, {out / 'results.md'}, {out / 'ablation.png'}")
    return results


def _check_claim(out: Path, settings: AblationSettings) -> bool:
    """Whether `out/ablation.json` records these settings already (False: no ablation there yet, or, with
    `settings.force`, a file that is no ablation's settings, to be replaced).

    Raises:
        UserError: It records an ablation with other settings, or (unless `settings.force`) it is not an
            ablation's settings (not a JSON object of them).
    """
    path = out / "ablation.json"
    if not path.exists():
        return False
    identity = settings.identity()
    with path.open("rb") as f:
        ours = OUTPUT_KINDS[_OUTPUTS["ablation.json"]](f.read())
    try:
        saved = json.loads(path.read_bytes()) if ours else None
    except ValueError:  # not JSON, or not UTF-8
        saved = None
    if not isinstance(saved, dict):
        if settings.force:
            return False
        raise UserError(
            f"--output {path} is not the settings of a `mambaout ablate` (not a JSON object of them): pick another "
            "--output, or pass --force to replace it"
        )
    saved = {**_LEGACY_IDENTITY, **saved}
    changed = [k for k in _IDENTITY if saved.get(k) != identity[k]]
    if changed:
        diffs = ", ".join(f"{k} {saved.get(k)!r} here, {identity[k]!r} now" for k in changed)
        raise UserError(f"{out} holds an ablation with other settings ({diffs}): pick another --output")
    return True


def _check_rows(settings: AblationSettings, rows: list[dict[str, Any]], out: Path) -> list[RunConfig]:
    """Build each row's run config as its first run will, so that a bad value fails now, with nothing written.

    Returns:
        The rows' configs.
    """
    configs = []
    for row in rows:
        overrides = settings.overrides(row, 0, out / "runs" / f"{settings.run_name(row)}-seed0")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the engine's notes are printed when the row trains
                config, _ = prepare_run(TASKS[settings.task], settings.config, overrides, resume=None)
        except UserError as e:
            raise UserError(f"{row_label(row)}: {e} (nothing was trained)") from None
        configs.append(config)
    return configs


def _check_class(settings: AblationSettings, results: list[dict[str, Any]], configs: list[RunConfig]) -> None:
    """Refuse an `iou:CLASS` metric naming a class that the recorded runs or the data of a row to train lack."""
    if not str(settings.metric).startswith(CLASS_IOU):
        return
    wanted = str(settings.metric).removeprefix(CLASS_IOU)
    listings = [(f"the run in {r.get('run_dir')}", list(r.get("class_iou") or {})) for r in results]
    for data, num_classes in dict.fromkeys((c.data, c.num_classes) for c in configs):
        root = resolve_data(data, "segmentation", ihc_ade)
        listings.append((f"the data {data or root}", read_class_names(root, num_classes)))
    lacking = [where for where, names in listings if wanted not in names]
    if lacking:
        common = [name for name in listings[0][1] if all(name in names for _, names in listings)]
        choices = ", ".join(f"{CLASS_IOU}{name}" for name in common) or "none common to all rows"
        raise UserError(
            f"--metric {settings.metric}: {lacking[0]} has no class {wanted!r}; choose from "
            f"{', '.join(SEGMENT_METRICS)} or {choices}"
        )


def _record(row: dict[str, Any], seed: int, metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One line of `results.jsonl`: what was trained (from its checkpoint's resolved config) and how it did."""
    run = RunDir(run_dir)
    saved = read_checkpoint(run.last)
    config = saved["config"]
    size, classes = config["input_size"], len(saved["class_names"])
    _, macs = model_complexity(config["model"], (size, size), num_classes=classes, **config["model_kwargs"])
    classifier = load_classifier(str(run.last))
    epochs = run.read_metrics()
    return {
        "mixer": row["token_mixer"],
        "seed": seed,
        "settings": row,
        "model": config["model"],
        "model_kwargs": config["model_kwargs"],
        "epochs": config["epochs"],
        "num_classes": classes,
        "params": sum(p.numel() for p in classifier.model.parameters()),
        "macs": macs,
        "top1": metrics["val_top1"],
        "top5": metrics["val_top5"],
        "train_img_per_s": statistics.median(r["images_per_sec"] for r in epochs) if epochs else None,
        "infer_img_per_s": inference_speed(classifier.model, config["batch_size"], size),
        "wall_s": metrics["elapsed_s"],
        "load": load_average(),
        "run_dir": str(run_dir),
    }


def _segmentation_record(
    row: dict[str, Any], seed: int, metrics: dict[str, Any], run_dir: Path, device: str
) -> dict[str, Any]:
    """One line of `results.jsonl` for a segmentation run: what was trained and how its last checkpoint does on the
    validation split, evaluated as `mambaout segment eval` evaluates it (on the run's device)."""
    run = RunDir(run_dir)
    env = init_distributed(device)
    try:
        dense = load_dense_model(str(run.last), Segmentation, env.device)
        _, loader = validation_loader(dense, None, env, 1, dense.config.workers)
        amp_dtype = resolve_amp(dense.config.amp, env.device)
        evaluation = evaluate_segmentation(dense.model, loader, env, amp_dtype, len(dense.class_names))
    finally:
        env.shutdown()
    config, model = dense.config, dense.model.cpu()
    epochs = run.read_metrics()
    return {
        "mixer": row["token_mixer"],
        "seed": seed,
        "settings": row,
        "model": config.model,
        "model_kwargs": config.model_kwargs,
        "iters": config.iters,
        "epochs": epochs[-1]["epoch"] if epochs else None,
        "num_classes": len(dense.class_names),
        "params": sum(p.numel() for p in model.parameters()),
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
        "macs": segmenter_macs(config),
        "miou": evaluation["miou"],
        "macc": evaluation["macc"],
        "aacc": evaluation["aacc"],
        "class_iou": dict(zip(dense.class_names, evaluation["iou"], strict=True)),
        "train_img_per_s": statistics.median(r["images_per_sec"] for r in epochs) if epochs else None,
        "infer_img_per_s": inference_speed(model, config.batch_size, config.crop_size),
        "wall_s": metrics["elapsed_s"],
        "load": load_average(),
        "run_dir": str(run_dir),
    }


def segmenter_macs(config: SegmentConfig) -> int:
    """Multiply-accumulates of the segmenter a resolved `config` describes on one crop, counted on the meta device
    as `mambaout.dense.complexity` counts (eval mode: the auxiliary head, not run at test time, is not counted)."""
    with torch.device("meta"):
        model = build_segmenter(config).eval()
        image = torch.empty(1, 3, config.crop_size, config.crop_size)
    with FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops() // 2


def inference_speed(model: torch.nn.Module, batch_size: int, size: int, repeats: int = 5) -> float:
    """Images/s of `model` (eval mode, no grad) on one random batch, from the median of `repeats` timed calls."""
    x = torch.randn(batch_size, 3, size, size)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    (timed,) = measure([BenchPath("model", forward)], repeats=repeats, warmup=1)
    return timed.images_per_s(batch_size)


def read_results(out: Path) -> list[dict[str, Any]]:
    """The complete lines of `out/results.jsonl` (a line cut short by a crash is skipped)."""
    path = out / "results.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and {"mixer", "seed"} <= record.keys() and record.keys() & {"top1", "miou"}:
            records.append(record)
    return records


def write_results(out: Path, results: list[dict[str, Any]], settings: AblationSettings) -> None:
    """`results.jsonl` (one line per run), `results.md` and `ablation.png`, each replaced atomically."""
    with atomic_write(out / "results.jsonl") as f:
        f.write("".join(json.dumps(r) + "\n" for r in results).encode())
    title, order, metric = _title(results, settings), settings.rows(), str(settings.metric)
    with atomic_write(out / "results.md") as f:
        f.write(results_markdown(results, title, settings.command(), order, metric).encode())
    plot_ablation(results, out / "ablation.png", title, order, metric=metric)


def _title(results: list[dict[str, Any]], settings: AblationSettings) -> str:
    """What every row shares: the model, its shape less the grid's keys, the data and the length of a run."""
    first = results[0] if results else {}
    arch = {k: v for k, v in (first.get("model_kwargs") or {}).items() if k != "token_mixer" and k not in settings.grid}
    shape = "; ".join(f"{k} {v}" for k, v in arch.items())
    default = "the bundled digits" if settings.task == "classify" else "the embedded IHC crops"
    data = "each row's data" if "data" in settings.grid else settings.data or settings.recipe().data or default
    if first.get("iters"):
        length = "" if "iters" in settings.grid else f", {first['iters']} steps"
    else:
        length = "" if "epochs" in settings.grid else f", {first.get('epochs')} epochs"
    model = first.get("model", settings.model)
    task = "" if settings.task == "classify" else "UperNet on "
    return f"{task}{model}{f' ({shape})' if shape else ''} on {data}{length}"
