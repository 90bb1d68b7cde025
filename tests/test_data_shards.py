"""Data past one folder (issue 24): WebDataset shards, local and over http, and Hugging Face datasets.

Shards are written from a tiny tree and from the bundled digits by `mambaout data shards` and served by a local HTTP
server on 127.0.0.1, as object storage would serve them; runs train and evaluate on them through the CLI. Two gloo
processes read every sample of an epoch exactly once between them; bad samples are skipped and counted; a resumed run
reads the next epoch in the same shard order, and one stopped mid-epoch the batches that came next; `hfds:` reads a
`save_to_disk` folder and parquet files; bad names and files are refused in one line.
"""

import dataclasses
import functools
import hashlib
import http.server
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import datasets
import pytest
import torch
import torch.multiprocessing as mp
from hostile_fixtures import assert_refused
from torch.utils.data import DataLoader
from train_fixtures import flags, make_tree

from mambaout.cli import main
from mambaout.data import DataFailed, digits_tree, shards
from mambaout.data.shards import eval_shards, shard_splits
from mambaout.train import runner
from mambaout.train.checkpoint import read_checkpoint

TRAIN_SHARDS = "train-{000000..000003}.tar"  # 4 shards of 8: 32 training samples, 8 validation samples in one shard


class _Server(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []  # noqa: RUF012 (the paths asked for, shared by the server's handlers)
    # what the next requests of a path get instead of the file, one each: "500" (a server error), "cut" (half the
    # file, then the connection closes, as a dropped download)
    faults: dict[str, list[str]] = {}  # noqa: RUF012

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        _Server.requests.append(self.path)
        fault = _Server.faults.get(self.path, [None]).pop(0) if _Server.faults.get(self.path) else None
        if fault == "500":
            self.send_error(500)
        elif fault == "cut":
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
        else:
            super().do_GET()


@dataclasses.dataclass
class Workspace:
    root: Path
    tree: Path
    shards: Path
    url: str  # the shards folder over http


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    tree = make_tree(root / "data", classes=("a", "b"), train=16, val=4)
    assert main(["data", "shards", str(tree), str(root / "shards"), "--shard-size", "8"]) == 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Server, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Workspace(root, tree, root / "shards", f"http://127.0.0.1:{server.server_port}/shards")
    server.shutdown()
    server.server_close()


def _tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in sorted(files.items()):  # a sample's files side by side, as webdataset reads them
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))


def _fingerprint(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_data_shards_writes_every_image_once_with_its_label(ws, tmp_path, capsys):
    info = json.loads((ws.shards / "_info.json").read_text())
    assert info["classes"] == ["a", "b"]
    assert info["splits"]["train"] == {
        "num_samples": 32,
        "filenames": [f"train-{i:06d}.tar" for i in range(4)],
        "shard_lengths": [8, 8, 8, 8],
    }
    assert info["splits"]["val"] == {"num_samples": 8, "filenames": ["val-000000.tar"], "shard_lengths": [8]}
    stored, first_shard_labels = {}, set()
    for i, name in enumerate(info["splits"]["train"]["filenames"]):
        files = _tar(ws.shards / name)
        for key in {n.split(".")[0] for n in files}:
            stored[files[f"{key}.png"]] = int(files[f"{key}.cls"])
            first_shard_labels |= {int(files[f"{key}.cls"])} if i == 0 else set()
    source = {p.read_bytes(): label for label, c in enumerate("ab") for p in (ws.tree / "train" / c).iterdir()}
    assert stored == source  # the files' own bytes, each once, with its class
    assert first_shard_labels == {0, 1}  # shuffled: a shard mixes the classes

    # the same tree and seed write the same bytes; a second conversion replaces its own files
    for _ in range(2):
        assert main(["data", "shards", str(ws.tree), str(tmp_path / "again"), "--shard-size", "8"]) == 0
    for path in ws.shards.iterdir():
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    assert "train: 32 samples in 4 shards" in capsys.readouterr().out


def test_trains_and_evaluates_on_shards_over_http(ws, tmp_path, capsys):
    data = f"wds:{ws.url}/{TRAIN_SHARDS}"
    run = tmp_path / "run"
    _Server.requests.clear()
    # two loader workers: 4 shards dealt to 2 readers, the status of bad samples shared with the main process
    assert main(["train", "--data", data, "--output", str(run), *flags(epochs=1, workers=2)]) == 0
    out = capsys.readouterr().out
    assert f"2 classes, 32 train / 8 val images from {data}" in out and "8 steps per epoch" in out
    assert {f"/shards/train-{i:06d}.tar" for i in range(4)} | {"/shards/_info.json"} <= set(_Server.requests)
    checkpoint = read_checkpoint(run / "best.pth")
    assert checkpoint["class_names"] == ["a", "b"] and checkpoint["config"]["data"] == data

    # the run's own validation split (the `val` of the pattern's _info.json), then the shards the pattern names
    for given, images in ((None, 8), (data, 32)):
        report = tmp_path / f"eval-{images}.json"
        argv = ["eval", "--checkpoint", str(run / "best.pth"), "--workers", "0", "--json", str(report)]
        assert main(argv + (["--data", given] if given else [])) == 0
        record = json.loads(report.read_text())
        assert record["images"] == images and record["unreadable"] == [] and record["top1"] >= 0


def _read(location: str, epoch: int = 0, samples: int = 32) -> list[str]:
    """Fingerprints of the first `samples` training samples of `epoch`, read from the shards at `location`."""
    train, _ = shard_splits(location, f"wds:{location}", seed=0)
    train.set_epoch(epoch)
    train.transform = _fingerprint
    return [image for image, _ in itertools.islice(iter(train), samples)]


def test_an_http_shard_whose_read_fails_is_read_again_from_where_it_stopped(ws, monkeypatch, capsys):
    monkeypatch.setattr(shards, "RETRY_WAIT_S", 0)
    monkeypatch.setattr(
        _Server, "faults", {"/shards/train-000001.tar": ["500", "cut"], "/shards/train-000002.tar": ["cut"] * 3}
    )
    _Server.requests.clear()
    assert _read(ws.url) == _read(str(ws.shards))  # each sample once, in the same order
    assert (
        _Server.requests.count("/shards/train-000001.tar") == 3
        and _Server.requests.count("/shards/train-000002.tar") == 4
    )
    assert _Server.faults == {"/shards/train-000001.tar": [], "/shards/train-000002.tar": []}
    assert "warning" not in capsys.readouterr().err


def test_a_shard_that_stays_unreadable_is_left_out_of_training_and_fails_evaluation(ws, monkeypatch, capsys):
    monkeypatch.setattr(shards, "RETRY_WAIT_S", 0)
    monkeypatch.setattr(_Server, "faults", {"/shards/train-000003.tar": ["500"] * 100})
    broken = eval_shards(str(ws.shards / "train-000003.tar"), "local")
    broken.transform = _fingerprint
    left_out = [image for image, _ in broken]
    every = _read(str(ws.shards))
    assert sorted(_read(ws.url, samples=24)) == sorted(set(every) - set(left_out))  # a pass of the other three
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"warning: shard {ws.url}/train-000003.tar cannot be read (4 tries): HTTPError: HTTP Error 500: Internal "
        "Server Error: the rest of it is left out of this pass"
    ]
    # evaluation over part of the data would pass for the whole: it stops, naming the shard
    evaluated = eval_shards(f"{ws.url}/{TRAIN_SHARDS}", "http")
    evaluated.transform = _fingerprint
    with pytest.raises(DataFailed, match=f"^shard {ws.url}/train-000003.tar cannot be read \\(4 tries\\)"):
        list(evaluated)


def _rank(rank: int, world_size: int, port: int, argv: list[str], out: str) -> None:
    """One process of a gloo run: trains through the CLI, recording the name of every sample it decoded."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    seen, transformed = [], shards.transformed

    def recording(transform, image, name):
        seen.append(name)
        return transformed(transform, image, name)

    shards.transformed = recording
    code = main(argv)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"code": code, "seen": seen}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_read_every_sample_of_an_epoch_once(ws, tmp_path):
    data = f"wds:{ws.url}/{TRAIN_SHARDS}"
    argv = ["train", "--data", data, "--output", str(tmp_path / "ddp"), "--device", "cpu", *flags(epochs=1)]
    # spawned, not forked: a parent that used CUDA (another test, on a GPU machine) cannot fork a torch process
    mp.start_processes(_rank, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in ranks] == [0, 0]
    read = [[name.rsplit(" sample ", 1)[1] for name in r["seen"] if "/train-" in name] for r in ranks]
    assert len(read[0]) == len(read[1]) == 16  # 4 steps of 4 on each rank
    every = sorted(n.split(".")[0] for i in range(4) for n in _tar(ws.shards / f"train-{i:06d}.tar") if "png" in n)
    assert sorted(read[0] + read[1]) == every and len(set(every)) == 32  # each sample once, across the ranks
    assert read_checkpoint(tmp_path / "ddp" / "last.pth")["step"] == 4


def test_resume_reads_the_next_epoch_in_the_same_shard_order(ws, tmp_path):
    # the order is a function of the seed and the epoch: fresh datasets agree, epochs differ, each is every sample
    local = str(ws.shards)
    assert _read(local, 1) == _read(local, 1) != _read(local, 0)
    assert sorted(_read(local, 0)) == sorted(_read(local, 1)) and len(set(_read(local, 0))) == 32

    # a constant learning rate, so that the schedule does not depend on --epochs
    steady, data = flags(epochs=2, min_lr="1e-3"), f"wds:{ws.shards}"
    assert main(["train", "--data", data, "--output", str(tmp_path / "straight"), *steady]) == 0
    assert main(["train", "--data", data, "--output", str(tmp_path / "resumed"), *steady, "--epochs", "1"]) == 0
    assert main(["train", "--output", str(tmp_path / "resumed"), "--resume", "auto", "--epochs", "2"]) == 0
    straight, resumed = (read_checkpoint(tmp_path / run / "last.pth") for run in ("straight", "resumed"))
    assert straight["step"] == resumed["step"] == 16
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_mid_epoch_goes_on_with_the_batches_that_came_next(ws, workers):
    def batches(skip: int) -> list[list[str]]:
        train, _ = shard_splits(str(ws.shards), f"wds:{ws.shards}", seed=0)
        train.transform = _fingerprint
        train.set_epoch(1, skip_batches=skip, batch_size=4)
        loader = DataLoader(train, batch_size=4, num_workers=workers)
        return [list(images) for images, _ in itertools.islice(loader, 8 - skip)]

    straight = batches(0)
    assert len({image for batch in straight for image in batch}) == 32  # the epoch: every sample once
    for skip in (1, 3, 4):  # with 2 workers, an odd count resumes on the other worker's stream
        assert batches(skip) == straight[skip:]


def test_a_run_stopped_mid_epoch_on_shards_resumes_to_the_same_weights(ws, tmp_path, monkeypatch, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    save = runner.save_checkpoint

    def keeping_the_mid_epoch_state(checkpoint: dict, path: Path) -> None:
        save(checkpoint, path)
        if checkpoint["step"] == 11:  # 3 of epoch 2's 8 steps: the run as a SIGTERM or SIGKILL here leaves it
            shutil.copytree(straight, stopped)
            shutil.copytree(straight, tmp_path / "other-workers")

    monkeypatch.setattr(runner, "save_checkpoint", keeping_the_mid_epoch_state)
    assert main(["train", "--data", f"wds:{ws.shards}", "--output", str(straight), *flags(save_interval=1)]) == 0
    monkeypatch.undo()
    assert read_checkpoint(stopped / "last.pth")["epoch_progress"]["updates"] == 3
    capsys.readouterr()
    assert main(["train", "--output", str(stopped), "--resume", "auto"]) == 0
    assert "in epoch 2: reading its shard order again past the 12 samples per process" in capsys.readouterr().out
    finished, resumed = read_checkpoint(straight / "last.pth"), read_checkpoint(stopped / "last.pth")
    assert finished["step"] == resumed["step"] == 16
    for name, value in finished["model"].items():
        assert torch.equal(resumed["model"][name], value), name

    # other loader workers deal the epoch's rest another way: said, and the run still ends
    assert main(["train", "--output", str(tmp_path / "other-workers"), "--resume", "auto", "--workers", "2"]) == 0
    assert "shards resumed mid-epoch by 2 readers (processes × loader workers), saved by 1" in capsys.readouterr().err


def _bad_shards(ws: Workspace, folder: Path) -> Path:
    """Two training shards of 6 samples with 4 bad ones, and a validation shard of 5 with one."""
    folder.mkdir()
    good = iter([p.read_bytes() for p in sorted((ws.tree / "train").rglob("*.png"))])
    shard0 = {f"s{i}.png": next(good) for i in range(6)} | {f"s{i}.cls": b"0" for i in range(6)}
    shard0["s1.png"] = b"not an image"  # does not decode
    del shard0["s2.cls"]  # no label
    shard0["s3.cls"] = b"7"  # no such class
    shard1 = {f"t{i}.png": next(good) for i in range(6)} | {f"t{i}.cls": b"1" for i in range(6)}
    del shard1["t4.png"]  # no image
    val = {f"v{i}.png": next(good) for i in range(5)} | {f"v{i}.cls": b"0" for i in range(5)}
    val["v2.png"] = b"\x89PNG\r\n\x1a\n truncated"
    for name, files in (("train-0.tar", shard0), ("train-1.tar", shard1), ("val-0.tar", val)):
        _write_tar(folder / name, files)
    splits = {
        "train": {"filenames": ["train-0.tar", "train-1.tar"], "shard_lengths": [6, 6]},
        "val": {"filenames": ["val-0.tar"], "shard_lengths": [5]},
    }
    (folder / "_info.json").write_text(json.dumps({"classes": ["a", "b"], "splits": splits}))
    return folder


def test_bad_samples_are_skipped_and_counted(ws, tmp_path, capsys):
    folder = _bad_shards(ws, tmp_path / "bad")
    dataset = eval_shards(f"{folder}/train-{{0..1}}.tar", "wds:bad")
    assert len(list(dataset)) == 8
    assert sorted(dataset.new_unreadable()) == [
        ("train-0.tar sample 1", "the image does not decode"),
        ("train-0.tar sample 2", "no cls label"),
        ("train-0.tar sample 3", "the cls label is not a class"),
        ("train-1.tar sample 4", "no jpg, png or webp image"),
    ]
    assert dataset.new_unreadable() == []  # each reported once

    # training: 12 declared samples, 3 steps of 4 from the 8 good ones (the reader reads its shards again)
    run = tmp_path / "run"
    assert main(["train", "--data", f"wds:{folder}", "--output", str(run), *flags(epochs=1)]) == 0
    err = capsys.readouterr().err
    assert f"skipped 4 unreadable files in wds:{folder}: train-0.tar sample 1 (the image does not decode)" in err
    assert "skipped 1 unreadable files" in err and "val-0.tar sample 2" in err
    assert read_checkpoint(run / "last.pth")["step"] == 3
    report = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--workers", "0", "--json", str(report)]) == 0
    record = json.loads(report.read_text())
    assert record["images"] == 4 and record["unreadable"] == ["val-0.tar sample 2 (the image does not decode)"]


def _hf_rows(ws: Workspace, split: str) -> list[tuple[bytes, int]]:
    return [(p.read_bytes(), label) for label, c in enumerate("ab") for p in sorted((ws.tree / split / c).iterdir())]


def _hf_split(rows: list[tuple[bytes, int]], label: datasets.ClassLabel | datasets.Value) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": label})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b, _ in rows], "label": [y for _, y in rows]}, features=features
    )


def test_hfds_reads_a_saved_dataset_and_parquet_files(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_CACHE", str(tmp_path / "cache"))  # parquet becomes Arrow files under it
    names = datasets.ClassLabel(names=["a", "b"])
    saved = datasets.DatasetDict(
        train=_hf_split([*_hf_rows(ws, "train"), (b"not an image", 0)], names),
        validation=_hf_split(_hf_rows(ws, "val"), names),
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    run = tmp_path / "run"
    assert main(["train", "--data", f"hfds:{tmp_path / 'saved'}", "--output", str(run), *flags(epochs=1)]) == 0
    captured = capsys.readouterr()
    assert "2 classes, 33 train / 8 val images" in captured.out
    assert "skipped 1 unreadable files" in captured.err and "train[32] (not an image)" in captured.err
    assert read_checkpoint(run / "best.pth")["class_names"] == ["a", "b"]
    report = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--workers", "0", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["images"] == 8

    # parquet with plain integer labels: classes 0..1; -1 (Hugging Face's "no label") is skipped and counted
    folder = tmp_path / "parquet"
    (folder / "data").mkdir(parents=True)
    plain = datasets.Value("int64")
    _hf_split(_hf_rows(ws, "train"), plain).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    _hf_split([*_hf_rows(ws, "val"), (_hf_rows(ws, "val")[0][0], -1)], plain).to_parquet(
        str(folder / "data" / "validation-00000-of-00001.parquet")
    )
    run = tmp_path / "run-parquet"
    assert main(["train", "--data", f"hfds:{folder}", "--output", str(run), *flags(epochs=1)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable files" in err and "validation[8] (its label is not a class (0..1))" in err
    assert read_checkpoint(run / "best.pth")["class_names"] == ["0", "1"]


def _refusal_workspace(ws: Workspace, root: Path) -> None:
    (root / "badjson").mkdir()
    (root / "badjson" / "_info.json").write_text("not json")
    (root / "noclasses").mkdir()
    (root / "noclasses" / "_info.json").write_text(json.dumps({"splits": {}}))
    (root / "lost").mkdir()
    lost = {"train": {"filenames": ["train-0.tar"], "shard_lengths": [3]}}  # a shard that is not there
    (root / "lost" / "_info.json").write_text(json.dumps({"num_classes": 2, "splits": lost}))
    (root / "notparquet").mkdir()
    (root / "notparquet" / "notes.txt").write_text("notes\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "train-000000.tar").write_text("my notes, not a shard\n")
    (root / "noval" / "train" / "a").mkdir(parents=True)


REFUSED = [  # (argv with {root}, {shards}, {url}, {tree} filled in, what the one error line names)
    (["train", "--data", "wds:{root}/nowhere"], "nowhere/_info.json"),
    (["train", "--data", "wds:{root}/badjson"], "_info.json is not JSON"),
    (["train", "--data", "wds:{root}/noclasses"], "name the classes"),
    (["train", "--data", "wds:{root}/lost"], "shards are missing"),
    (["train", "--data", "wds:{shards}/train-{{000000..000009}}.tar"], "train-000004.tar is not listed"),
    (["train", "--data", "wds:{shards}/train-{{000000..000003}}.png"], "must name .tar shards"),
    (["train", "--data", "wds:{shards}", "--workers", "8"], "cannot be shared by 1 process(es) × 8 loader"),
    (["train", "--data", "wds:{url}/nowhere"], "HTTPError"),
    (["train", "--data", "hfds:{root}/nothing"], "no such file or folder"),
    (["train", "--data", "hfds:{root}/notparquet"], "neither a saved dataset"),
    (["data", "shards", "wds:{shards}", "{root}/out"], "this command needs a folder"),
    (["data", "shards", "{tree}", "{tree}/inside"], "inside the input folder"),
    (["data", "shards", "{tree}", "{root}/foreign"], "already exists and is not a tar shard"),
    (["data", "shards", "{root}/noval", "{root}/out"], "no val/ folder"),
]


@pytest.fixture(scope="module")
def refusals(ws, tmp_path_factory):
    root = tmp_path_factory.mktemp("refused")
    _refusal_workspace(ws, root)
    return root


@pytest.mark.parametrize(("argv", "named"), REFUSED, ids=[named for _, named in REFUSED])
def test_bad_data_is_refused_in_one_line(ws, refusals, capsys, argv, named):
    command, *rest = [a.format(root=refusals, shards=ws.shards, url=ws.url, tree=ws.tree) for a in argv]
    run = ["--output", str(refusals / "run"), *flags(epochs=1)] if command == "train" else []
    assert_refused(refusals, capsys, [command, *run, *rest], named)  # the case's flags last: they win


@pytest.mark.parametrize(("module", "data"), [("webdataset", "wds:{shards}"), ("datasets", "hfds:{root}")])
def test_a_missing_data_extra_is_one_line(ws, refusals, capsys, monkeypatch, module, data):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    argv = ["train", "--data", data.format(shards=ws.shards, root=refusals), "--output", str(refusals / "run")]
    assert_refused(refusals, capsys, [*argv, *flags(epochs=1)], "pip install 'mambaout[data]'")


def test_the_base_install_imports_no_data_extra():
    extra = "{'webdataset', 'braceexpand', 'datasets'}"
    code = f"import sys, mambaout.cli, mambaout.train.trainer; print(sorted({extra} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_the_digits_as_shards_train_over_http(ws, tmp_path, capsys):
    # the bundled scans (1,437 train / 360 val), written as shards by `data shards` and read back over http
    target = ws.root / "digits"  # under the server's folder
    assert main(["data", "shards", str(digits_tree()), str(target), "--shard-size", "360"]) == 0
    info = json.loads((target / "_info.json").read_text())
    assert [info["splits"][s]["num_samples"] for s in ("train", "val")] == [1437, 360] and len(info["classes"]) == 10
    run, data = tmp_path / "run", f"wds:{ws.url.removesuffix('/shards')}/digits"
    assert main(["train", "--data", data, "--output", str(run), *flags(epochs=2, batch_size=32, lr=3e-3)]) == 0
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--workers", "0", "--json", str(report)]) == 0
    record = json.loads(report.read_text())
    assert record["images"] == 360 and record["top1"] > 50  # 94% here after 2 epochs; chance is 10%
