"""What the demo page computes, as plain functions: the top classes of an image with the time the model took, and a
class-activation map placed on the photo.

An image reaches the model as `mambaout predict` reads it (`load_image`, then the classifier's evaluation transform),
so the page and the command give the same answer for the same file.
"""

import math
import time
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mambaout.data.transforms import eval_transform

__all__ = [
    "CAM_METHODS",
    "Prediction",
    "activation_map",
    "blend_map",
    "crop_box",
    "default_stage",
    "input_sizes",
    "model_input",
    "photo_map",
    "top_classes",
]

# "grad-cam": Grad-CAM on a stage's output; "head": the classifier head applied at each position of the last stage's
# map (the class-activation map of a linear head, generalised to MambaOut's MLP head)
CAM_METHODS = ("grad-cam", "head")
_HEAT_WEIGHT = 0.5  # the colormap's share of the blend inside the model's crop
_UNSEEN_BRIGHTNESS = 0.35  # outside it (what the model never saw) the photo is only dimmed


@dataclass
class Prediction:
    """The top classes of one image.

    Attributes:
        indices: Class indices, most probable first.
        probabilities: Their softmax probabilities.
        seconds: Wall time of the model's forward pass alone (device synchronised), in seconds.
    """

    indices: list[int]
    probabilities: list[float]
    seconds: float


def input_sizes(native: int) -> list[int]:
    """Square input sizes to offer around a model's own: 3/4, 1, 5/4, 3/2 and 2 times it, multiples of 8, >= 32."""
    return sorted({native} | {max(32, native * k // 256 * 8) for k in (24, 32, 40, 48, 64)})


def model_input(image: Image.Image, data: dict[str, Any]) -> torch.Tensor:
    """An RGB photo -> the model's input `[1, 3, S, S]` (resize, center crop, normalize as `data` says)."""
    return eval_transform(data)(image).unsqueeze(0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def top_classes(model: nn.Module, x: torch.Tensor, top: int) -> Prediction:
    """The `top` most probable classes of one image and the forward pass's wall time.

    Args:
        model: A classifier in eval mode (a `MambaOut` or its `optimize_for_inference` twin).
        x: The image as `model_input` makes it, `[1, 3, S, S]`.
        top: How many classes (at most the model's).
    """
    device = next(model.parameters()).device
    x = x.to(device)
    with torch.inference_mode():
        _synchronize(device)
        start = time.perf_counter()
        logits = model(x)  # [1, num_classes]
        _synchronize(device)
        seconds = time.perf_counter() - start
    probabilities, indices = logits.float().softmax(dim=1)[0].topk(min(top, logits.shape[1]))
    return Prediction(indices.tolist(), probabilities.tolist(), seconds)


def default_stage(model: nn.Module, input_size: int, cells: int = 4) -> int:
    """The last stage whose map is at least `cells` wide at `input_size` (a 1×1 map shows nothing), else 0."""
    wide = [i for i, info in enumerate(model.feature_info) if -(-input_size // info["reduction"]) >= cells]
    return wide[-1] if wide else 0


def activation_map(
    model: nn.Module, x: torch.Tensor, class_index: int, method: str = "grad-cam", stage: int = -1
) -> torch.Tensor:
    """Where `model` sees class `class_index` in one image, on a stage's grid.

    Args:
        model: A reference `MambaOut` (it is differentiated, so not the inference-only twin).
        x: The image as `model_input` makes it, `[1, 3, S, S]`.
        class_index: The class to explain.
        method: "grad-cam": the stage's output channels weighted by the mean gradient of the class's logit, ReLU;
            "head": the class's softmax probability when the head classifies each position of the last stage's
            map on its own (the class-activation map of a linear head, for MambaOut's MLP head).
        stage: Grad-CAM's stage (negative from the end); "head" takes only the last.

    Returns:
        `[h, w]` on the CPU (the stage's grid, `S / reduction` rounded up), scaled so that its largest value is 1
        (all zeros when nothing is positive).
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
    last = len(model.stages) - 1
    stage = stage % (last + 1)
    if method == "head" and stage != last:
        raise ValueError(f"the head reads only the last stage ({last}), not stage {stage}")
    x = x.to(next(model.parameters()).device)
    with torch.no_grad():
        features = model.stages[: stage + 1](model.stem(x))  # [1, h, w, C] channels-last
    if method == "grad-cam":
        with torch.enable_grad():
            features.requires_grad_()
            score = model.forward_head(model.stages[stage + 1 :](features))[0, class_index]
            (gradient,) = torch.autograd.grad(score, features)  # the map's gradient only: no parameter .grad
        heat = (gradient.mean(dim=(1, 2), keepdim=True) * features).sum(dim=-1)[0].relu()  # [h, w]
    else:
        _, height, width, channels = features.shape
        with torch.no_grad():
            # each position as a 1x1 map of its own: pooled alone, classified as if it were the whole image
            logits = model.forward_head(features.reshape(height * width, 1, 1, channels))  # [h * w, num_classes]
        heat = logits.float().softmax(dim=-1)[:, class_index].reshape(height, width)
    heat = heat.detach().float().cpu()
    peak = heat.max()
    return heat / peak if peak > 0 else torch.zeros_like(heat)


def crop_box(size: tuple[int, int], data: dict[str, Any]) -> tuple[float, float, float, float]:
    """The square the model sees, in the pixel coordinates of a photo of `size` (width, height).

    timm's evaluation transform resizes the shorter side to `floor(S / crop_pct)` and center-crops `S x S`; the
    square extends past the photo when `crop_pct > 1` (the crop pads).

    Returns:
        (left, top, right, bottom).
    """
    if data.get("crop_mode", "center") != "center":
        raise ValueError(f"only center crops are mapped back onto the photo, not {data['crop_mode']!r}")
    width, height = size
    side = data["input_size"][-1]
    scale = math.floor(side / data["crop_pct"]) / min(width, height)
    seen = side / scale
    left, top = (width - seen) / 2, (height - seen) / 2
    return left, top, left + seen, top + seen


def photo_map(heat: torch.Tensor, size: tuple[int, int], data: dict[str, Any]) -> np.ndarray:
    """An `activation_map` laid over a photo of `size` (width, height): `[H, W]` in [0, 1], zero outside the crop.

    Args:
        heat: `[h, w]` from `activation_map`.
        size: The photo's (width, height), any scale of the one classified.
        data: The classifier's data config (input size, crop_pct).
    """
    width, height = size
    left, top, right, bottom = (round(v) for v in crop_box(size, data))
    up = F.interpolate(
        heat[None, None].float(),
        size=(max(1, bottom - top), max(1, right - left)),
        mode="bilinear",
        align_corners=False,
    )
    up = up[0, 0].clamp(0, 1).numpy()  # [bottom - top, right - left]
    # the square can reach past the photo (crop_pct > 1 pads): keep the part on it
    x1, y1, x2, y2 = max(0, left), max(0, top), min(width, right), min(height, bottom)
    placed = np.zeros((height, width), dtype=np.float32)
    placed[y1:y2, x1:x2] = up[y1 - top : y2 - top, x1 - left : x2 - left]
    return placed


def blend_map(photo: Image.Image, heat: np.ndarray, box: tuple[float, float, float, float]) -> Image.Image:
    """`heat` (`[H, W]` in [0, 1], from `photo_map`) colored with the jet map over `photo`; outside `box` (the part
    the model did not see) the photo is dimmed instead."""
    rgb = np.asarray(photo.convert("RGB"), dtype=np.float32) / 255  # [H, W, 3]
    colors = matplotlib.colormaps["jet"](heat)[..., :3]  # [H, W, 3]
    blended = (1 - _HEAT_WEIGHT) * rgb + _HEAT_WEIGHT * colors
    rows, cols = np.mgrid[: rgb.shape[0], : rgb.shape[1]]
    left, top, right, bottom = box
    seen = (
        (cols >= math.floor(left)) & (cols < math.ceil(right)) & (rows >= math.floor(top)) & (rows < math.ceil(bottom))
    )
    blended = np.where(seen[..., None], blended, _UNSEEN_BRIGHTNESS * rgb)
    return Image.fromarray(np.rint(blended * 255).astype(np.uint8))
