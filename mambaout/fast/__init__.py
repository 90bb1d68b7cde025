"""The fused inference path (and the training-step levers): same function as `mambaout.models`, held to it by tests."""

from mambaout.fast.fused import FusedGatedCNNBlock
from mambaout.fast.kernels import REFERENCE_ENV, KernelSet, select_kernels
from mambaout.fast.optimize import FastMambaOut, auto_micro_batch, optimize_for_inference

__all__ = [
    "REFERENCE_ENV",
    "FastMambaOut",
    "FusedGatedCNNBlock",
    "KernelSet",
    "auto_micro_batch",
    "optimize_for_inference",
    "select_kernels",
]
