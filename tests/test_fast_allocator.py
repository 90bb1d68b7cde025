"""`tune_cpu_allocator`: glibc keeps a freed large tensor's memory for reuse (each case in a fresh interpreter)."""

import platform
import subprocess
import sys

import pytest

from mambaout.cli import main
from mambaout.fast.allocator import cpu_allocator, tune_cpu_allocator

# allocates and touches 64 MiB (above glibc's largest automatic mmap threshold, 32 MiB), frees it, and prints
# whether tuning applied, how much the resident set shrank on free (MiB) and the allocator's description
SCRIPT = """
import os, sys, torch
from mambaout.fast.allocator import cpu_allocator, tune_cpu_allocator
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
x = torch.ones(16 * 2**20)
held = rss()
del x
print(applied, (held - rss()) / 2**20, cpu_allocator(), sep="|")
"""


def _run(mode: str) -> tuple[str, float, str]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    applied, shrank, allocator = done.stdout.strip().splitlines()[-1].split("|")
    return applied, float(shrank), allocator


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or "(preloaded)" in cpu_allocator(), reason="tunes glibc's malloc only"
)
def test_tuned_glibc_keeps_freed_memory():
    applied, shrank, allocator = _run("system")
    assert applied == "None" and shrank > 48, "with glibc's defaults a 64 MiB block is unmapped on free"
    assert allocator == "glibc malloc, default thresholds"
    applied, shrank, allocator = _run("tuned")
    assert applied == "True" and shrank < 8, "tuned, the freed block stays in the heap for the next call"
    assert allocator.startswith("glibc malloc, mmap/trim thresholds 1024 MiB")


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold_bytes must be positive"):
        tune_cpu_allocator(0)


def test_cli_bad_malloc_mode_is_a_one_line_error(capsys):
    code = main(["eval", "--malloc", "jemalloc"])
    err = capsys.readouterr().err
    assert code == 2 and "--malloc" in err and err.count("\n") == 1
