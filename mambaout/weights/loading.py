"""From a path, URL, hub folder or registered source to weights in a model: unwrap, convert, check the fit, load.

Every user mistake (wrong file, wrong variant, unknown source) becomes one `UserError` line naming the file. Two
misfits are tolerated, as timm tolerates them: a classifier with a different number of classes is dropped with a
warning so that fine-tuning starts from the pretrained backbone, and the stem's first conv is adapted to a model with
another number of input channels (timm's `adapt_input_conv`).
"""

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import adapt_input_conv
from torch import nn

from mambaout.errors import UserError
from mambaout.weights.download import download_cached, is_url
from mambaout.weights.hub import hub_weights_file, split_source
from mambaout.weights.io import file_format, read_file, verify_sha256
from mambaout.weights.layouts import convert_state_dict

__all__ = [
    "checkpoint_num_classes",
    "first_nonfinite",
    "load_checkpoint",
    "our_layout",
    "read_checkpoint_path",
    "read_state_dict",
    "unwrap_state_dict",
]

# Keys under which training scripts nest the weights: plain first, then EMA (timm, our train engine, DeiT-style).
_MODEL_KEYS = ("model", "state_dict")
_EMA_KEYS = ("model_ema", "state_dict_ema", "ema")
# Prefixes added by DistributedDataParallel / timm's ModelEmaV2 (`module.`) and torch.compile (`_orig_mod.`).
_WRAPPER_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")
_CLASSIFIER = ("head.fc.weight", "head.fc.bias")
_FIRST_CONV = "stem.conv1.weight"
_SHOW = 5  # keys listed per kind in a misfit message


def unwrap_state_dict(checkpoint: Any, prefer_ema: bool = False, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object.

    Args:
        checkpoint: A state dict, or a dict holding one under "model"/"state_dict" (and optionally EMA weights
            under "model_ema"/"state_dict_ema"/"ema"), like the checkpoints of timm or `mambaout train`.
        prefer_ema: Take the EMA weights when the checkpoint has them (a warning when it has none).
        name: What to call the checkpoint in messages.

    Returns:
        Parameter name -> tensor, with `module.` / `_orig_mod.` prefixes removed.

    Raises:
        UserError: No weights found, or values that are not tensors.
    """
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{name} holds a {type(checkpoint).__name__}, not a state dict")
    if prefer_ema:
        ema = next((checkpoint[k] for k in _EMA_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if ema is None:
            warnings.warn(f"{name} has no EMA weights; loading its model weights", stacklevel=2)
        else:
            checkpoint = ema
    while inner := next((checkpoint[k] for k in _MODEL_KEYS if isinstance(checkpoint.get(k), Mapping)), None):
        checkpoint = inner
    others = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if len(others) == len(checkpoint):
        found = ", ".join(map(str, others[:8])) or "none"
        raise UserError(
            f"{name} holds no weights: expected a state dict or one under 'model' or 'state_dict' (keys found: {found})"
        )
    if others:
        kind = type(checkpoint[others[0]]).__name__
        raise UserError(f"{name} is not a state dict: '{others[0]}' holds a {kind}, not a tensor")
    tensors = {_WRAPPER_PREFIX.sub("", str(k)): v for k, v in checkpoint.items()}
    if len(tensors) != len(checkpoint):
        raise UserError(f"{name} has keys that differ only by a 'module.' or '_orig_mod.' prefix")
    bad = first_nonfinite(tensors)
    if bad is not None:
        # one location and one text per checkpoint: Python shows it once however often the checkpoint is unwrapped
        warnings.warn(
            f"{name} holds non-finite weights (NaN or inf), first in '{bad}': outputs will be NaN", stacklevel=1
        )
    return tensors


def first_nonfinite(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None when all are finite."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            return key
    return None


def _resolve_file(source: str | os.PathLike, sha256: str | None, cache_dir: str | os.PathLike | None) -> Path:
    location = os.fspath(source)
    hub, rest = split_source(location)
    if hub:
        path = hub_weights_file(hub, rest, cache_dir)
    elif is_url(location):
        return download_cached(location, sha256)
    else:
        path = Path(location).expanduser()
    if sha256:
        file_format(path)  # report a missing or empty file as such, not as a hash mismatch
        verify_sha256(path, sha256)
    return path


def read_state_dict(
    source: str | os.PathLike,
    sha256: str | None = None,
    prefer_ema: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint file, URL or hub folder, in whatever layout it stores them.

    Args:
        source: A `.pth`/`.pt`/`.safetensors` path; an http(s):// or file:// URL (downloaded once into the
            torch.hub cache); or a hub folder in timm's format, `local-dir:DIR` or `hf-hub:ORG/REPO[@REVISION]`
            (from huggingface_hub's cache, downloaded into it when missing).
        sha256: Expected hex SHA-256 of the file.
        prefer_ema: Take the checkpoint's EMA weights when it has them.
        cache_dir: huggingface_hub's cache folder for `hf-hub:` sources; default its own.

    Returns:
        Parameter name -> tensor on the CPU.

    Raises:
        UserError: Download failure, hash mismatch, unreadable or unsafe file, or no weights in it.
    """
    location = os.fspath(source)
    path = _resolve_file(source, sha256, cache_dir)
    if not is_url(location):
        return unwrap_state_dict(read_file(path), prefer_ema=prefer_ema, name=str(path))
    try:
        loaded = read_file(path)
    except UserError:  # a copy that went bad in the cache: fetched once more, and named if that fails too
        path.unlink(missing_ok=True)
        path = download_cached(location, sha256)
        try:
            loaded = read_file(path)
        except UserError as e:
            path.unlink(missing_ok=True)
            raise UserError(f"{e} (downloaded twice from {location} into the cache; nothing is kept)") from None
    return unwrap_state_dict(loaded, prefer_ema=prefer_ema, name=str(path))


def our_layout(state_dict: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """`state_dict` (ours, timm's or the official layout) in our layout; a `UserError` naming `name` otherwise."""
    try:
        return convert_state_dict(state_dict, to="mambaout")
    except UserError as e:
        raise UserError(f"{name}: {e}") from None


def checkpoint_num_classes(weights: Mapping[str, torch.Tensor]) -> int:
    """The classifier outputs of our-layout `weights` (0 when they have no classifier)."""
    classifier = weights.get(_CLASSIFIER[0])
    return 0 if classifier is None else classifier.shape[0]


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg["architecture"] if isinstance(cfg, dict) and "architecture" in cfg else type(model).__name__


def _listing(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    sha256: str | None = None,
    prefer_ema: bool = False,
    name: str | None = None,
) -> tuple[list[str], list[str]]:
    """Load weights in any layout (ours, timm, official) into a MambaOut model.

    A classifier (`head.fc`) whose shape differs from the model's (another number of classes) is dropped with a
    warning and the model keeps its freshly initialised one. Any other misfit raises. A model on the meta device
    (built under `torch.device("meta")`) is given the checkpoint's tensors instead of copies.

    Args:
        model: The model to fill, in place.
        source: A checkpoint path or URL (see `read_state_dict`), or an already loaded state dict / checkpoint dict.
        strict: Require every model weight to be present and every checkpoint weight to be used. Shape
            mismatches outside the classifier raise either way.
        sha256: Expected hex SHA-256 of the file.
        prefer_ema: Take the checkpoint's EMA weights when it has them.
        name: What to call the weights in messages; default the path, or "the given state dict".

    Returns:
        `(missing_keys, unexpected_keys)` as returned by `nn.Module.load_state_dict`.

    Raises:
        UserError: Unreadable checkpoint, not MambaOut weights, or weights of another variant (the message lists
            the first missing keys, unexpected keys and shape mismatches).
    """
    if isinstance(source, Mapping):
        name = name or "the given state dict"
        state_dict = unwrap_state_dict(source, prefer_ema=prefer_ema, name=name)
    else:
        name = name or os.fspath(source)
        state_dict = read_state_dict(source, sha256=sha256, prefer_ema=prefer_ema)
    state_dict = our_layout(state_dict, name)

    expected = model.state_dict()
    state_dict = _adapt_first_conv(state_dict, expected)
    theirs, ours = state_dict.get(_CLASSIFIER[0]), expected.get(_CLASSIFIER[0])
    # another number of classes on the same hidden width is a fine-tuning start, not a misfit
    drop_classifier = theirs is not None and (
        ours is None or (theirs.shape[0] != ours.shape[0] and theirs.shape[1:] == ours.shape[1:])
    )
    if drop_classifier:
        state_dict = {k: v for k, v in state_dict.items() if k not in _CLASSIFIER}
        expected = {k: v for k, v in expected.items() if k not in _CLASSIFIER}

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        problems = [
            f"{len(items)} {kind} ({_listing(items)})"
            for kind, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches, checkpoint vs model", mismatched),
            )
            if items
        ]
        raise UserError(
            f"{name} does not fit {_architecture(model)}: {'; '.join(problems)}; is it a checkpoint of another variant?"
        )
    if drop_classifier:
        classes = "no classifier" if ours is None else f"{ours.shape[0]} classes"
        warnings.warn(
            f"{name}: its classifier has {theirs.shape[0]} classes and the model {classes}; "
            "keeping the model's own (freshly initialised) classifier",
            stacklevel=2,
        )
    # a model built on the meta device (no init time, no memory) takes the checkpoint's tensors themselves
    assign = any(p.is_meta for p in model.parameters())
    return model.load_state_dict(state_dict, strict=False, assign=assign)


def _adapt_first_conv(
    state_dict: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The stem's first conv of a 3-channel checkpoint fitted to a model with other input channels, as timm does.

    Only the input-channel dimension may differ; any other mismatch is left for the fit check to report.
    """
    theirs, ours = state_dict.get(_FIRST_CONV), expected.get(_FIRST_CONV)
    if theirs is None or ours is None or theirs.shape == ours.shape:
        return state_dict
    if theirs.ndim != 4 or theirs.shape[0] != ours.shape[0] or theirs.shape[2:] != ours.shape[2:]:
        return state_dict
    try:
        adapted = adapt_input_conv(ours.shape[1], theirs)
    except (NotImplementedError, ValueError):  # channel counts timm cannot map; reported by the fit check
        return state_dict
    return {**state_dict, _FIRST_CONV: adapted}


def read_checkpoint_path(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> tuple[dict[str, torch.Tensor], tuple[str, dict[str, Any]] | None]:
    """The weights `create_model(checkpoint_path=...)` loads, in our layout: its EMA weights when it has them, as timm;
    and how the model was built when the file is a `mambaout train` checkpoint.

    Args:
        path: Any source `read_state_dict` reads.
        cache_dir: huggingface_hub's cache folder for `hf-hub:` sources.

    Returns:
        The weights, and the run's (model name, model_kwargs) from its saved config, or None for other files.

    Raises:
        UserError: Unreadable checkpoint, not MambaOut weights, or a run config whose model_kwargs is no mapping of
            argument names.
    """
    file = _resolve_file(path, None, cache_dir)
    checkpoint = read_file(file)
    has_ema = isinstance(checkpoint, Mapping) and any(isinstance(checkpoint.get(k), Mapping) for k in _EMA_KEYS)
    weights = our_layout(unwrap_state_dict(checkpoint, prefer_ema=has_ema, name=str(file)), str(file))
    return weights, _run_model(checkpoint, file)


def _run_model(checkpoint: Any, file: Path) -> tuple[str, dict[str, Any]] | None:
    """(model name, model_kwargs) a `mambaout train` checkpoint's config built its model with, or None."""
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), str):
        return None
    kwargs = config.get("model_kwargs") or {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise UserError(f"{file}: its config's model_kwargs is not a mapping of constructor arguments")
    return config["model"], dict(kwargs)
