"""Building a model from settings a user gave: a flag such as `--model-kwargs`, or a run's saved config.

`create_model` raises what the constructor raises, as timm's does; here a bad setting becomes one `UserError` line
naming where it came from.
"""

from collections.abc import Mapping
from typing import Any

import torch

from mambaout.errors import UserError, describe
from mambaout.models.capacity import available_bytes
from mambaout.models.factory import create_model
from mambaout.models.mambaout import MambaOut

__all__ = ["check_activation_memory", "create_configured_model"]

# what the constructor raises on a bad argument: an unknown name (TypeError), mismatched stage lists (ValueError),
# a negative or impossible size (RuntimeError from the layers)
_CONSTRUCTOR_ERRORS = (TypeError, ValueError, RuntimeError)


def create_configured_model(name: str, model_kwargs: Any, source: str, **kwargs: Any) -> MambaOut:
    """`create_model(name, **kwargs, **model_kwargs)`, with `model_kwargs` checked.

    Args:
        name: Registered variant.
        model_kwargs: Constructor arguments from the user or a saved config: a mapping; `depths` and `dims`, when
            given, lists of non-negative and positive integers.
        source: Where `model_kwargs` came from, for the message (`--model-kwargs`, a checkpoint's path).
        **kwargs: Further `create_model` arguments (pretrained, num_classes, drop_path_rate, ...).

    Raises:
        UserError: `model_kwargs` is not a mapping, or the model cannot be built from it.
    """
    if not isinstance(model_kwargs, Mapping):
        raise UserError(f"{source}: model_kwargs must be a mapping of constructor arguments, not {model_kwargs!r}")
    for key, least in (("depths", 0), ("dims", 1)):
        values = model_kwargs.get(key)
        integers = isinstance(values, (list, tuple)) and all(type(v) is int for v in values)
        if values is not None and not (integers and values and min(values) >= least):
            raise UserError(f"{source}: {key} must be a list of integers >= {least}, one per stage, got {values!r}")
    try:
        return create_model(name, **kwargs, **model_kwargs)
    except _CONSTRUCTOR_ERRORS as e:
        raise UserError(f"{source}: cannot build {name} from {dict(model_kwargs)!r}: {describe(e)}") from None


def check_activation_memory(
    model: MambaOut, batch_size: int, input_size: int, device: torch.device | str, training: bool = False
) -> None:
    """Refuse a batch and input size whose activations cannot fit in the device's free memory.

    The estimate is a lower bound, so that nothing that fits is refused: the fp32 output of the blocks' fc1 (their
    widest activation), for the largest block in inference, and for every block when training (backward needs them
    all). A batch past it would be killed by the kernel (CPU) or fail with out-of-memory mid-run (GPU).

    Raises:
        UserError: The lower bound exceeds the free memory; the message names both and what to lower.
    """
    per_block = []
    for stage, info in zip(model.stages, model.feature_info, strict=True):
        side = max(1, input_size // info["reduction"])
        per_block += [side * side * block.fc1.out_features * 4 for block in stage.blocks]
    needed = batch_size * (sum(per_block) if training else max(per_block, default=0))
    free = available_bytes(torch.device(device))
    if free is not None and needed > free:
        raise UserError(
            f"--batch-size {batch_size} at --input-size {input_size} needs at least {needed / 2**30:.1f} GiB for "
            f"{'training' if training else 'inference'} activations, and {torch.device(device).type} has "
            f"{free / 2**30:.1f} GiB free: lower --batch-size or --input-size"
        )
