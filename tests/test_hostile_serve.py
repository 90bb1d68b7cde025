"""Hostile use of what keeps running: the demo server's console under bad uploads and options (one `refused ...`
line each, never a traceback), and `mambaout bench --load`'s busy processes when the bench is killed (they die too).

The demo runs as `mambaout demo` in a subprocess (as in tests/test_demo_app.py), its stdout and stderr in one log.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from demo_fixtures import running_demo
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from train_fixtures import flags

from mambaout.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`mambaout demo` serving a one-epoch digits run (0.5 megapixels at most), with its console in `log`."""
    root = tmp_path_factory.mktemp("demo")
    assert main(["train", "--output", str(root / "runs" / "digits-tiny"), *flags(batch_size=32, epochs=1)]) == 0
    with running_demo(root, "--max-megapixels", "0.5", log_name="console.log") as server:
        client = Client(server.url, verbose=False, download_files=str(root / "downloads"))
        yield SimpleNamespace(root=root, process=server.process, log=server.log, client=client)


def _text(path: Path) -> Path:
    path.write_text("not a picture")
    return path


def _truncated(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:400])
    return path


def _huge(path: Path) -> Path:
    Image.new("RGB", (1000, 1000), (200, 30, 30)).save(path, format="PNG")  # 1 megapixel, over the 0.5 allowed
    return path


def _digit(path: Path) -> Path:
    Image.new("RGB", (8, 8), (255, 255, 255)).save(path)
    return path


# (file to write, the API's arguments after the file, endpoint, what the one console line that follows must hold)
REFUSALS = [
    (("words.png", _text), (), "/classify", "refused upload: words.png: not an image"),
    (("cut.jpg", _truncated), (), "/classify", "refused upload: cut.jpg: corrupt or truncated"),
    (("huge.png", _huge), (), "/classify", "refused upload: huge.png: too large (over 500000 pixels)"),
    # a name that tries to write a console line of its own (gradio's upload already drops the newline and colon)
    (("a\nrefused upload: forged.png", _text), (), "/classify", "forged.png: not an image"),
    (("d.png", _digit), (5, 33), "/classify", "refused option: input size must be one of [32, 40, 48, 64], not 33"),
    (("d.png", _digit), (5, 32, "compiled"), "/classify", "refused option: model must be one of reference, optimized"),
    (("d.png", _digit), ("five",), "/classify", "refused option: top must be 1 to 10, not 'five'"),
    (("d.png", _digit), (5, 32, "reference", "abc"), "/classify", "refused option: no 'grad-cam' map of class 'abc'"),
    (("d.png", _digit), (5, "<b>64</b>"), "/compare", "refused option: input size must be one of"),
    ((None, None), (), "/compare", "refused upload: pick an image first"),
    (("d.png", _digit), (99,), "/classify_many", "refused option: top must be 1 to 10, not 99"),
    (("words.png", _text), (), "/classify_many", "refused upload: no readable image in"),
]


def _argument(root: Path, name: str | None, write, endpoint: str):
    if name is None:
        return None
    upload = handle_file(str(write(root / "uploads" / name)))
    return [upload] if endpoint == "/classify_many" else upload


@pytest.mark.parametrize(
    ("upload", "options", "endpoint", "line"), REFUSALS, ids=[f"{c[2]}:{c[3][:40]}" for c in REFUSALS]
)
def test_a_refusal_is_one_console_line_without_a_traceback(demo, upload, options, endpoint, line):
    (demo.root / "uploads").mkdir(exist_ok=True)
    before = demo.log.read_text().splitlines()
    with pytest.raises(AppError):
        demo.client.predict(_argument(demo.root, *upload, endpoint), *options, api_name=endpoint)
    # the handler prints its line before the answer leaves, so it is in the log by now
    added = demo.log.read_text().splitlines()[len(before) :]
    assert len(added) == 1 and added[0].startswith("refused ") and line in added[0], added
    assert demo.process.poll() is None


def test_the_server_goes_on_and_its_console_has_no_traceback(demo):
    (demo.root / "uploads").mkdir(exist_ok=True)
    top, _, details = demo.client.predict(
        handle_file(str(_digit(demo.root / "uploads" / "ok.png"))), api_name="/classify"
    )
    assert top["label"] is not None and "ok.png" in details
    assert "Traceback" not in demo.log.read_text()


# --- bench's busy processes ------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_busy_processes_die_with_a_killed_bench(tmp_path, how):
    argv = ["bench", "--load", "2", "--model", "mambaout_femto", "--img-size", "32", "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bench = subprocess.Popen(
        [sys.executable, "-m", "mambaout", *argv, "--repeats", "100000"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # no shell's job control: a hang-up reaches the bench alone
    )
    busy: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(busy) < 2:
            assert bench.poll() is None, f"the bench exited with {bench.returncode} before its load started"
            assert time.monotonic() < deadline, "the bench's busy processes did not start in 2 minutes"
            time.sleep(0.2)
            busy = _children(bench.pid)
        time.sleep(0.5)  # the children are past their start (the pipe and prctl are set up)
        bench.send_signal(how)
        bench.wait(30)
        deadline = time.monotonic() + 5
        while any(map(_alive, busy)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, busy)), f"busy processes {busy} outlived the bench"
    finally:
        for pid in busy:  # the test's own grandchildren, if the fix is broken
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if bench.poll() is None:
            bench.kill()
            bench.wait()
