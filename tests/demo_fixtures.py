"""`mambaout demo` as a real server for the tests: a subprocess on a free loopback port, its console in a file."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

STARTUP_S = 180  # importing torch and gradio on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_demo(root: Path, *args: str, log_name: str = "demo.log") -> Iterator[SimpleNamespace]:
    """`mambaout demo --port P ARGS` run in `root` until the block ends; yields `url`, `port`, `process` and `log`."""
    port, log = free_port(), root / log_name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(root / "gradio")}
    command = [sys.executable, "-m", "mambaout", "demo", "--port", str(port), *args]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert process.poll() is None, f"mambaout demo exited with {process.returncode}:\n{log.read_text()}"
            try:
                direct.open(url + "config", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"mambaout demo not up after {STARTUP_S} s:\n{log.read_text()}"
                time.sleep(0.5)
        yield SimpleNamespace(url=url, port=port, process=process, log=log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
