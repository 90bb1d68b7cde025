"""A run's config before anything is written: a recipe, flags and `--resume` become a config (and the checkpoint to
continue from). A new run takes its recipe with the flags on top, a changed length keeping the warm-up in
proportion; a resumed run takes its saved config, refusing a damaged checkpoint and any change to a setting frozen on
resume (`Task.frozen_on_resume`).

An explicit flag is never silently overridden by a recipe's default: a length or warm-up in optimizer steps (`iters`,
`warmup_iters`) wins over its counterpart in epochs, so a flag in epochs given alone clears the steps it would lose
to (printed), and both given at once are refused.
"""

import dataclasses
from pathlib import Path
from typing import Any

from mambaout.errors import UserError, one_line
from mambaout.rundir import RunDir
from mambaout.train.checkpoint import READ_FROM, file_state, read_checkpoint
from mambaout.train.config import RunConfig, build_config, flag, load_config_file, means_none
from mambaout.train.task import Task

__all__ = ["prepare_run"]

_RESUME_KEYS = ("model", "optimizer", "epoch", "step", "rng", "config", "class_names")
# a setting in epochs: its counterpart in optimizer steps (which the engine uses when set) and what both set
_IN_STEPS = {"epochs": ("iters", "the run's length"), "warmup_epochs": ("warmup_iters", "the warm-up")}


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
            so do its multistep milestones. `epochs` (`warmup_epochs`) given without `iters` (`warmup_iters`) clears
            the recipe's, or the resumed run's, steps; a recipe's warm-up in steps then becomes its share in epochs.
        resume: None, "auto" (`<output>/last.pth`; a new run when `<output>` holds no run at all), or a checkpoint
            file or run folder.

    Raises:
        UserError: Bad settings (a length or warm-up given both in epochs and in steps among them), a run folder with
            no resumable checkpoint, a damaged checkpoint, or a change to a setting that cannot change on resume.
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
    base, notes = build_config(None, recipe, cls=cls), []
    chosen = _kept_in_proportion(base, _explicit_units(base, overrides, "the recipe's", notes), notes)
    config = build_config(None, recipe, chosen, cls=cls)
    _refuse_both(config, overrides)
    _print(notes)
    return config, None


def _explicit_units(base: RunConfig, overrides: dict[str, Any], whose: str, notes: list[str]) -> dict[str, Any]:
    """`overrides` where a setting in epochs given without its counterpart in steps (`_IN_STEPS`) clears the steps of
    `base` (the recipe, or the resumed run: `whose`), which would otherwise win over it; a note says so, as it is a
    choice. Both given are left for `_refuse_both`."""
    chosen = dict(overrides)
    for in_epochs, (in_steps, _) in _IN_STEPS.items():
        was = getattr(base, in_steps)
        if in_epochs in overrides and in_steps not in overrides and was is not None:
            chosen[in_steps] = None
            notes.append(
                f"{flag(in_steps)} none: {whose} {was} steps give way to {flag(in_epochs)} "
                f"{one_line(str(overrides[in_epochs]), 40)} (pass {flag(in_steps)} to count in steps)"
            )
    return chosen


def _refuse_both(config: RunConfig, overrides: dict[str, Any]) -> None:
    """Refuse a setting given both in epochs and in steps (`_IN_STEPS`, the steps not `none`): one would be ignored."""
    for in_epochs, (in_steps, what) in _IN_STEPS.items():
        steps = getattr(config, in_steps)
        if in_epochs in overrides and in_steps in overrides and steps is not None:
            raise UserError(
                f"{flag(in_epochs)} {getattr(config, in_epochs):g} and {flag(in_steps)} {steps} both set {what}, and "
                f"{flag(in_steps)} would win: pass only one"
            )


def _kept_in_proportion(base: RunConfig, overrides: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """`overrides` plus the recipe's (`base`'s) warm-up and multistep milestones scaled to a changed length, and its
    warm-up in steps turned into the same share in epochs when the length is given in epochs (`_explicit_units`
    cleared its steps); a note says so, as it is a choice."""
    try:
        given = {k: None if means_none(v) else int(v) for k, v in overrides.items() if k in ("epochs", "iters")}
    except (TypeError, ValueError):
        return overrides  # a bad value gets its own message from the config
    if base.iters is None:
        return _scaled(base, overrides, "epochs", given.get("epochs"), ("warmup_epochs", "decay_milestones"), notes)
    if given.get("iters") is not None:
        return _scaled(base, overrides, "iters", given["iters"], ("warmup_iters",), notes)
    if "iters" not in given or not base.warmup_iters or {"warmup_epochs", "warmup_iters"} & overrides.keys():
        return overrides
    epochs = given.get("epochs") or base.epochs
    warmup = base.warmup_iters / base.iters * epochs
    notes.append(
        f"{flag('warmup_epochs')} {warmup:.3g}: the recipe's {base.warmup_iters} of {base.iters} iters, kept in "
        f"proportion for {flag('epochs')} {epochs} (pass {flag('warmup_epochs')} to choose)"
    )
    return {**overrides, "warmup_iters": None, "warmup_epochs": warmup}


def _scaled(
    base: RunConfig,
    overrides: dict[str, Any],
    length: str,
    wanted: int | None,
    parts: tuple[str, ...],
    notes: list[str],
) -> dict[str, Any]:
    """`overrides` plus those of `parts` not given, scaled from the recipe's `length` to `wanted`, each with a note."""
    was = getattr(base, length)
    scaled = dict(overrides)
    if wanted is None or wanted == was or wanted < 1:
        return scaled
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
        notes.append(
            f"{flag(part)} {shown}: the recipe's {text} of {was} {length}, kept in proportion for "
            f"{flag(length)} {wanted} (pass {flag(part)} to choose)"
        )
    return scaled


def _print(notes: list[str]) -> None:
    """The choices made for the user, printed once the config they lead to is valid."""
    for note in notes:
        print(note, flush=True)


def _read_resumable(task: type[Task], path: Path) -> dict[str, Any]:
    """A `last.pth` that holds all a resumed run needs; a damaged one is refused, offering `best.pth` if it reads."""
    try:
        state = file_state(path)  # before reading: a file replaced while it is read does not pass for the one read
        checkpoint = read_checkpoint(path)
    except OSError as e:
        raise UserError(f"--resume: cannot read {path}: {e.strerror or e}") from None
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
    return {**checkpoint, READ_FROM: (path, state)}


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
    notes: list[str] = []
    requested = build_config(checkpoint["config"], _explicit_units(saved, overrides, "the run's", notes), cls=cls)
    _refuse_both(requested, overrides)
    changed = [f.name for f in dataclasses.fields(cls) if getattr(saved, f.name) != getattr(requested, f.name)]
    frozen = [k for k in changed if k in task.frozen_on_resume]
    if frozen:
        raise UserError(
            f"--resume: {path} was trained with other settings that cannot change when resuming "
            f"({_changes(saved, requested, frozen)}): drop those flags, or start a new run from its weights with "
            f"--pretrained {path} --output NEW_DIR"
        )
    _print(notes)
    if changed:
        print(f"resuming with changed settings: {_changes(saved, requested, changed)}", flush=True)
    return requested


def _changes(saved: RunConfig, requested: RunConfig, keys: list[str]) -> str:
    return "; ".join(f"{flag(k)} {getattr(saved, k)!r} -> {getattr(requested, k)!r}" for k in keys)
