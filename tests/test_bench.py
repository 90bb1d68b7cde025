"""The benchmark harness on tiny settings: interleaving, quantiles, memory, the table and the CLI (not timed tests)."""

import re
import time

import pytest
import torch

from mambaout.bench import BenchPath, BenchSettings, PathResult, markdown_table, measure, peak_memory_mib, run_benchmark
from mambaout.bench.harness import machine_summary
from mambaout.cli import main
from mambaout.errors import UserError

COLUMNS = "| path | params (M) | GMACs/img | img/s | p50 (ms) | p90 (ms) | peak mem (MiB) | × baseline |"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_interleaves_and_counts():
    order = []
    paths = [BenchPath(n, lambda n=n: order.append(n), baseline=n == "a") for n in "abc"]
    results = measure(paths, repeats=3, warmup=1, iters=2)
    assert [r.name for r in results] == ["a", "b", "c"]
    assert all(len(r.latencies_s) == 6 and min(r.latencies_s) >= 0 for r in results)
    assert results[0].baseline and not results[1].baseline
    timed = order[3:]  # after one warm-up call each
    assert timed[:6] == list("aabbcc") and timed[6:12] == list("bbccaa") and timed[12:] == list("ccaabb")


def test_quantiles_and_throughput():
    r = PathResult("x", latencies_s=[0.4, 0.1, 0.2, 0.3, 0.5])
    assert r.quantile_ms(0.5) == pytest.approx(300)
    assert r.quantile_ms(0.9) == pytest.approx(460)
    assert r.images_per_s(6) == pytest.approx(20)


def test_peak_memory_sees_a_large_temporary():
    def work():
        x = torch.ones(32 * 2**20)  # 128 MiB, touched
        time.sleep(0.05)
        return x.sum()

    peak = peak_memory_mib(work)
    assert peak is not None and 100 <= peak <= 400


def test_markdown_table_has_context_columns_and_ratios():
    results = [PathResult("base", [0.2, 0.2], baseline=True), PathResult("fast", [0.1, 0.1], peak_mib=12.5)]
    text = markdown_table(
        "t", "mambaout bench", results, 4, 7_300_000, 1_148_000_000, machine_summary(), "0.1/0.1/0.1", ["a note"]
    )
    assert COLUMNS in text and "- command: `mambaout bench`" in text and "load average" in text
    assert "; CPU memory: " in text  # the allocator moves CPU figures by up to 1.5x (mambaout.fast.allocator)
    rows = [line for line in text.splitlines() if line.startswith("| base") or line.startswith("| fast")]
    assert rows[0].endswith("| 1.00 |") and rows[1].endswith("| 2.00 |")
    assert "| 7.30 | 1.148 | 40.00 |" in rows[1] and "| 12.5 |" in rows[1] and "- a note" in text


def table_rows(text: str) -> dict[str, list[float]]:
    """path name -> the numeric cells of its row (params .. ratio; '-' cells dropped)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:] if c != "-"]
    return rows


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"onnx": True}, ["timm eager", "mambaout fast", "onnxruntime", "onnxruntime, reference graph"]),
        ({"train": True}, ["timm train step", "mambaout train step"]),
        (
            {"train": True, "levers": True},
            ["timm train step", "mambaout step: fused AdamW only", "+ micro-batches", "+ split linears"],
        ),
    ],
)
def test_run_benchmark_tiny(kwargs, expected):
    settings = BenchSettings(batch_size=2, img_size=64, repeats=1, warmup=1, threads=1, **kwargs)
    text = run_benchmark(settings)
    assert COLUMNS in text and settings.command() in text
    rows = table_rows(text)
    assert list(rows) == expected
    assert all(v > 0 for name, values in rows.items() for v in values[:5])  # params, MACs, img/s, p50, p90
    assert rows[expected[0]][-1] == 1.0


@pytest.mark.parametrize("train", [False, True])
def test_token_mixer_rows_have_their_own_params_and_macs(train):
    mixers = ("conv", "conv_ssm", "attention")
    settings = BenchSettings(batch_size=2, img_size=64, repeats=1, threads=1, train=train, token_mixers=mixers)
    text = run_benchmark(settings)
    assert "--token-mixer conv,conv_ssm,attention" in settings.command() and "selective scan" in text
    rows = table_rows(text)
    assert list(rows) == list(mixers) and rows["conv"][-1] == 1.0
    assert rows["conv_ssm"][0] > rows["conv"][0] and rows["conv_ssm"][1] > rows["conv"][1]  # params, GMACs
    assert rows["attention"][1] > rows["conv"][1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--model", "mambaout_femtoo"], "did you mean 'mambaout_femto'"),
        (["--onnx", "--dtype", "bf16"], "--onnx times fp32 inference"),
        (["--levers", "--dtype", "bf16"], "--levers times fp32 inference levers"),
        (["--device", "tpu"], "unknown device"),
        (["--token-mixer", "conv,mamba"], "--token-mixer mamba: choose from conv"),
        (["--token-mixer", "all", "--onnx"], "drop --onnx, --levers and --compile"),
    ],
)
def test_cli_bad_flags_are_one_line_errors(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_malloc_mode_is_checked_and_reproduced():
    assert BenchSettings(malloc="system").command().endswith("--malloc system")
    assert "--malloc" not in BenchSettings().command()  # tuned is the default
    with pytest.raises(UserError, match="--malloc jemalloc: choose one of tuned, system"):
        BenchSettings(malloc="jemalloc")


def test_cuda_is_refused_cleanly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match="no CUDA GPU"):
        BenchSettings(device="cuda")


def test_cli_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    argv = ["bench", "--batch-size", "1", "--img-size", "64", "--repeats", "1", "--threads", "1", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert out.read_text() in printed
    assert COLUMNS in out.read_text()
