"""`mambaout scaling`: each token mixer's time and memory against tokens, the growth fits, crossovers and limits."""

import json
import math
import re

import pytest

from mambaout.ablate.scaling import (
    SCALING_MIXERS,
    ScalingRow,
    crossover_tokens,
    find_crossovers,
    growth_exponent,
    growth_fits,
    stage1_tokens,
    tau_marks,
)
from mambaout.cli import main

TOKENS = [stage1_tokens(s) for s in (64, 128, 256, 512)]  # 256, 1024, 4096, 16384


def _rows(mixer: str, costs: list[float], pass_: str = "inference") -> list[ScalingRow]:
    sizes = (64, 128, 256, 512)
    return [ScalingRow(mixer, s, stage1_tokens(s), pass_, c, 10.0 * c) for s, c in zip(sizes, costs, strict=True)]


def test_growth_exponent_of_exact_power_laws():
    for exponent in (0.5, 1.0, 2.0):
        assert growth_exponent(TOKENS, [3.0 * t**exponent for t in TOKENS]) == pytest.approx(exponent)
    assert growth_exponent(TOKENS[:1], [1.0]) is None  # one size: no slope
    assert growth_exponent(TOKENS[:2], [1.0, 0.0]) is None  # no logarithm of 0


def test_crossover_of_exact_power_laws_is_where_they_meet():
    attention = [t**2 / 2000 for t in TOKENS]  # quadratic, cheaper below L = 2000, dearer above
    linear = [float(t) for t in TOKENS]
    assert crossover_tokens(TOKENS, attention, linear) == pytest.approx(2000)
    assert crossover_tokens(TOKENS, [10 * t for t in TOKENS], linear) is None  # dearer from the start
    assert crossover_tokens(TOKENS, [t / 10 for t in TOKENS], linear) is None  # never dearer


def test_fits_and_crossovers_from_rows():
    rows = (
        _rows("conv", [t / 100 for t in TOKENS])
        + _rows("attention", [t**2 / 300_000 for t in TOKENS])  # meets conv at L = 3000
        + _rows("conv_ssm", [t / 10 for t in TOKENS])  # attention passes it at L = 30000: past the sizes
        + _rows("causal_attention", [t**2 for t in TOKENS])
        + _rows("causal_conv", [float(t) for t in TOKENS])
    )
    rows.append(ScalingRow("conv", 1024, stage1_tokens(1024), "inference", status="skipped: needs ~9 GiB > limit 1"))
    fits = {f["mixer"]: f for f in growth_fits(rows)}
    assert fits["conv"]["exponent"] == pytest.approx(1.0) and fits["conv"]["sizes"] == [64, 128, 256, 512]
    assert fits["attention"]["exponent"] == pytest.approx(2.0)
    assert fits["attention"]["exponent_upper"] == pytest.approx(2.0) and fits["attention"]["upper_sizes"] == [256, 512]
    assert fits["conv"]["memory_exponent"] == pytest.approx(1.0)
    found = {(c.attention, c.other): c for c in find_crossovers(rows)}
    assert set(found) == {("attention", "conv"), ("attention", "conv_ssm"), ("causal_attention", "causal_conv")}
    assert found["attention", "conv"].tokens == pytest.approx(3000)
    assert found["attention", "conv"].img_size == pytest.approx(4 * math.sqrt(3000))
    assert found["attention", "conv_ssm"].tokens is None
    assert "not within the sizes measured" in found["attention", "conv_ssm"].note
    assert "already dearer at the smallest" in found["causal_attention", "causal_conv"].note


def test_tau_marks_in_stage1_tokens():
    marks = tau_marks("mambaout_femto")  # dims 48, 96, 192, 288
    assert [m["tau"] for m in marks] == [288, 576, 1152, 1728]
    assert [m["stage1_tokens"] for m in marks] == [288, 576 * 4, 1152 * 16, 1728 * 64]
    assert marks[1]["img_size"] == pytest.approx(192)  # stage 2 of a 192² input: 24² = 576 tokens


def test_cli_both_passes_json_table_and_plot(tmp_path, capsys):
    out, report = tmp_path / "plots", tmp_path / "scaling.json"
    argv = ["scaling", "--sizes", "64,32,96", "--pass", "both", "--threads", "1", "--repeats", "1"]
    assert main([*argv, "--json", str(report), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| mixer | img_size | tokens | pass | ms/img | peak MiB | status |" in text
    assert "| conv_ssm | 64 | 256 | train |" in text and "1 thread (--threads)" in text
    document = json.loads(report.read_text())
    assert {"command", "machine", "rows", "fits", "crossovers", "tau"} <= set(document)
    rows = document["rows"]
    assert len(rows) == 6 * 3 * 2
    assert all(set(r) == {"mixer", "img_size", "tokens", "pass", "ms_per_img", "peak_mib", "status"} for r in rows)
    assert all(r["tokens"] == (r["img_size"] // 4) ** 2 and r["status"] == "ok" and r["ms_per_img"] > 0 for r in rows)
    assert {r["pass"] for r in rows} == {"inference", "train"}
    assert {r["mixer"] for r in rows} == set(SCALING_MIXERS)
    assert len(document["fits"]) == 12 and len(document["crossovers"]) == 2 * 4
    assert (out / "scaling.png").read_bytes().startswith(b"\x89PNG")
    assert main([*argv[:2], "32", "--mixers", "conv", "--json", str(report), "--output", str(out)]) == 0  # ours: ok


def test_memory_and_time_limits_skip_sizes_with_the_reason(tmp_path, capsys):
    report = tmp_path / "s.json"
    argv = ["scaling", "--mixers", "conv,attention", "--sizes", "32,64,96", "--threads", "1", "--repeats", "1"]
    assert main([*argv, "--memory-limit", "0.002", "--json", str(report)]) == 0
    rows = {(r["mixer"], r["img_size"]): r for r in json.loads(report.read_text())["rows"]}
    for mixer in ("conv", "attention"):
        assert rows[mixer, 32]["status"] == "ok"
        skipped = rows[mixer, 96]
        assert re.fullmatch(r"skipped: needs ~[0-9.e+-]+ GiB > limit 0\.002 GiB", skipped["status"])
        assert skipped["ms_per_img"] is None and skipped["peak_mib"] is None
    assert "skipped: needs ~" in capsys.readouterr().out
    assert main([*argv, "--time-limit", "0.000001", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["status"] == "ok" for r in rows] == [True, False, False] * 2  # the smallest always runs
    assert re.fullmatch(r"skipped: ~[0-9.e+-]+ s per call > time limit 1e-06 s", rows[1]["status"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mixers", "conv,nope"], "--mixers nope: unknown token mixer"),
        (["--mixers", ","], "--mixers is empty"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--sizes", "224,100"], "--sizes 100: each size must be a multiple of 32"),
        (["--sizes", "0"], "--sizes 0: each size must be a multiple of 32"),
        (["--sizes", ""], "--sizes is empty"),
        (["--sizes", "a,b"], "argument --sizes: expects comma-separated integers"),
        (["--memory-limit", "0"], "argument --memory-limit: must be > 0"),
        (["--memory-limit", "-1"], "argument --memory-limit: must be > 0"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    report, out = tmp_path / "s.json", tmp_path / "out"
    assert main(["scaling", *flags, "--json", str(report), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not report.exists() and not out.exists()


def test_foreign_outputs_are_refused_before_any_work(tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    assert main(["scaling", "--json", str(notes)]) == 2
    assert "already exists and is not a `mambaout scaling` JSON" in capsys.readouterr().err
    assert notes.read_text() == '{"mine": true}'
    (tmp_path / "out").write_text("a file")
    assert main(["scaling", "--output", str(tmp_path / "out")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
