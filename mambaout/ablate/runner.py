"""`run_ablation`: the same network trained with each token mixer, under one recipe, budget and set of seeds.

Every run is an ordinary training run of the one engine (`mambaout.train.prepare_run` + `train`) in
`DIR/runs/<mixer>-seed<k>/`, with the mixer in the run config's `model_kwargs`, so its checkpoints work with
`mambaout eval / predict / export` and `--resume auto`. After each run one line goes to `DIR/results.jsonl` and
`DIR/results.md` and `DIR/ablation.png` are redrawn. Rerunning the same command skips the runs that have their line,
resumes an unfinished one from its `last.pth`, and refuses a DIR that holds an ablation with other settings.
"""

import json
import shlex
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mambaout.ablate.report import plot_ablation, results_markdown
from mambaout.bench.harness import BenchPath, load_average, measure
from mambaout.errors import UserError
from mambaout.layers import TOKEN_MIXERS
from mambaout.models import model_complexity
from mambaout.train import load_classifier, prepare_run, train
from mambaout.train.checkpoint import read_checkpoint
from mambaout.train.config import build_config, load_config_file
from mambaout.train.rundir import RunDir
from mambaout.weights.io import atomic_write

__all__ = ["DEFAULT_MIXERS", "AblationSettings", "run_ablation"]

DEFAULT_MIXERS = ("conv", "conv_ssm", "causal_conv", "attention", "causal_attention")
DEFAULT_RECIPE = "ablate_digits"
# what must be the same for two runs to be compared (and for a rerun to continue an ablation)
_IDENTITY = ("config", "model", "model_kwargs", "data", "epochs")


@dataclass
class AblationSettings:
    """One ablation; maps 1:1 to `mambaout ablate` flags.

    Attributes:
        mixers: Token mixer names (`mambaout.layers.TOKEN_MIXERS`), trained in this order for every seed.
        config: The recipe every run starts from (a path or a name in `mambaout/configs/`).
        model: Registered model to train instead of the recipe's (its own architecture unless `model_kwargs`).
        model_kwargs: Constructor arguments on top of the recipe's (or `model`'s); the mixer is added to them.
        data: ImageFolder root with train/ and val/; None: the recipe's (the bundled digits).
        epochs: Epochs per run; None: the recipe's.
        seeds: Runs per mixer, with seeds 0..seeds-1.
        output: The ablation's folder.
    """

    mixers: tuple[str, ...] = DEFAULT_MIXERS
    config: str = DEFAULT_RECIPE
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    epochs: int | None = None
    seeds: int = 3
    output: str = "runs/ablate"

    def __post_init__(self) -> None:
        self.mixers = tuple(dict.fromkeys(self.mixers))  # in order, without repeats
        unknown = [m for m in self.mixers if m not in TOKEN_MIXERS]
        if unknown or not self.mixers:
            raise UserError(f"--mixers {','.join(unknown) or '(none)'}: choose from {', '.join(TOKEN_MIXERS)}")
        if "token_mixer" in self.model_kwargs:
            raise UserError("--model-kwargs: leave token_mixer out, --mixers sets it for every run")
        if self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")

    def identity(self) -> dict[str, Any]:
        """The settings two runs must share to be compared (the mixers and seeds may grow between reruns)."""
        return {k: v for k, v in asdict(self).items() if k in _IDENTITY}

    def overrides(self, mixer: str, seed: int, run_dir: Path) -> dict[str, Any]:
        """The `mambaout train` settings of one run, on top of the recipe."""
        recipe = _recipe_model_kwargs(self.config) if self.model is None else {}
        overrides: dict[str, Any] = {
            "output": str(run_dir),
            "seed": seed,
            "model_kwargs": {**recipe, **self.model_kwargs, "token_mixer": mixer},
        }
        for key in ("model", "data", "epochs"):
            if getattr(self, key) is not None:
                overrides[key] = getattr(self, key)
        return overrides

    def command(self) -> str:
        """The `mambaout ablate` command line that reproduces these settings."""
        args = ["mambaout", "ablate", "--mixers", ",".join(self.mixers), "--seeds", str(self.seeds)]
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
    """Train every (mixer, seed) run not yet recorded, then write the results, table and plot.

    Returns:
        Every recorded run of the ablation (one dict per line of `results.jsonl`).

    Raises:
        UserError: Bad settings, or an output folder holding an ablation with other settings.
        TrainingInterrupted: SIGINT/SIGTERM during a run (saved; rerun the command to resume it).
    """
    out = Path(settings.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, settings)
    results = read_results(out)
    done = {(r["mixer"], r["seed"]) for r in results}
    todo = [(m, s) for s in range(settings.seeds) for m in settings.mixers if (m, s) not in done]
    skipped = len(settings.mixers) * settings.seeds - len(todo)
    if skipped:
        log(f"{out}: {skipped} run(s) already recorded in results.jsonl, {len(todo)} to go")
    for i, (mixer, seed) in enumerate(todo):
        run_dir = out / "runs" / f"{mixer}-seed{seed}"
        log(f"=== [{i + 1}/{len(todo)}] {mixer}, seed {seed}: {run_dir}")
        files = RunDir(run_dir)
        if files.config.exists() and not any(p.exists() for p in (files.last, files.best, files.metrics)):
            files.config.unlink()  # stopped inside its first epoch: nothing to resume, so it starts again
        config, checkpoint = prepare_run(settings.config, settings.overrides(mixer, seed, run_dir), resume="auto")
        result = train(config, checkpoint)
        results.append(_record(mixer, seed, result.metrics, run_dir))
        write_results(out, results, settings)
    if not todo:
        write_results(out, results, settings)
    log(f"wrote {out / 'results.jsonl'}, {out / 'results.md'}, {out / 'ablation.png'}")
    return results


def _claim(out: Path, settings: AblationSettings) -> None:
    """Record the settings in `out/ablation.json`, or check they match the ablation already there."""
    path = out / "ablation.json"
    identity = settings.identity()
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is not valid JSON: remove it or pick another --output") from None
        changed = [k for k in _IDENTITY if saved.get(k) != identity[k]]
        if changed:
            diffs = ", ".join(f"{k} {saved.get(k)!r} here, {identity[k]!r} now" for k in changed)
            raise UserError(f"{out} holds an ablation with other settings ({diffs}): pick another --output")
        return
    with atomic_write(path) as f:
        f.write(json.dumps(identity, indent=2).encode())


def _record(mixer: str, seed: int, metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One line of `results.jsonl`: what was trained (from its checkpoint's resolved config) and how it did."""
    run = RunDir(run_dir)
    saved = read_checkpoint(run.last)
    config = saved["config"]
    size, classes = config["input_size"], len(saved["class_names"])
    _, macs = model_complexity(config["model"], (size, size), num_classes=classes, **config["model_kwargs"])
    classifier = load_classifier(str(run.last))
    epochs = run.read_metrics()
    return {
        "mixer": mixer,
        "seed": seed,
        "model": config["model"],
        "model_kwargs": config["model_kwargs"],
        "epochs": config["epochs"],
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
    title = _title(results, settings)
    with atomic_write(out / "results.md") as f:
        f.write(results_markdown(results, title, settings.command()).encode())
    plot_ablation(results, out / "ablation.png", title)


def _title(results: list[dict[str, Any]], settings: AblationSettings) -> str:
    first = results[0] if results else {}
    arch = {k: v for k, v in (first.get("model_kwargs") or {}).items() if k != "token_mixer"}
    shape = "; ".join(f"{k} {v}" for k, v in arch.items())
    data = settings.data or "the bundled digits"
    model = first.get("model", settings.model)
    return f"{model}{f' ({shape})' if shape else ''} on {data}, {first.get('epochs')} epochs"
