"""The benchmark harness on tiny settings: interleaving, quantiles, memory, the table and the CLI (not timed tests)."""

import os
import re
import time

import pytest
import torch

from mambaout.bench import BenchPath, BenchSettings, PathResult, markdown_table, measure, peak_memory_mib, run_benchmark
from mambaout.bench.harness import COLUMNS, busy_processes, machine_summary
from mambaout.bench.paths import peer_paths, timm_twin
from mambaout.cli import main
from mambaout.errors import UserError
from mambaout.models import create_model

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
    assert rows[0].endswith("| 1.00 | 1.00 |") and rows[1].endswith("| 2.00 | 2.00 |")
    assert "| 7.30 | 1.148 | 40.00 | 100.0 | 100.0 | 100.0 | 12.5 |" in rows[1] and "- a note" in text


def test_best_call_and_peer_summary():
    results = [
        PathResult("timm", [0.4, 0.2], baseline=True, peer=True),
        PathResult("engine", [0.1, 0.3], peer=True),  # the fastest peer by best call, not by median
        PathResult("ours", [0.1, 0.1], ours_default=True),
    ]
    machine = machine_summary()
    text = markdown_table("t", "c", results, 2, 1, 10**9, machine, "0", peak_gflops=100.0, flops_per_mac=2.0)
    rows = table_rows(text)
    assert rows["ours"][-2:] == [3.0, 2.0]  # × timm by median (0.3 s vs 0.1 s) and by best call (0.2 vs 0.1)
    assert rows["ours"][-3] == 40  # 20 img/s x 2 GFLOP per image = 40 GFLOP/s of a 100 GFLOP/s peak
    assert "ours / best peer: 2.00× by median** (best peer `engine`)" in text
    assert "**1.00× by best call** (best peer `engine`)" in text


def test_busy_processes_run_and_are_gone_after():
    with busy_processes(2):
        children = [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == os.getpid()]
        assert len(children) == 2
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == os.getpid()]


def _parent(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def table_rows(text: str) -> dict[str, list[float]]:
    """path name -> the numeric cells of its row (params .. ratio; '-' cells dropped)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:] if c != "-"]
    return rows


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"onnx": True},
            [
                "timm eager",
                "mambaout fast",
                "onnxruntime, our export",
                "openvino latency, our export",
                "openvino throughput, our export",
                "onnxruntime, our reference graph",
            ],
        ),
        ({"train": True}, ["timm train step", "mambaout train step"]),
        (
            {"train": True, "levers": True},
            [
                "timm train step",
                "mambaout step: fused AdamW only",
                "+ micro-batches",
                "+ split linears",
                "+ compiled depthwise-conv weight gradient",
            ],
        ),
    ],
)
def test_run_benchmark_tiny(kwargs, expected):
    settings = BenchSettings(batch_size=2, img_size=64, repeats=1, warmup=1, threads=1, **kwargs)
    text = run_benchmark(settings).markdown
    assert COLUMNS in text and settings.command() in text
    rows = table_rows(text)
    assert list(rows) == expected
    assert all(v > 0 for name, values in rows.items() for v in values[:6])  # params, MACs, img/s, p50, p90, best
    assert rows[expected[0]][-1] == 1.0


@pytest.mark.parametrize("train", [False, True])
def test_token_mixer_rows_have_their_own_params_and_macs(train):
    mixers = ("conv", "conv_ssm", "attention")
    settings = BenchSettings(batch_size=2, img_size=64, repeats=1, threads=1, train=train, token_mixers=mixers)
    text = run_benchmark(settings).markdown
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
        (["--peers", "--train"], "--peers times fp32 inference"),
        (["--load", "-1"], "--load: must be within"),
        (["--levers", "--dtype", "bf16"], "--levers times fp32 inference levers"),
        (["--device", "tpu"], "unknown device"),
        (["--token-mixer", "conv,mamba"], "--token-mixer mamba: choose from conv"),
        (["--token-mixer", "all", "--onnx"], "drop --onnx, --peers, --levers and --compile"),
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


def test_peer_rows_run_timms_own_export_of_the_same_weights(tmp_path):
    torch.manual_seed(0)
    model = create_model("mambaout_femto").eval()
    x = torch.randn(2, 3, 64, 64)
    rows = peer_paths(model, "mambaout_femto", x, threads=1, folder=tmp_path)
    names = ["onnxruntime, timm's export", "openvino latency, timm's export", "openvino throughput, timm's export"]
    assert [r.name for r in rows] == names and all(r.peer and not r.baseline for r in rows)
    with torch.inference_mode():
        want = timm_twin(model, "mambaout_femto")(x)
    for row in rows:
        assert (torch.from_numpy(row.run()) - want).abs().max().item() <= 1e-4
