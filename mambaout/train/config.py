"""Training run settings: typed dataclasses, filled from a YAML recipe and then from command-line flags.

`RunConfig` holds what the one training engine needs whatever the task (schedule, optimizer, engine, records);
`TrainConfig` adds classification's data and regularization, and `mambaout.dense.config` detection's and
segmentation's. Every field is a YAML key and a flag (`warmup_epochs` <-> `--warmup-epochs`). Values are coerced and
checked in `__post_init__`; a bad one raises `UserError` naming its flag. TrainConfig's defaults are the paper's
ImageNet recipe for MambaOut-Femto; `mambaout/configs/<variant>_in1k.yaml` spell it out per variant.

Learning rate: `base_lr` is per `lr_batch` images of *global* batch (per-device batch × processes × accumulation
steps), so `lr = base_lr × global_batch / lr_batch` (the paper: 1e-3 per 1024, i.e. 4e-3 at 4096; 1e-4 per 16 for
detection and segmentation). Setting `lr` instead fixes the absolute rate. The resolved `lr` is what a run saves, so
a resumed run keeps it whatever its hardware.
"""

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.optim import list_optimizers

from mambaout.errors import UserError, one_line
from mambaout.limits import MAX_INPUT_SIZE, MIN_INPUT_SIZE
from mambaout.train.tracking import TRACKERS

__all__ = [
    "CONFIG_DIR",
    "RunConfig",
    "TrainConfig",
    "add_config_arguments",
    "build_config",
    "check_choice",
    "check_setting",
    "config_overrides",
    "flag",
    "load_config_file",
    "means_none",
    "setting",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # package data: installed with the code
_MAX_CONFIG_BYTES = 1 << 20
AMP_MODES = ("auto", "none", "bf16", "fp16")
SCHEDULES = ("cosine", "tanh", "poly", "multistep")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def setting(default: Any, text: str) -> Any:
    """A config field with its default and its flag's help text."""
    return field(default=default, metadata={"help": text})


@dataclass
class RunConfig:
    """What the training engine needs whatever the task; saved resolved beside every checkpoint."""

    # what to train, on what, where
    model: str = setting("mambaout_femto", "registered model name (`mambaout models`)")
    model_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "extra model constructor arguments as YAML, e.g. '{depths: [1, 1, 1, 1]}'"},
    )
    pretrained: str | None = setting(None, "start from weights: 'official', 'timm', a checkpoint path or URL")
    num_classes: int | None = setting(None, "classes; default the dataset's")
    data: str | None = setting(None, "dataset root; default the bundled example")
    output: str | None = setting(None, "run directory; default runs/<model>-<data>-<time>")
    # schedule
    epochs: int = setting(300, "training epochs")
    iters: int | None = setting(
        None, "optimizer steps to train instead of --epochs (the last epoch stops part-way); --epochs alone clears it"
    )
    warmup_epochs: float = setting(
        20, "linear warmup epochs from --warmup-lr (a shorter --epochs keeps the recipe's share: 20 of 300)"
    )
    warmup_iters: int | None = setting(None, "linear warmup in optimizer steps instead of --warmup-epochs")
    batch_size: int = setting(128, "images per device per micro-step")
    accum_steps: int = setting(1, "micro-steps accumulated per optimizer step")
    base_lr: float = setting(
        1e-3, "learning rate per --lr-batch images of global batch (base_lr * global_batch / lr_batch)"
    )
    lr_batch: int = setting(1024, "the global batch --base-lr is given for")
    lr: float | None = setting(None, "absolute learning rate; overrides --base-lr")
    warmup_lr: float = setting(1e-6, "learning rate at the start of warmup")
    min_lr: float = setting(1e-5, "learning rate at the end of the schedule")
    sched: str = setting("cosine", f"learning-rate schedule: {', '.join(SCHEDULES)}")
    sched_on_updates: bool = setting(True, "step the schedule every optimizer step (else every epoch)")
    decay_rate: float = setting(0.1, "lr factor at each multistep milestone; the power of the poly schedule")
    decay_milestones: tuple[float, ...] = setting(
        (), "epochs at which the multistep schedule multiplies lr by --decay-rate"
    )
    opt: str = setting("adamw", "timm optimizer name")
    opt_eps: float | None = setting(None, "optimizer epsilon; default the optimizer's")
    opt_betas: tuple[float, float] | None = setting(None, "Adam betas; default the optimizer's (0.9, 0.999)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(0.05, "weight decay, not applied to norms, biases and LayerScales")
    clip_grad: float | None = setting(None, "clip the gradient norm to this value")
    drop_path: float = setting(0.025, "stochastic depth of the backbone's last block")
    workers: int = setting(8, "data loading processes per device (0: in the training process)")
    threads: int = setting(0, "CPU threads for torch ops per process (0: torch's default, one per core)")
    # engine
    amp: str = setting(
        "auto", "mixed precision: auto (bf16 on GPU, none on CPU), none, bf16, fp16 (GPU, with a scaler)"
    )
    ema: bool = setting(False, "keep and evaluate an exponential moving average of the weights")
    ema_decay: float = setting(0.9999, "EMA decay per optimizer step")
    ema_warmup: bool = setting(False, "ramp the EMA decay up over the first steps")
    compile: bool = setting(False, "torch.compile the model")
    channels_last: bool = setting(True, "channels-last memory format for images and model")
    grad_checkpointing: bool = setting(False, "recompute block activations in the backward pass to save memory")
    fused_optimizer: bool = setting(True, "use the optimizer's fused single-kernel step where PyTorch has one")
    seed: int = setting(0, "random seed (each process adds its rank)")
    deterministic: bool = setting(False, "use deterministic algorithms only (slower)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (distributed runs use cuda:<local rank>)")
    # records
    eval_interval: int = setting(1, "evaluate every N epochs (and always after the last)")
    save_interval: int = setting(0, "also save last.pth every N optimizer steps within an epoch (0: at epoch ends)")
    log_interval: int = setting(
        50, "optimizer steps between progress lines when not on a terminal, and between --log's train/loss points"
    )
    log: tuple[str, ...] = setting(
        (), f"experiment trackers to send the run's records to: {', '.join(TRACKERS)} (none: no tracking)"
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        self._validate()
        self._check_model()

    def _validate(self) -> None:
        """The engine's settings; a task's config checks its own fields after calling this."""
        from mambaout.models import get_spec
        from mambaout.train.distributed import check_device

        try:
            get_spec(self.model)
        except UserError as e:
            raise UserError(f"--model: {e}") from None
        check_setting(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            finite = all(not isinstance(v, float) or math.isfinite(v) for v in values)
            check_setting(finite, f.name, "must be finite", value)
        check_setting(
            0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", "must be within 0..--epochs", self.warmup_epochs
        )
        check_setting(self.iters is None or self.iters >= 1, "iters", "must be >= 1", self.iters)
        check_setting(
            self.warmup_iters is None or 0 <= self.warmup_iters <= (self.iters or self.warmup_iters),
            "warmup_iters",
            "must be within 0..--iters",
            self.warmup_iters,
        )
        for name in ("batch_size", "accum_steps", "lr_batch", "eval_interval", "log_interval"):
            check_setting(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("workers", "threads", "save_interval", "seed", "weight_decay", "momentum", "min_lr", "warmup_lr"):
            check_setting(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        for name in ("base_lr", "lr", "clip_grad", "num_classes", "opt_eps", "decay_rate"):
            value = getattr(self, name)
            check_setting(value is None or value > 0, name, "must be > 0", value)
        check_setting(
            all(m >= 0 for m in self.decay_milestones), "decay_milestones", "must be >= 0", self.decay_milestones
        )
        for name in ("drop_path", "ema_decay"):
            check_setting(0 <= getattr(self, name) < 1, name, "must be in [0, 1)", getattr(self, name))
        check_setting(
            self.opt_betas is None or all(0 <= b < 1 for b in self.opt_betas),
            "opt_betas",
            "must be in [0, 1)",
            self.opt_betas,
        )
        check_setting(self.seed < 2**32 - 1024, "seed", f"must be below {2**32 - 1024} (numpy's seed range)", self.seed)
        check_choice(self.amp, "amp", AMP_MODES)
        check_choice(self.sched, "sched", SCHEDULES)
        for tracker in self.log:
            check_choice(tracker, "log", TRACKERS)
        check_setting(len(set(self.log)) == len(self.log), "log", "names a tracker twice", " ".join(self.log))
        check_setting(
            self.opt.lower() in list_optimizers(), "opt", "must be a timm optimizer name, e.g. adamw, sgd", self.opt
        )
        check_device(self.device)

    def _check_model(self) -> None:
        """Build the configured network on the meta device (free): a bad --model-kwargs is one line naming it."""
        from mambaout.models.settings import create_configured_model

        with torch.device("meta"):
            create_configured_model(self.model, self.model_kwargs, flag("model_kwargs"))

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * world_size * self.accum_steps

    def resolved_lr(self, world_size: int) -> float:
        """`lr` when set, else `base_lr × global batch / lr_batch`."""
        return self.lr if self.lr is not None else self.base_lr * self.global_batch(world_size) / self.lr_batch

    def to_dict(self) -> dict[str, Any]:
        """Plain python values only (lists for tuples): YAML-safe and loadable with `torch.load(weights_only=True)`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainConfig(RunConfig):
    """A classification run: the engine's settings and the ImageNet recipe's data and regularization."""

    num_classes: int | None = setting(None, "classifier outputs; default the number of class folders")
    data: str | None = setting(
        None,
        "ImageFolder root with train/ and val/, pathfinder:SIZE-LENGTH[:N[/M]], WebDataset shards "
        "wds:FOLDER|URL|PATTERN or a Hugging Face dataset hfds:PATH; default the bundled digits",
    )
    base_lr: float = setting(1e-3, "learning rate per 1024 images of global batch (lr = base_lr * global_batch / 1024)")
    drop_path: float = setting(
        0.025, "stochastic depth of the last block (femto/kobe 0.025, tiny 0.2, small 0.4, base 0.6)"
    )
    layer_decay: float | None = setting(None, "layer-wise learning-rate decay (fine-tuning), e.g. 0.8")
    # regularization
    drop: float = setting(0.0, "dropout before the classifier")
    smoothing: float = setting(0.1, "label smoothing")
    mixup: float = setting(0.8, "mixup alpha; 0 disables")
    cutmix: float = setting(1.0, "cutmix alpha; 0 disables")
    mixup_prob: float = setting(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = setting(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = setting("batch", "mix per 'batch', 'pair' or 'elem'")
    # data
    input_size: int | None = setting(None, "square training and evaluation size; default the model's (224)")
    eval_crop_pct: float | None = setting(None, "evaluation center-crop fraction; default the model's (1.0)")
    interpolation: str | None = setting(None, "evaluation resize interpolation; default the model's (bicubic)")
    mean: tuple[float, float, float] | None = setting(None, "normalization mean; default the model's (ImageNet)")
    std: tuple[float, float, float] | None = setting(None, "normalization std; default the model's (ImageNet)")
    train_interpolation: str = setting("random", "training resize interpolation: random, bilinear, bicubic")
    scale: tuple[float, float] = setting((0.08, 1.0), "random-resized-crop area range")
    ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "random-resized-crop aspect-ratio range")
    hflip: float = setting(0.5, "horizontal flip probability")
    vflip: float = setting(0.0, "vertical flip probability")
    color_jitter: float | None = setting(0.4, "color jitter strength (unused by timm when --auto-augment is set)")
    auto_augment: str | None = setting("rand-m9-mstd0.5-inc1", "timm auto-augment policy; none disables")
    re_prob: float = setting(0.25, "random erasing probability")
    re_mode: str = setting("pixel", "random erasing fill: const, rand, pixel")
    re_count: int = setting(1, "random erasing boxes per image")
    # the classification step
    micro_batch: int | None = setting(
        None,
        "images per forward/backward pass within each batch (same gradients, activations that fit in cache); "
        "default: cache-sized on the CPU, the whole batch on a GPU",
    )
    split_linears: str = setting(
        "auto",
        "run the blocks' linears as weight slices while training (no split/cat copies, same result): "
        "auto (on the CPU without --compile), on, off",
    )

    def _validate(self) -> None:
        from mambaout.data.transforms import check_auto_augment

        super()._validate()
        check_setting(self.re_count >= 1, "re_count", "must be >= 1", self.re_count)
        check_setting(
            self.color_jitter is None or self.color_jitter >= 0, "color_jitter", "must be >= 0", self.color_jitter
        )
        for name in ("input_size", "eval_crop_pct"):
            value = getattr(self, name)
            check_setting(value is None or value > 0, name, "must be > 0", value)
        for name in ("drop", "smoothing"):
            check_setting(0 <= getattr(self, name) < 1, name, "must be in [0, 1)", getattr(self, name))
        for name in ("mixup_prob", "mixup_switch_prob", "hflip", "vflip", "re_prob"):
            check_setting(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]", getattr(self, name))
        for name in ("mixup", "cutmix"):
            check_setting(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        if self.auto_augment is not None:
            check_auto_augment(self.auto_augment)
        check_setting(
            self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]", self.layer_decay
        )
        check_setting(0 < self.scale[0] <= self.scale[1] <= 1, "scale", "must be 0 < min <= max <= 1", self.scale)
        check_setting(0 < self.ratio[0] <= self.ratio[1], "ratio", "must be 0 < min <= max", self.ratio)
        check_setting(
            self.input_size is None or MIN_INPUT_SIZE <= self.input_size <= MAX_INPUT_SIZE,
            "input_size",
            f"must be within {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}",
            self.input_size,
        )
        check_setting(self.std is None or min(self.std) > 0, "std", "must be > 0 for every channel", self.std)
        check_setting(
            self.micro_batch is None or self.micro_batch >= 1, "micro_batch", "must be >= 1", self.micro_batch
        )
        check_choice(self.split_linears, "split_linears", ("auto", "on", "off"))
        check_choice(self.mixup_mode, "mixup_mode", ("batch", "pair", "elem"))
        check_choice(self.re_mode, "re_mode", ("const", "rand", "pixel"))
        check_choice(self.train_interpolation, "train_interpolation", ("random", *INTERPOLATIONS))
        if self.interpolation is not None:
            check_choice(self.interpolation, "interpolation", INTERPOLATIONS)
        if self.mixup_active:
            check_setting(
                self.batch_size % 2 == 0, "batch_size", "must be even when mixup/cutmix is on", self.batch_size
            )

    @property
    def mixup_active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


def flag(name: str) -> str:
    """The command-line flag of config key `name`."""
    return "--" + name.replace("_", "-")


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a recipe needs none, and an alias-of-aliases 'billion laughs' document
    a few hundred bytes long expands to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases such as *{one_line(event.anchor, 40)} are not allowed here", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` without aliases (`_RecipeLoader`): for recipes and YAML given in flags."""
    return yaml.load(text, Loader=_RecipeLoader)


def check_setting(ok: bool, name: str, rule: str, value: Any) -> None:
    """A `UserError` naming flag `name`, its `rule` and the `value` given, unless `ok`."""
    if not ok:
        raise UserError(f"{flag(name)} {rule}" + (f" (got {one_line(str(value), 100)})" if value is not None else ""))


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    """A `UserError` naming flag `name` and the `choices`, unless `value` is one of them."""
    check_setting(value in choices, name, f"must be one of {', '.join(choices)}", repr(value))


def means_none(value: Any) -> bool:
    """Whether a setting's value (from YAML, a flag's text or Python) is None: `none`, `null` or empty text."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` (from YAML, a flag's text or Python) as type `hint`, or a `UserError` naming the flag."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if means_none(value):
            return None
        (hint,) = (a for a in args if a is not type(None))
        args = typing.get_args(hint)
    try:
        if hint is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.strip().lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            return str(value)
        if typing.get_origin(hint) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            if len(args) == 2 and args[1] is Ellipsis:  # any number of values of one type; `none` for no values
                if len(items) == 1 and means_none(items[0]):
                    return ()
                return tuple(_coerce(name, args[0], v) for v in items if not isinstance(v, str) or v.strip())
            if len(items) != len(args):
                raise ValueError
            return tuple(_coerce(name, a, v) for a, v in zip(args, items, strict=True))
        if hint is dict:
            try:
                value = load_yaml(value) if isinstance(value, str) else value
            except yaml.YAMLError as e:
                raise UserError(f"{flag(name)} is not valid YAML ({one_line(str(e), 150)})") from None
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        raise TypeError(f"config field {name} has an unsupported type {hint}")
    raise UserError(f"{flag(name)} expects {_describe(hint)}, got {one_line(repr(value), 100)}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return "numbers" if args[-1] is Ellipsis else f"{len(args)} numbers"
    return {bool: "true or false", int: "an integer", float: "a number", dict: "a YAML mapping"}.get(hint, str(hint))


def _check_keys(keys: Any, source: str, cls: type[RunConfig] = TrainConfig) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key '{key}' in {source}{hint}")


def load_config_file(
    name_or_path: str, cls: type[RunConfig] = TrainConfig, folder: Path = CONFIG_DIR
) -> dict[str, Any]:
    """Read a YAML recipe: a path, or the name of one in `folder` (`femto_in1k`, `digits_cpu` in `mambaout/configs/`).

    Args:
        name_or_path: A file, or a recipe's name.
        cls: The config the recipe's keys belong to.
        folder: Where named recipes live (detection's and segmentation's in sub-folders of `mambaout/configs/`).

    Raises:
        UserError: the file is missing, is not a YAML mapping, or has a key that is not a config field.
    """
    path = Path(name_or_path).expanduser()
    if path.exists() and not path.is_file():
        raise UserError(f"--config: {path} is not a regular file: give a YAML recipe file or a recipe's name")
    if not path.is_file():
        named = folder / f"{name_or_path.removesuffix('.yaml')}.yaml"
        if not named.is_file():
            known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none found"
            raise UserError(f"--config: no file {path} and no recipe named '{name_or_path}' (recipes: {known})")
        path = named
    try:
        size = path.stat().st_size
        if size > _MAX_CONFIG_BYTES:
            raise UserError(f"--config: {path} is {size} bytes; a recipe is a few KB of YAML (at most 1 MiB)")
        loaded = load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"--config: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at {e.start})") from None
    except OSError as e:
        raise UserError(f"--config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config: {path} is not valid YAML ({one_line(str(e))})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"--config: {path} must be a mapping of config keys to values")
    _check_keys(loaded, str(path), cls)
    return loaded


def build_config(
    base: dict[str, Any] | None = None, *layers: dict[str, Any], cls: type[RunConfig] = TrainConfig
) -> Any:
    """A validated `cls` from `base` (defaults when None) updated by each layer in turn (file, then flags)."""
    merged = dict(base or {})
    for layer in layers:
        _check_keys(layer, "the command line", cls)
        merged.update(layer)
    _check_keys(merged, "the saved config", cls)
    return cls(**merged)


# a second spelling of a flag: torchrun's parser takes `--log` anywhere on its command line as an abbreviation of its
# own `--log-dir` (argparse's prefix matching) and stops, so a distributed run names its trackers with `--track`
_ALIASES = {"log": ("--track",)}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[RunConfig] = TrainConfig) -> None:
    """One flag per config field, defaulting to 'not given' so that only explicit flags override the recipe."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group("run settings (override the --config recipe)")
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (built-in: {default})"
        if hint is bool:
            group.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
        args = typing.get_args(hint)
        nargs = ("+" if args[-1] is Ellipsis else len(args)) if typing.get_origin(hint) is tuple else None
        metavar = f.name.upper() if nargs is None else "V" if nargs == "+" else tuple(["V"] * nargs)
        names = (flag(f.name), *_ALIASES.get(f.name, ()))
        group.add_argument(*names, dest=f.name, nargs=nargs, default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def config_overrides(args: argparse.Namespace, cls: type[RunConfig] = TrainConfig) -> dict[str, Any]:
    """The config fields given as flags in `args` (raw text, coerced by `cls`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
