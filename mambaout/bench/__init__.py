"""The benchmark harness: our paths against timm's MambaOut with the same weights, in the same run."""

from mambaout.bench.harness import BenchPath, PathResult, machine_summary, markdown_table, measure, peak_memory_mib
from mambaout.bench.run import DTYPES, BenchReport, BenchSettings, matmul_peak_gflops, run_benchmark
from mambaout.bench.timm_csv import timm_rows, write_timm_csv

__all__ = [
    "DTYPES",
    "BenchPath",
    "BenchReport",
    "BenchSettings",
    "PathResult",
    "machine_summary",
    "markdown_table",
    "matmul_peak_gflops",
    "measure",
    "peak_memory_mib",
    "run_benchmark",
    "timm_rows",
    "write_timm_csv",
]
