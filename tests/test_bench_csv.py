"""`mambaout bench --csv FILE`: timm's `benchmark.py` columns, the printed table's figures, and the files refused."""

import csv
from pathlib import Path

import pytest
from hostile_fixtures import assert_refused

from mambaout.bench import BenchReport, BenchSettings, PathResult, timm_rows
from mambaout.cli import main
from mambaout.outputs import check_output

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = ["bench", "--model", "mambaout_femto", "--repeats", "1", "--batch-size", "2", "--img-size", "32"]
# the headers of timm's own files (benchmark.py --results-file; results/benchmark-{infer,train}-*.csv)
TIMM_INFER = "model,infer_samples_per_sec,infer_step_time,infer_batch_size,infer_img_size,infer_gmacs,param_count"
TIMM_TRAIN = "model,train_samples_per_sec,train_step_time,train_batch_size,train_img_size,param_count"


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or ()), list(reader)


def _table(markdown: str) -> dict[str, dict[str, str]]:
    """The printed Markdown table: path name -> column heading -> cell."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    heads = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])
    return {cells[0]: dict(zip(heads, cells, strict=True)) for cells in rows}


def test_inference_csv_has_timms_columns_and_the_printed_figures(tmp_path, capsys):
    out = tmp_path / "new" / "femto.csv"
    assert main([*BENCH, "--csv", str(out)]) == 0
    table = _table(capsys.readouterr().out)
    columns, rows = _read(out)
    assert columns == [*TIMM_INFER.split(","), "mambaout_path"]
    assert [row["mambaout_path"] for row in rows] == list(table) == ["timm eager", "mambaout fast"]
    for row in rows:
        cells = table[row["mambaout_path"]]
        assert (row["model"], row["infer_batch_size"], row["infer_img_size"]) == ("mambaout_femto", "2", "32")
        samples_per_s, step_ms = float(row["infer_samples_per_sec"]), float(row["infer_step_time"])
        assert samples_per_s == pytest.approx(2 / (step_ms / 1e3), rel=1e-3)  # timm's: batch / step time in ms
        assert f"{samples_per_s:.2f}" == cells["img/s"]
        assert step_ms == pytest.approx(float(cells["p50 (ms)"]), abs=0.051)  # the table's p50, to 0.1 ms
        assert row["param_count"] == "7.3" == f"{float(cells['params (M)']):g}"  # millions, as timm writes 7.3
        assert float(row["infer_gmacs"]) == pytest.approx(float(cells["GMACs/img"]), abs=0.0051)
    assert out.read_bytes().count(b"\r\n") == 3  # csv's line ends, as timm's files have them
    assert check_output(out, "--csv", "bench-csv") == out  # a rerun replaces our own file without --force


def test_train_csv_has_timms_train_columns_and_force_replaces_a_foreign_file(tmp_path, capsys):
    out = tmp_path / "train.csv"
    out.write_text("my notes\n")
    assert main([*BENCH, "--train", "--csv", str(out), "--force"]) == 0
    table = _table(capsys.readouterr().out)
    columns, rows = _read(out)
    assert columns == [*TIMM_TRAIN.split(","), "mambaout_path"]
    assert [row["mambaout_path"] for row in rows] == list(table) == ["timm train step", "mambaout train step"]
    for row in rows:
        assert f"{float(row['train_samples_per_sec']):.2f}" == table[row["mambaout_path"]]["img/s"]
        assert float(row["train_samples_per_sec"]) == pytest.approx(2e3 / float(row["train_step_time"]), rel=1e-3)


def test_token_mixer_rows_are_named_apart_from_timms_model_with_their_own_counts():
    settings = BenchSettings(token_mixers=("conv", "attention"), batch_size=4, img_size=64)
    results = [
        PathResult("conv", [0.2, 0.1, 0.4], baseline=True, params=7_304_999, macs=26_000_000),
        PathResult("attention", [0.5], params=8_000_000, macs=41_234_567),
    ]
    rows = timm_rows(BenchReport(settings, results, 7_304_999, 26_000_000, markdown=""))
    assert [r["model"] for r in rows] == ["mambaout_femto+conv", "mambaout_femto+attention"]
    assert rows[0]["infer_step_time"] == 200.0 and rows[0]["infer_samples_per_sec"] == 20.0  # the median call
    assert [(r["param_count"], r["infer_gmacs"]) for r in rows] == [(7.3, 0.03), (8.0, 0.04)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-csv")
    (root / "notes.txt").write_text("my notes\n")
    (root / "timm.csv").write_text(f"{TIMM_INFER}\r\nmambaout_femto,9124.82,112.201,1024,224,1.16,7.3\r\n")
    (root / "folder").mkdir()
    return root


CASES = [  # (the --csv file, more flags, what the error names)
    ("notes.txt", [], "is not a `mambaout bench --csv` table"),
    ("timm.csv", [], "is not a `mambaout bench --csv` table"),  # timm's own table, never overwritten
    ("folder", [], "is a folder"),
    ("notes.txt/femto.csv", [], "is a file, not a folder"),
    ("both.md", ["--output", "both.md"], "is also the --output file"),
]


@pytest.mark.parametrize(("name", "more", "named"), CASES)
def test_bad_csv_files_are_refused_before_any_work(ws, capsys, name, more, named):
    more = [str(ws / m) if m.endswith(".md") else m for m in more]
    message = assert_refused(ws, capsys, [*BENCH, "--csv", str(ws / name), *more], named)
    assert "--csv" in message
