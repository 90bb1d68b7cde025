"""A run's config before anything is written: a recipe, flags and `--resume` become a config (and the checkpoint to
continue from). A new run takes its recipe with the flags on top, a changed length keeping the warm-up in
proportion; a resumed run takes its saved config, refusing a damaged checkpoint and any change to a setting frozen on
resume (`Task.frozen_on_resume`).
"""

import dataclasses
from pathlib import Path
from typing import Any

from mambaout.errors import UserError
from mambaout.rundir import RunDir
from mambaout.train.checkpoint import read_checkpoint
from mambaout.train.config import RunConfig, build_config, flag, load_config_file
from mambaout.train.task import Task

__all__ = ["prepare_run"]

_RESUME_KEYS = ("model", "optimizer", "epoch", "step", "rng", "config", "class_names")


def prepare_run(
    task: type[Task], config_file: str | None, overrides: dict[str, Any], resume: str | None
) -> tuple[RunConfig, dict[str, Any] | None]:
    """The run's config and, when resuming, the checkpoint to continue from; nothing is written.

    Args:
        task: The kind of run.
        config_file: `--config` (path or recipe name); default `task.default_recipe`. Ignored when resuming: a
            resumed run keeps its saved config, changed only by `overrides` of settings outside its frozen ones.
        overrides: Config values given as flags. When `epochs` (`iters`) is given without `warmup_epochs`
            (`warmup_iters`), the recipe's warm-up keeps its share of the schedule (20 of 300 epochs: 2 of 30), and
            so do its multistep milestones.
        resume: None, "auto" (`<output>/last.pth`; a new run when `<output>` holds no run at all), or a checkpoint
            file or run folder.

    Raises:
        UserError: Bad settings, a run folder with no resumable checkpoint, a damaged checkpoint, or a change to a
            setting that cannot change on resume.
    """
    checkpoint, path = None, None
    if resume == "auto":
        if not overrides.get("output"):
            raise UserError("--resume auto needs --output RUN_DIR (the run to continue, or to start)")
        run = RunDir(overrides["output"])
        if run.last.exists():
            path = run.last
        elif run.holds_run():
            present = ", ".join(p.name for p in run.files if p.exists())
            raise UserError(
                f"--resume auto: {run.path} holds a run ({present}) but no last.pth to continue from: give a "
                "checkpoint with --resume PATH, or start a new run with another --output"
            )
    elif resume:
        path = Path(resume).expanduser()
        path = RunDir(path).last if path.is_dir() else path
        if not path.exists():
            raise UserError(f"--resume: no checkpoint at {path}")
        overrides = {"output": str(path.parent), **overrides}
    if path is not None:
        checkpoint = _read_resumable(task, path)
        return _resumed_config(task, checkpoint, overrides, path), checkpoint
    cls = task.config_class
    model = str(overrides.get("model", cls.model))
    name = config_file or task.default_recipe(model, overrides.get("data") or None)
    recipe = load_config_file(name, cls, task.recipes) if name else {}
    return build_config(None, recipe, _kept_in_proportion(cls, recipe, overrides), cls=cls), None


def _kept_in_proportion(cls: type[RunConfig], recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` plus the recipe's warm-up (and multistep milestones) scaled to a changed length; printed, as it is
    a choice."""
    base = build_config(None, recipe, cls=cls)
    scaled = dict(overrides)
    for length, parts in (("epochs", ("warmup_epochs", "decay_milestones")), ("iters", ("warmup_iters",))):
        if length not in overrides or getattr(base, length) is None:
            continue
        try:
            wanted = int(overrides[length])
        except (TypeError, ValueError):
            return overrides  # a bad value gets its own message from the config
        was = getattr(base, length)
        if wanted == was or wanted < 1:
            continue
        for part in parts:
            value = getattr(base, part)
            if part in overrides or not value:
                continue
            if part == "decay_milestones":
                scaled[part] = tuple(m * wanted / was for m in value)
                shown, text = " ".join(f"{m:.3g}" for m in scaled[part]), ", ".join(f"{m:g}" for m in value)
            else:
                scaled[part] = value * wanted / was if part == "warmup_epochs" else round(value * wanted / was)
                shown, text = f"{scaled[part]:.3g}", f"{value:g}"
            print(
                f"{flag(part)} {shown}: the recipe's {text} of {was} {length}, kept in proportion for "
                f"{flag(length)} {wanted} (pass {flag(part)} to choose)",
                flush=True,
            )
    return scaled


def _read_resumable(task: type[Task], path: Path) -> dict[str, Any]:
    """A `last.pth` that holds all a resumed run needs; a damaged one is refused, offering `best.pth` if it reads."""
    try:
        checkpoint = read_checkpoint(path)
    except UserError as e:
        raise UserError(f"--resume: {e}{_best_fallback(task, path)}") from None
    if checkpoint.get("optimizer") is None:
        raise UserError(
            f"--resume: {path} holds weights only (a best.pth?): resume from last.pth, or start a new run from "
            "these weights with --pretrained"
        )
    saved_task = checkpoint.get("task", "classification")
    if saved_task != task.name:
        raise UserError(f"--resume: {path} is a {saved_task} run, not a {task.name} run: resume it with its command")
    missing = [k for k in _RESUME_KEYS if k not in checkpoint]
    optimizer = checkpoint["optimizer"]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= optimizer.keys():
        missing.append("the optimizer's state and param_groups")
    if missing:
        raise UserError(
            f"--resume: {path} lacks what a resumed run needs ({', '.join(missing)}); it was not written by "
            f"`{task.command}` or is damaged{_best_fallback(task, path)}"
        )
    return checkpoint


def _best_fallback(task: type[Task], last: Path) -> str:
    """The message's way out when `last` cannot be resumed: `best.pth` beside it, when it reads."""
    best = RunDir(last.parent).best
    if best == last or not best.exists():
        return ""
    try:
        saved = read_checkpoint(best)
    except UserError:
        return ""
    value = saved.get(f"best_{task.metric}", float("nan"))
    return (
        f"; {best} (epoch {saved.get('epoch', '?')}, {task.metric_label} {value:.2f}%) reads: "
        f"continue from its weights in a new run with --pretrained {best} --output NEW_DIR"
    )


def _resumed_config(task: type[Task], checkpoint: dict[str, Any], overrides: dict[str, Any], path: Path) -> Any:
    """The saved config with `overrides`, after checking that none changes a setting frozen on resume."""
    cls = task.config_class
    try:
        saved = build_config(checkpoint["config"], cls=cls)
    except UserError as e:
        raise UserError(f"--resume: {path} holds a config this version rejects: {e}") from None
    requested = build_config(checkpoint["config"], overrides, cls=cls)
    changed = [f.name for f in dataclasses.fields(cls) if getattr(saved, f.name) != getattr(requested, f.name)]
    frozen = [k for k in changed if k in task.frozen_on_resume]
    if frozen:
        raise UserError(
            f"--resume: {path} was trained with other settings that cannot change when resuming "
            f"({_changes(saved, requested, frozen)}): drop those flags, or start a new run from its weights with "
            f"--pretrained {path} --output NEW_DIR"
        )
    if changed:
        print(f"resuming with changed settings: {_changes(saved, requested, changed)}", flush=True)
    return requested


def _changes(saved: RunConfig, requested: RunConfig, keys: list[str]) -> str:
    return "; ".join(f"{flag(k)} {getattr(saved, k)!r} -> {getattr(requested, k)!r}" for k in keys)
