"""How large a network is before it is built, and whether the machine has room for it.

A config file or a flag can describe a network of terabytes (`num_classes` 10**12, `dims` of a million): building it
dies in the allocator, or takes all memory and is killed. `check_model_size` counts the tensors first, on the meta
device (no memory), with a probe of at most one block per stage: the blocks of a stage hold the same tensors, so the
others are counted as copies of its first, and a depth of millions costs nothing to count.
"""

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mambaout.errors import UserError, one_line
from mambaout.models.mambaout import MambaOut

__all__ = ["MAX_BLOCKS", "MAX_PARAMETERS", "available_bytes", "check_model_size", "count_parameters"]

MAX_PARAMETERS = 2**31  # 8 GiB in float32: 25 times mambaout_base, the largest registered variant
# blocks in all stages: 100 times mambaout_base's 37; a tiny block still costs a few Python modules, so a million
# of them take minutes and gigabytes to build however few their parameters
MAX_BLOCKS = 3700
# the constructor arguments that decide the size, named when a network is refused
_SIZE_ARGS = ("num_classes", "in_chans", "depths", "dims", "expansion_ratio", "conv_ratio", "kernel_size")


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`: CUDA's free memory, or Linux's MemAvailable; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _elements(module: nn.Module) -> int:
    return sum(t.numel() for t in itertools.chain(module.parameters(), module.buffers()))


def count_parameters(args: Mapping[str, Any]) -> int:
    """The elements of every parameter and buffer of `MambaOut(**args)`, counted without allocating them.

    Args:
        args: `MambaOut` constructor arguments.

    Raises:
        What the constructor raises on bad arguments (the probe runs it, on the meta device).
    """
    depths, dims = args.get("depths"), args.get("dims")
    # a probe of one block per stage, when the constructor would get as far as the blocks; otherwise the arguments
    # as given, so that its error names the caller's values
    counted = (
        isinstance(depths, Sequence)
        and all(isinstance(d, int) for d in depths)
        and isinstance(dims, Sequence)
        and len(dims) == len(depths)
    )
    probe_args = {**args, "depths": [min(d, 1) for d in depths]} if counted else args
    with torch.device("meta"):
        probe = MambaOut(**probe_args)
    total = _elements(probe)
    if counted:
        stages = zip(depths, probe.stages, strict=True)
        total += sum((depth - 1) * _elements(stage.blocks[0]) for depth, stage in stages if depth > 1)
    return total


def check_model_size(
    name: str, arch: Mapping[str, Any], given: Mapping[str, Any], where: str, device: torch.device
) -> None:
    """Refuse a network of more than `MAX_PARAMETERS` elements or `MAX_BLOCKS` blocks, or whose weights need more
    memory than is free.

    Args:
        name: The variant, for the message.
        arch: The variant's constructor arguments.
        given: The caller's arguments over them (a config's, a flag's): the size-deciding ones are named.
        where: What gave them (a config file, a model name), for the message.
        device: Where the network would be built; a "meta" build takes no memory.

    Raises:
        UserError: Too large; the message gives the count, the memory it needs and the bound it passes.
        What the constructor raises on bad arguments.
    """
    depths = {**arch, **given}.get("depths")
    blocks = sum(depths) if isinstance(depths, Sequence) and all(isinstance(d, int) for d in depths) else 0
    if blocks > MAX_BLOCKS:
        shown = one_line(repr(given.get("depths", depths)), 60)
        raise UserError(f"{where}: {name} with depths={shown} would have {blocks:,} blocks, more than the "
                        f"{MAX_BLOCKS:,} a network may have: lower them")  # fmt: skip
    count = count_parameters({**arch, **given})
    need = count * torch.finfo(torch.get_default_dtype()).bits // 8
    free = None if device.type == "meta" else available_bytes(device)
    if count <= MAX_PARAMETERS and (free is None or need <= free):
        return
    bound = (
        f"the {MAX_PARAMETERS:,} parameters a network may have"
        if count > MAX_PARAMETERS
        else f"the {free / 2**30:,.2f} GiB free on {device.type}"
    )
    values = ", ".join(f"{k}={one_line(repr(given[k]), 60)}" for k in _SIZE_ARGS if k in given) or "its defaults"
    raise UserError(
        f"{where}: {name} with {values} would have {count:,} parameters ({need / 2**30:,.2f} GiB), more than "
        f"{bound}: lower them"
    )
