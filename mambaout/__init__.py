"""mambaout: the MambaOut vision backbones (Yu & Wang, CVPR 2025) — models, weights, training, fast inference,
and the paper's dense models (Mask R-CNN, UperNet)."""

from mambaout.dense import create_detector, create_segmenter
from mambaout.errors import UserError
from mambaout.fast import optimize_for_inference, tune_cpu_allocator
from mambaout.models import MambaOut, create_model, list_models, list_pretrained, model_complexity, save_pretrained
from mambaout.weights import load_checkpoint

__all__ = [
    "MambaOut",
    "UserError",
    "create_detector",
    "create_model",
    "create_segmenter",
    "list_models",
    "list_pretrained",
    "load_checkpoint",
    "model_complexity",
    "optimize_for_inference",
    "save_pretrained",
    "tune_cpu_allocator",
]
__version__ = "0.1.0"
