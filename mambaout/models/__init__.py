"""The MambaOut network and its registry of variants."""

from mambaout.models.mambaout import MambaOut, MambaOutStage
from mambaout.models.registry import (
    ModelSpec,
    PretrainedCfg,
    WeightSource,
    create_model,
    get_spec,
    list_models,
    model_complexity,
)

__all__ = [
    "MambaOut",
    "MambaOutStage",
    "ModelSpec",
    "PretrainedCfg",
    "WeightSource",
    "create_model",
    "get_spec",
    "list_models",
    "model_complexity",
]
