"""The registry: every MambaOut variant is one line here, with its pretrained tags (configs) and weight sources.

As in timm, a variant's published weights are its tags (`mambaout_tiny.in1k`); a bare name means the first tag.
Parameter/MAC counts, the `mambaout models` tables, the README table and the tests are all generated from it.
"""

import dataclasses
import difflib
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import timm.models
import torch
from torch.utils.flop_counter import FlopCounterMode

from mambaout.errors import UserError
from mambaout.models.mambaout import MambaOut

__all__ = [
    "ModelSpec",
    "PretrainedCfg",
    "WeightSource",
    "get_pretrained_cfg",
    "get_spec",
    "list_models",
    "list_pretrained",
    "model_complexity",
    "split_tag",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_URL = "https://github.com/yuweihao/MambaOut/releases/download/model/{}.pth"
TIMM_HUB_ID = "timm/{}.{}"  # timm's hub repository of one tag: timm/<name>.<tag>
HF_HUB = "hf-hub:"


@dataclass(frozen=True)
class WeightSource:
    """Where one set of published weights lives.

    Attributes:
        name: Short name a user passes as `pretrained=` ("official", "timm").
        url: Download URL (http(s) or file://), or `hf-hub:<repo id>` for a Hugging Face Hub repository.
        sha256: Expected SHA-256 of the file, when the publisher gives one (the official release does not).
    """

    name: str
    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class PretrainedCfg:
    """One pretrained tag: the input and evaluation settings of one set of published weights (timm's keys)."""

    tag: str = ""
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    test_input_size: tuple[int, int, int] = (3, 288, 288)
    crop_pct: float = 1.0
    test_crop_pct: float | None = None  # None: crop_pct
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    first_conv: str = "stem.conv1"
    classifier: str = "head.fc"
    license: str = "apache-2.0"
    top1: float | None = None
    top1_test_size: float | None = None
    sources: tuple[WeightSource, ...] = ()

    def timm_dict(self, architecture: str) -> dict[str, Any]:
        """This tag as timm's `pretrained_cfg` dict of `architecture` (the keys timm and its tools read)."""
        urls = [s.url for s in self.sources if not s.url.startswith(HF_HUB)]
        hubs = [s.url.removeprefix(HF_HUB) for s in self.sources if s.url.startswith(HF_HUB)]
        shared = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)} & {
            f.name for f in dataclasses.fields(self)
        }
        return timm.models.PretrainedCfg(
            **{key: getattr(self, key) for key in shared - {"tag"}},
            url=urls[0] if urls else None,
            hf_hub_id=hubs[0] if hubs else None,
            architecture=architecture,
            tag=self.tag or None,
            pool_size=(self.input_size[1] // 32, self.input_size[2] // 32),  # the last stage's map at input_size
        ).to_dict()


@dataclass(frozen=True)
class ModelSpec:
    """One registered variant: its constructor arguments and its pretrained tags.

    Attributes:
        name: The variant's name.
        arch: `MambaOut` constructor arguments.
        cfg: The default tag (what a bare name means).
        family: "paper" (the paper's five, also in the official release) or "timm-rw".
        other_tags: The variant's further tags, in timm's order.
    """

    name: str
    arch: dict[str, Any] = field(hash=False)
    cfg: PretrainedCfg
    family: str
    other_tags: tuple[PretrainedCfg, ...] = ()

    @property
    def tags(self) -> tuple[PretrainedCfg, ...]:
        """Every tag, the default first."""
        return (self.cfg, *self.other_tags)

    def tag_cfg(self, tag: str | None = None) -> PretrainedCfg:
        """The config of `tag` (None or "": the default); an unknown tag raises `UserError` listing the tags."""
        if not tag:
            return self.cfg
        for cfg in self.tags:
            if cfg.tag == tag:
                return cfg
        known = ", ".join(f"'{self.name}.{c.tag}'" for c in self.tags if c.tag) or "none"
        raise UserError(f"{self.name} has no pretrained tag '{tag}': its tags are {known}")

    def build(self, **overrides: Any) -> MambaOut:
        return MambaOut(**{**self.arch, **overrides})


_REGISTRY: dict[str, ModelSpec] = {}

_RW = dict(stem_mid_norm=False, downsample_norm_first=True, ls_init_value=1e-6, head_hidden_norm=False)


def _tag(tag: str, top1: float | None = None, top1_test_size: float | None = None, **cfg: Any) -> PretrainedCfg:
    return PretrainedCfg(tag=tag, top1=top1, top1_test_size=top1_test_size, **cfg)


def _register(name: str, tags: PretrainedCfg | tuple[PretrainedCfg, ...], family: str = "paper", **arch: Any) -> None:
    """Register a variant; every tag is on timm's hub, and the paper's in1k weights also in the official release."""
    cfgs = []
    for cfg in tags if isinstance(tags, tuple) else (tags,):
        sources = [WeightSource("timm", HF_HUB + TIMM_HUB_ID.format(name, cfg.tag))]
        if family == "paper":
            sources.insert(0, WeightSource("official", OFFICIAL_URL.format(name)))
        cfgs.append(dataclasses.replace(cfg, sources=tuple(sources)))
    _REGISTRY[name] = ModelSpec(name, arch, cfgs[0], family, tuple(cfgs[1:]))


# fmt: off
_register("mambaout_femto", _tag("in1k", 78.9, 79.91), depths=(3, 3, 9, 3), dims=(48, 96, 192, 288))
_register("mambaout_kobe", _tag("in1k", 80.0), depths=(3, 3, 15, 3), dims=(48, 96, 192, 288))
_register("mambaout_tiny", _tag("in1k", 82.7, 83.45), depths=(3, 3, 9, 3), dims=(96, 192, 384, 576))
_register("mambaout_small", _tag("in1k", 84.1), depths=(3, 4, 27, 3), dims=(96, 192, 384, 576))
_register("mambaout_base", _tag("in1k", 84.2, 84.73), depths=(3, 4, 27, 3), dims=(128, 256, 512, 768))
_register("mambaout_small_rw", _tag("sw_e450_in1k", 84.04), "timm-rw",
          depths=(3, 4, 27, 3), dims=(96, 192, 384, 576), **_RW)
_register("mambaout_base_short_rw", _tag("sw_e500_in1k", 84.36, crop_pct=0.95, test_crop_pct=1.0), "timm-rw",
          depths=(3, 3, 25, 3), dims=(128, 256, 512, 768), expansion_ratio=3.0, conv_ratio=1.25, **_RW)
_register("mambaout_base_tall_rw", _tag("sw_e500_in1k", 84.44, crop_pct=0.95, test_crop_pct=1.0), "timm-rw",
          depths=(3, 4, 30, 3), dims=(128, 256, 512, 768), expansion_ratio=2.5, conv_ratio=1.25, **_RW)
_register("mambaout_base_wide_rw", _tag("sw_e500_in1k", 84.45, crop_pct=0.95, test_crop_pct=1.0), "timm-rw",
          depths=(3, 4, 27, 3), dims=(128, 256, 512, 768), expansion_ratio=3.0, conv_ratio=1.5, act_layer="silu", **_RW)
_register("mambaout_base_plus_rw", (
              _tag("sw_e150_in12k_ft_in1k", 86.64),
              _tag("sw_e150_r384_in12k_ft_in1k", input_size=(3, 384, 384), test_input_size=(3, 384, 384),
                   crop_mode="squash"),
              _tag("sw_e150_in12k", num_classes=11821),
          ), "timm-rw",
          depths=(3, 4, 30, 3), dims=(128, 256, 512, 768), expansion_ratio=3.0, conv_ratio=1.5, act_layer="silu", **_RW)
# fmt: on


def split_tag(name: str) -> tuple[str, str | None]:
    """`"mambaout_tiny.in1k"` -> `("mambaout_tiny", "in1k")`; a bare name has tag None."""
    base, _, tag = name.partition(".")
    return base, tag or None


def _matches(name: str, patterns: str | Sequence[str]) -> bool:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    return any(fnmatch.fnmatch(name, p) for p in patterns if p)


def list_models(
    filter: str | Sequence[str] = "",
    pretrained: bool = False,
    exclude_filters: str | Sequence[str] = "",
    include_tags: bool | None = None,
) -> list[str]:
    """Registered names in registry order, as timm's `list_models`.

    Args:
        filter: Shell-style pattern(s) the names must match ("" or "*": all), e.g. "*_rw" or "mambaout_base*".
        pretrained: Only variants (tags) with published weights.
        exclude_filters: Pattern(s) of names to leave out.
        include_tags: List `name.tag` for every tag; default `pretrained`, so `list_models(pretrained=True)`
            lists tagged names as timm's does.
    """
    include_tags = pretrained if include_tags is None else include_tags
    names = []
    for spec in _REGISTRY.values():
        cfgs = [cfg for cfg in spec.tags if cfg.sources or not pretrained]
        if include_tags:
            names += [f"{spec.name}.{cfg.tag}" if cfg.tag else spec.name for cfg in cfgs]
        elif cfgs:
            names.append(spec.name)
    wanted = filter if filter not in ("", "*", ()) else "*"
    return [n for n in names if _matches(n, wanted) and not _matches(n, exclude_filters)]


def list_pretrained(filter: str | Sequence[str] = "", exclude_filters: str | Sequence[str] = "") -> list[str]:
    """Every tagged name with published weights (`name.tag`), as timm's `list_pretrained`."""
    return list_models(filter, pretrained=True, exclude_filters=exclude_filters)


def get_spec(name: str) -> ModelSpec:
    """The spec of variant `name` (a `name.tag` is checked for its tag); unknown names raise `UserError`."""
    base, tag = split_tag(name)
    if base not in _REGISTRY:
        close = difflib.get_close_matches(base, list(_REGISTRY), n=1, cutoff=0.4)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown model '{name}': {hint}run `mambaout models` to list them")
    spec = _REGISTRY[base]
    spec.tag_cfg(tag)
    return spec


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    """The pretrained tag `name` means: `name.tag`, or the variant's default tag for a bare name."""
    return get_spec(name).tag_cfg(split_tag(name)[1])


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
