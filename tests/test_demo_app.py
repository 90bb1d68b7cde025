"""`mambaout demo` running: its API through gradio_client, and the page in headless Debian Chromium (Playwright).

One app for the module: `mambaout demo` with no weights named, started in a folder whose runs/ holds a tiny run on
the embedded default's digits, so it serves that run's best.pth with its held-out scans as examples.
"""

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from demo_fixtures import running_demo
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from playwright.sync_api import sync_playwright
from train_fixtures import flags

from mambaout.cli import main
from mambaout.data import digits_tree
from mambaout.demo import held_out_images
from mambaout.demo.app import FAILED

CHROMIUM = "/usr/bin/chromium"  # Debian's; bash scripts/test.sh installs it when missing
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LABEL = '#top-classes [data-testid="label-output-value"]'


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with runs/digits-tiny/: one epoch of the 40k-parameter model on the bundled digits."""
    root = tmp_path_factory.mktemp("demo")
    assert main(["train", "--output", str(root / "runs" / "digits-tiny"), *flags(batch_size=32, epochs=1)]) == 0
    return root


@pytest.fixture(scope="module")
def examples() -> list[Path]:
    return held_out_images(digits_tree() / "val")


@pytest.fixture(scope="module")
def predicted(root, examples) -> dict[str, list[dict]]:
    """What `mambaout predict` says about each example: file name -> its top 5."""
    output = root / "predictions.json"
    best = root / "runs" / "digits-tiny" / "best.pth"
    assert (
        main(
            ["predict", *map(str, examples), "--checkpoint", str(best), "--top", "5", "--json", "--output", str(output)]
        )
        == 0
    )
    return {Path(r["path"]).name: r["predictions"] for r in json.loads(output.read_text())}


@pytest.fixture(scope="module")
def app(root):
    """`mambaout demo` in a subprocess (1 MB uploads, 0.5 megapixels), until the module's tests are done."""
    with running_demo(root, "--max-upload-mb", "1", "--max-megapixels", "0.5") as server:
        yield server


@pytest.fixture(scope="module")
def client(app, root) -> Client:
    return Client(app.url, verbose=False, download_files=str(root / "downloads"))


def _labels(output: dict) -> list[tuple[str, float]]:
    return [(c["label"], c["confidence"]) for c in output["confidences"]]


def _noise(side: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))


# --- the server ------------------------------------------------------------------------------------------------------


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as the kernel lists them) of the TCP sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.append(local.rsplit(":", 1)[0])
    return found


def test_serves_the_default_run_on_loopback_without_a_share_link(app):
    log = app.log.read_text()
    assert "serving mambaout_femto from runs/digits-tiny/best.pth on cpu" in log
    assert f"Running on local URL:  http://127.0.0.1:{app.port}" in log
    assert "public URL" not in log and "gradio.live" not in log
    assert _listening(app.port) == ["0100007F"]  # 127.0.0.1 only, not 0.0.0.0 or ::


def test_a_taken_port_is_one_line(app, root, capsys):
    best = root / "runs" / "digits-tiny" / "best.pth"
    assert main(["demo", "--checkpoint", str(best), "--port", str(app.port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --host 127.0.0.1 --port {app.port}: cannot listen there (the port is taken, or the address is not "
        "this machine's); pass another --port or --host"
    ]


# --- the API through gradio_client ------------------------------------------------------------------------------------


def test_bundled_examples_give_the_top_k_of_mambaout_predict(client, examples, predicted):
    (dataset,) = [c for c in client.config["components"] if c["type"] == "dataset"]
    assert [sample[0]["orig_name"] for sample in dataset["props"]["samples"]] == [p.name for p in examples]
    for path in examples:
        top, overlay, details = client.predict(handle_file(str(path)), api_name="/classify")
        expected = [(p["label"], p["probability"]) for p in predicted[path.name]]
        found = _labels(top)
        assert top["label"] == expected[0][0] and [name for name, _ in found] == [name for name, _ in expected]
        assert np.allclose([p for _, p in found], [p for _, p in expected], atol=1e-5)
        assert Image.open(overlay).size == (640, 640) and f"**{path.name}** (8×8 px" in details


def _truncated_jpeg(path: Path) -> Path:
    _noise(64).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:400])
    return path


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_text("not a picture"), "words.png: not an image"),
        (_truncated_jpeg, "words.png: corrupt or truncated"),
        (
            lambda p: Image.new("RGB", (1000, 1000), (200, 30, 30)).save(p, format="PNG"),
            r"words.png: too large \(over 500000 pixels\)",
        ),
    ],
    ids=["text", "truncated", "too-many-pixels"],
)
def test_bad_uploads_are_one_message_and_the_server_goes_on(app, client, examples, tmp_path, write, message):
    bad = tmp_path / "words.png"
    write(bad)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(bad)), api_name="/classify")
    assert app.process.poll() is None
    top, _, _ = client.predict(handle_file(str(examples[0])), api_name="/classify")
    assert top["label"] is not None


def test_uploads_over_the_size_limit_are_refused(app, client, tmp_path):
    big = tmp_path / "noise.png"
    _noise(700).save(big)  # 1.4 MB: incompressible
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):
        client.predict(handle_file(str(big)), api_name="/classify")  # the client reads the limit from the page
    with httpx.Client(trust_env=False) as http:  # and the server holds it against any other client
        response = http.post(app.url + "gradio_api/upload", files={"files": ("noise.png", big.read_bytes())})
    assert response.status_code == 413 and app.process.poll() is None


def test_concurrent_requests_queue_and_each_gets_its_answer(client, examples, predicted):
    jobs = [(path, client.submit(handle_file(str(path)), api_name="/classify")) for path in examples[:3] * 2]
    ranks, deadline = set(), time.monotonic() + 120
    while not all(job.done() for _, job in jobs):
        assert time.monotonic() < deadline, "the queued requests did not finish in 2 minutes"
        ranks |= {job.status().rank for _, job in jobs}
        time.sleep(0.005)
    assert any(rank and rank > 0 for rank in ranks)  # some waited behind others: one request runs at a time
    for path, job in jobs:
        assert job.result(timeout=120)[0]["label"] == predicted[path.name][0]["label"]


def test_options_compare_and_several_images(client, examples, tmp_path):
    top, _, details = client.predict(
        handle_file(str(examples[1])), 3, 64, "optimized", 2, "head", "auto", api_name="/classify"
    )
    assert len(top["confidences"]) == 3 and "seen at 64×64" in details and "optimize_for_inference model" in details
    assert "the head at each position on stage 4 of 4 (2×2 cells) for *2*" in details
    with pytest.raises(AppError, match="input size must be one of"):
        client.predict(handle_file(str(examples[1])), 5, 33, api_name="/classify")
    table = client.predict(handle_file(str(examples[1])), api_name="/compare")
    assert "| optimize_for_inference |" in table and "Same top 5: yes" in table
    (tmp_path / "notes.png").write_text("hello")
    rows = client.predict(
        [handle_file(str(examples[2])), handle_file(str(tmp_path / "notes.png"))], api_name="/classify_many"
    )
    assert rows["data"][0][0] == examples[2].name and rows["data"][1] == [
        "notes.png",
        "unreadable: not an image",
        "",
        "",
    ]


# --- the page in Chromium ---------------------------------------------------------------------------------------------


def _wait_for_details(page, name: str) -> None:
    page.wait_for_function(
        "name => document.querySelector('#details').innerText.includes(name)", arg=name, timeout=60_000
    )


def test_page_in_chromium_upload_bad_upload_and_example(app, examples, predicted, tmp_path):
    assert Path(CHROMIUM).exists(), f"no {CHROMIUM}: bash scripts/test.sh installs Debian's chromium"
    bad = tmp_path / "holiday.png"
    bad.write_text("these are words, not pixels")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile (--user-data-dir)
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1200},
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.goto(app.url)
            upload = page.locator("#photo input[type=file]")

            upload.set_input_files(str(examples[3]))
            _wait_for_details(page, examples[3].name)
            assert page.locator(LABEL).inner_text() == predicted[examples[3].name][0]["label"]
            assert page.locator("#map img").count() == 1
            shot = tmp_path / "demo-page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot of the page: {shot}")

            upload.set_input_files(str(bad))
            toast = page.locator('[data-testid="toast-body"]', has_text="holiday.png: not an image")
            toast.wait_for(timeout=60_000)
            _wait_for_details(page, FAILED)
            assert page.locator(LABEL).count() == 0  # no stale answer beside the message
            page.screenshot(path=str(tmp_path / "demo-bad-upload.png"), full_page=True)

            upload.set_input_files(str(examples[7]))
            _wait_for_details(page, examples[7].name)
            assert page.locator(LABEL).inner_text() == predicted[examples[7].name][0]["label"]

            page.locator("#examples button.gallery-item").nth(5).click()
            _wait_for_details(page, examples[5].name)
            assert page.locator(LABEL).inner_text() == predicted[examples[5].name][0]["label"]
        finally:
            browser.close()
    assert app.process.poll() is None
