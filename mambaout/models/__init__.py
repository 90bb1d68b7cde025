"""The MambaOut network, its registry of variants and tags, their published weights, and timm's creation API over
them."""

from mambaout.models.factory import create_model, save_pretrained
from mambaout.models.features import MambaOutFeatures
from mambaout.models.mambaout import MambaOut, MambaOutStage
from mambaout.models.pretrained import load_pretrained, pretrained_location
from mambaout.models.registry import (
    ModelSpec,
    PretrainedCfg,
    WeightSource,
    get_pretrained_cfg,
    get_spec,
    list_models,
    list_pretrained,
    model_complexity,
)

__all__ = [
    "MambaOut",
    "MambaOutFeatures",
    "MambaOutStage",
    "ModelSpec",
    "PretrainedCfg",
    "WeightSource",
    "create_model",
    "get_pretrained_cfg",
    "get_spec",
    "list_models",
    "list_pretrained",
    "load_pretrained",
    "model_complexity",
    "pretrained_location",
    "save_pretrained",
]
