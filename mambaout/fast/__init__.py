"""The fused inference path (and the training-step levers): same function as `mambaout.models`, held to it by tests."""

from mambaout.fast.allocator import cpu_allocator, tune_cpu_allocator
from mambaout.fast.fused import FusedGatedCNNBlock
from mambaout.fast.kernels import REFERENCE_ENV, KernelSet, select_kernels
from mambaout.fast.optimize import (
    AUTO_RULE,
    AUTO_TRIALS,
    BACKENDS,
    FastMambaOut,
    auto_micro_batch,
    inference_module,
    micro_batches,
    optimize_for_inference,
)

__all__ = [
    "AUTO_RULE",
    "AUTO_TRIALS",
    "BACKENDS",
    "REFERENCE_ENV",
    "FastMambaOut",
    "FusedGatedCNNBlock",
    "KernelSet",
    "auto_micro_batch",
    "cpu_allocator",
    "inference_module",
    "micro_batches",
    "optimize_for_inference",
    "select_kernels",
    "tune_cpu_allocator",
]
