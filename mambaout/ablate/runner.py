"""`run_ablation`: the same network trained with each token mixer, and each combination of further settings, under
one recipe, budget and set of seeds.

The rows of an ablation are every combination of its axes: the token mixers first, then each `--grid KEY=V1,V2`
in the order given (`itertools.product`, first values first). A grid key that is a run setting (a `TrainConfig`
field: epochs, base_lr, drop_path, input_size, data, ...) overrides the recipe's; any other key is a model
constructor argument (kernel_size, conv_ratio, dims, mixer_kwargs, ...) and joins `model_kwargs` beside the mixer.

    mambaout ablate --mixers conv --grid kernel_size=3,7,11 --seeds 3
    mambaout ablate --mixers conv,conv_ssm --grid data=pathfinder:32-6,pathfinder:32-14

Every run is an ordinary training run of the one engine (`mambaout.train.prepare_run` + `train`) in
`DIR/runs/<mixer>[-key=value...]-seed<k>/` (`DIR/runs/<mixer>-seed<k>/` without a grid), so its checkpoints work
with `mambaout eval / predict / export` and `--resume auto`. After each run one line goes to `DIR/results.jsonl`
(with the row's `settings`) and `DIR/results.md` (each row's top-1 against the first row's, paired by seed, with a
95% interval) and `DIR/ablation.png` are redrawn. Rerunning the same command skips the runs that have their line,
resumes an unfinished one from its `last.pth`, and refuses a DIR that holds an ablation with other settings; the
mixers, the values of each grid key and the seeds may grow between reruns (only the new runs train), the grid's
keys may not change.
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

from mambaout.ablate.report import plot_ablation, record_settings, results_markdown, row_label, settings_key
from mambaout.bench.harness import BenchPath, load_average, measure
from mambaout.errors import UserError, one_line
from mambaout.layers import TOKEN_MIXERS
from mambaout.models import model_complexity
from mambaout.models.mambaout import MambaOut
from mambaout.train import TrainConfig, load_classifier, prepare_run, train
from mambaout.train.checkpoint import read_checkpoint
from mambaout.train.config import build_config, load_config_file, load_yaml
from mambaout.train.rundir import RunDir
from mambaout.weights.io import atomic_write

__all__ = ["DEFAULT_MIXERS", "AblationSettings", "parse_grid", "run_ablation"]

DEFAULT_MIXERS = ("conv", "conv_ssm", "causal_conv", "attention", "causal_attention")
DEFAULT_RECIPE = "ablate_digits"
# what must be the same for two runs to be compared (and for a rerun to continue an ablation); "grid" is the list
# of grid keys, absent (no grid) in the ablation.json of ablations from before the grid
_IDENTITY = ("config", "model", "model_kwargs", "data", "epochs", "grid")
_RUN_SETTINGS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
# grid keys an ablation sets in other ways
_NOT_AXES = {
    "seed": "--seeds sets the seeds",
    "output": "--output sets the ablation's folder",
    "model": "--model sets the model",
    "model_kwargs": "give each constructor argument as its own key",
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


@dataclass
class AblationSettings:
    """One ablation; maps 1:1 to `mambaout ablate` flags.

    Attributes:
        mixers: Token mixer names (`mambaout.layers.TOKEN_MIXERS`), the first axis; None: `grid["token_mixer"]`
            when given, else `DEFAULT_MIXERS`.
        grid: Further axes, {key: values}: run settings (`TrainConfig` fields) or model constructor arguments.
            A `token_mixer` key is the same as `mixers` (it moves there).
        config: The recipe every run starts from (a path or a name in `mambaout/configs/`).
        model: Registered model to train instead of the recipe's (its own architecture unless `model_kwargs`).
        model_kwargs: Constructor arguments on top of the recipe's (or `model`'s); the mixer and the grid's
            model keys are added to them.
        data: ImageFolder root with train/ and val/; None: the recipe's (the bundled digits).
        epochs: Epochs per run; None: the recipe's.
        seeds: Runs per row, with seeds 0..seeds-1.
        output: The ablation's folder.
    """

    mixers: tuple[str, ...] | None = None
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    config: str = DEFAULT_RECIPE
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    epochs: int | None = None
    seeds: int = 3
    output: str = "runs/ablate"

    def __post_init__(self) -> None:
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
        arguments = _model_arguments()
        if key not in _RUN_SETTINGS and key not in arguments:
            close = difflib.get_close_matches(key, [*_RUN_SETTINGS, *arguments], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"--grid {key}: neither a run setting (`mambaout train --help`) nor a model constructor argument "
                f"({', '.join(arguments)}){hint}"
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
        """The `mambaout train` settings of one run (a row of `rows()` and a seed), on top of the recipe."""
        recipe = _recipe_model_kwargs(self.config) if self.model is None else {}
        model = {k: v for k, v in row.items() if k not in _RUN_SETTINGS and k != "token_mixer"}
        overrides: dict[str, Any] = {
            "output": str(run_dir),
            "seed": seed,
            "model_kwargs": {**recipe, **self.model_kwargs, **model, "token_mixer": row["token_mixer"]},
        }
        for key in ("model", "data", "epochs"):
            if getattr(self, key) is not None:
                overrides[key] = getattr(self, key)
        overrides.update({k: v for k, v in row.items() if k in _RUN_SETTINGS})
        return overrides

    def command(self) -> str:
        """The `mambaout ablate` command line that reproduces these settings."""
        args = ["mambaout", "ablate", "--mixers", ",".join(self.mixers or ())]
        if self.grid:
            args += ["--grid", *(f"{k}={','.join(map(_value_arg, vs))}" for k, vs in self.grid.items())]
        args += ["--seeds", str(self.seeds)]
        if self.config != DEFAULT_RECIPE:
            args += ["--config", self.config]
        for key in ("model", "data", "epochs"):
            if getattr(self, key) is not None:
                args += [f"--{key}", str(getattr(self, key))]
        if self.model_kwargs:
            args += ["--model-kwargs", json.dumps(self.model_kwargs)]
        return shlex.join([*args, "--output", self.output])


def _recipe_model_kwargs(config: str) -> dict[str, Any]:
    return build_config(None, load_config_file(config)).model_kwargs  # as the engine reads it (YAML text or a mapping)


def run_ablation(settings: AblationSettings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every (row, seed) run not yet recorded, then write the results, table and plot.

    Every row still to train is first checked by building its run config (and its model, on the meta device), so
    that a bad grid value stops the ablation before anything trains or is written.

    Returns:
        Every recorded run of the ablation (one dict per line of `results.jsonl`).

    Raises:
        UserError: Bad settings, or an output folder holding an ablation with other settings.
        TrainingInterrupted: SIGINT/SIGTERM during a run (saved; rerun the command to resume it).
    """
    out = Path(settings.output).expanduser()
    claimed = _check_claim(out, settings)
    results = read_results(out)
    rows = settings.rows()
    done = {(settings_key(record_settings(r)), r["seed"]) for r in results}
    todo = [(row, s) for s in range(settings.seeds) for row in rows if (settings_key(row), s) not in done]
    _check_rows(settings, list({settings_key(row): row for row, _ in todo}.values()), out)
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
        config, checkpoint = prepare_run(settings.config, settings.overrides(row, seed, run_dir), resume="auto")
        result = train(config, checkpoint)
        results.append(_record(row, seed, result.metrics, run_dir))
        write_results(out, results, settings)
    if not todo:
        write_results(out, results, settings)
    log(f"wrote {out / 'results.jsonl'}, {out / 'results.md'}, {out / 'ablation.png'}")
    return results


def _check_claim(out: Path, settings: AblationSettings) -> bool:
    """Whether `out/ablation.json` records these settings already (False: no ablation there yet).

    Raises:
        UserError: It records an ablation with other settings, or is not JSON.
    """
    path = out / "ablation.json"
    if not path.exists():
        return False
    identity = settings.identity()
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON: remove it or pick another --output") from None
    saved = {"grid": [], **saved}
    changed = [k for k in _IDENTITY if saved.get(k) != identity[k]]
    if changed:
        diffs = ", ".join(f"{k} {saved.get(k)!r} here, {identity[k]!r} now" for k in changed)
        raise UserError(f"{out} holds an ablation with other settings ({diffs}): pick another --output")
    return True


def _check_rows(settings: AblationSettings, rows: list[dict[str, Any]], out: Path) -> None:
    """Build each row's run config as its first run will, so that a bad value fails now, with nothing written."""
    for row in rows:
        overrides = settings.overrides(row, 0, out / "runs" / f"{settings.run_name(row)}-seed0")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the engine's notes are printed when the row trains
                prepare_run(settings.config, overrides, resume=None)
        except UserError as e:
            raise UserError(f"{row_label(row)}: {e} (nothing was trained)") from None


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
        if isinstance(record, dict) and {"mixer", "seed", "top1"} <= record.keys():
            records.append(record)
    return records


def write_results(out: Path, results: list[dict[str, Any]], settings: AblationSettings) -> None:
    """`results.jsonl` (one line per run), `results.md` and `ablation.png`, each replaced atomically."""
    with atomic_write(out / "results.jsonl") as f:
        f.write("".join(json.dumps(r) + "\n" for r in results).encode())
    title, order = _title(results, settings), settings.rows()
    with atomic_write(out / "results.md") as f:
        f.write(results_markdown(results, title, settings.command(), order).encode())
    plot_ablation(results, out / "ablation.png", title, order)


def _title(results: list[dict[str, Any]], settings: AblationSettings) -> str:
    """What every row shares: the model, its shape less the grid's keys, the data and the epochs."""
    first = results[0] if results else {}
    arch = {k: v for k, v in (first.get("model_kwargs") or {}).items() if k != "token_mixer" and k not in settings.grid}
    shape = "; ".join(f"{k} {v}" for k, v in arch.items())
    data = "each row's data" if "data" in settings.grid else settings.data or "the bundled digits"
    epochs = "" if "epochs" in settings.grid else f", {first.get('epochs')} epochs"
    model = first.get("model", settings.model)
    return f"{model}{f' ({shape})' if shape else ''} on {data}{epochs}"
