"""Where MambaOut weights come from and how they get into a model.

- `layouts`: the three key layouts (ours, timm, official), detection and conversion.
- `io`: safe reading (never unpickling code) and atomic writing of `.pth` / `.safetensors` files.
- `download`: fetching published weights once into the torch.hub cache, with SHA-256 checks.
- `hub`: hub folders in timm's format (`config.json` + `model.safetensors`), on disk or in huggingface_hub's cache.
- `loading`: unwrapping training checkpoints and loading any layout into a model, with clear errors.
"""

from mambaout.weights.download import download_cached
from mambaout.weights.io import save_state_dict
from mambaout.weights.layouts import LAYOUTS, convert_state_dict, detect_layout
from mambaout.weights.loading import (
    checkpoint_num_classes,
    first_nonfinite,
    load_checkpoint,
    our_layout,
    read_checkpoint_path,
    read_state_dict,
    unwrap_state_dict,
)

__all__ = [
    "LAYOUTS",
    "checkpoint_num_classes",
    "convert_state_dict",
    "detect_layout",
    "download_cached",
    "first_nonfinite",
    "load_checkpoint",
    "our_layout",
    "read_checkpoint_path",
    "read_state_dict",
    "save_state_dict",
    "unwrap_state_dict",
]
