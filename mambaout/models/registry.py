"""The registry: every MambaOut variant is one line here, with its pretrained config and weight sources.

Parameter/MAC counts, the `mambaout models` table, the README table and the tests are all generated from it.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mambaout.errors import UserError
from mambaout.models.mambaout import MambaOut

__all__ = ["ModelSpec", "PretrainedCfg", "WeightSource", "create_model", "get_spec", "list_models", "model_complexity"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_URL = "https://github.com/yuweihao/MambaOut/releases/download/model/{}.pth"
TIMM_HUB_URL = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"


@dataclass(frozen=True)
class WeightSource:
    """Where one set of published weights lives.

    Attributes:
        name: Short name a user passes as `pretrained=` ("official", "timm").
        url: Download URL (http(s) or file://).
        sha256: Expected SHA-256 of the file, when the publisher gives one (the official release does not).
    """

    name: str
    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class PretrainedCfg:
    """Input and evaluation settings of the published weights (timm's `pretrained_cfg` keys)."""

    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    test_input_size: tuple[int, int, int] = (3, 288, 288)
    crop_pct: float = 1.0
    test_crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    first_conv: str = "stem.conv1"
    classifier: str = "head.fc"
    top1: float | None = None
    top1_test_size: float | None = None
    sources: tuple[WeightSource, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """One registered variant: its constructor arguments and its pretrained config."""

    name: str
    arch: dict[str, Any] = field(hash=False)
    cfg: PretrainedCfg
    family: str

    def build(self, **overrides: Any) -> MambaOut:
        return MambaOut(**{**self.arch, **overrides})


_REGISTRY: dict[str, ModelSpec] = {}

_RW = dict(stem_mid_norm=False, downsample_norm_first=True, ls_init_value=1e-6, head_hidden_norm=False)


def _paper(short: str, top1: float, top1_288: float | None = None) -> PretrainedCfg:
    name = f"mambaout_{short}"
    return PretrainedCfg(
        top1=top1,
        top1_test_size=top1_288,
        sources=(
            WeightSource("official", OFFICIAL_URL.format(name)),
            WeightSource("timm", TIMM_HUB_URL.format(f"{name}.in1k")),
        ),
    )


def _timm(tag: str, top1: float, **kw: Any) -> PretrainedCfg:
    return PretrainedCfg(top1=top1, sources=(WeightSource("timm", TIMM_HUB_URL.format(tag)),), **kw)


def _register(name: str, cfg: PretrainedCfg, family: str = "paper", **arch: Any) -> None:
    _REGISTRY[name] = ModelSpec(name, arch, cfg, family)


# fmt: off
_register("mambaout_femto", _paper("femto", 78.9, 79.91), depths=(3, 3, 9, 3), dims=(48, 96, 192, 288))
_register("mambaout_kobe", _paper("kobe", 80.0), depths=(3, 3, 15, 3), dims=(48, 96, 192, 288))
_register("mambaout_tiny", _paper("tiny", 82.7, 83.45), depths=(3, 3, 9, 3), dims=(96, 192, 384, 576))
_register("mambaout_small", _paper("small", 84.1), depths=(3, 4, 27, 3), dims=(96, 192, 384, 576))
_register("mambaout_base", _paper("base", 84.2, 84.73), depths=(3, 4, 27, 3), dims=(128, 256, 512, 768))
_register("mambaout_small_rw", _timm("mambaout_small_rw.sw_e450_in1k", 84.04), "timm-rw",
          depths=(3, 4, 27, 3), dims=(96, 192, 384, 576), **_RW)
_register("mambaout_base_short_rw", _timm("mambaout_base_short_rw.sw_e500_in1k", 84.36, crop_pct=0.95), "timm-rw",
          depths=(3, 3, 25, 3), dims=(128, 256, 512, 768), expansion_ratio=3.0, conv_ratio=1.25, **_RW)
_register("mambaout_base_tall_rw", _timm("mambaout_base_tall_rw.sw_e500_in1k", 84.44, crop_pct=0.95), "timm-rw",
          depths=(3, 4, 30, 3), dims=(128, 256, 512, 768), expansion_ratio=2.5, conv_ratio=1.25, **_RW)
_register("mambaout_base_wide_rw", _timm("mambaout_base_wide_rw.sw_e500_in1k", 84.45, crop_pct=0.95), "timm-rw",
          depths=(3, 4, 27, 3), dims=(128, 256, 512, 768), expansion_ratio=3.0, conv_ratio=1.5, act_layer="silu", **_RW)
_register("mambaout_base_plus_rw", _timm("mambaout_base_plus_rw.sw_e150_in12k_ft_in1k", 86.64), "timm-rw",
          depths=(3, 4, 30, 3), dims=(128, 256, 512, 768), expansion_ratio=3.0, conv_ratio=1.5, act_layer="silu", **_RW)
# fmt: on


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style `pattern`, in registry order."""
    import fnmatch

    return [name for name in _REGISTRY if fnmatch.fnmatch(name, pattern)]


def get_spec(name: str) -> ModelSpec:
    """The spec of variant `name`; an unknown name raises `UserError` suggesting the closest."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.4)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown model '{name}': {hint}run `mambaout models` to list them")


def create_model(
    name: str,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    sha256: str | None = None,
    **kwargs: Any,
) -> MambaOut:
    """Build a registered variant, optionally with weights.

    Args:
        name: A name from `list_models()`.
        pretrained: False; True for the variant's first published source; a source name ("official", "timm");
            or a checkpoint path or URL in any layout `load_checkpoint` reads.
        num_classes: Classifier outputs; default the pretrained config's (1000). When it differs from the
            checkpoint's, the checkpoint's classifier is dropped with a warning.
        sha256: Expected SHA-256 of the downloaded or given file.
        **kwargs: Constructor overrides such as `drop_path_rate`, `drop_rate`, `in_chans`.

    Returns:
        The model in train mode, with `pretrained_cfg` (a dict) describing its expected input.
    """
    spec = get_spec(name)
    classes = spec.cfg.num_classes if num_classes is None else num_classes
    model = spec.build(num_classes=classes, **kwargs)
    model.pretrained_cfg = {**dataclasses.asdict(spec.cfg), "num_classes": classes, "architecture": name}
    if pretrained:
        from mambaout.weights import load_pretrained

        load_pretrained(model, spec, pretrained, sha256=sha256)
    return model


def model_complexity(name: str, img_size: tuple[int, int] = (224, 224), **overrides: Any) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of `name` for one image, counted on the meta device (no memory, fast).

    MACs are `FlopCounterMode` FLOPs / 2, the convention of the paper's table; `overrides` are constructor arguments
    (e.g. `token_mixer="conv_ssm"`, whose selective scan is counted by its analytic formula, `scan_macs`).
    """
    with torch.device("meta"):
        model = get_spec(name).build(**overrides)
        x = torch.empty(1, 3, *img_size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(x)
    return params, counter.get_total_flops() // 2
