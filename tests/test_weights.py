"""mambaout.weights: layout detection and conversion, checkpoint wrappers, downloads and the cache, bad input."""

import argparse
import dataclasses
import hashlib
import http.server
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import timm.models.mambaout as timm_mambaout
import torch
from conftest import randomize_

from mambaout import create_model
from mambaout.errors import UserError
from mambaout.models import MambaOut, ModelSpec, PretrainedCfg, WeightSource, get_spec, load_pretrained, registry
from mambaout.weights import (
    LAYOUTS,
    convert_state_dict,
    detect_layout,
    load_checkpoint,
    read_state_dict,
    save_state_dict,
)
from mambaout.weights.download import cache_path
from mambaout.weights.io import atomic_write

TINY = dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32))
RW = dict(stem_mid_norm=False, downsample_norm_first=True, ls_init_value=1e-6, head_hidden_norm=False)
TIMM_RW = dict(stem_mid_norm=False, downsample="conv_nf", ls_init_value=1e-6, head_fn="norm_mlp")


def tiny_model(num_classes: int = 5, rw: bool = False) -> MambaOut:
    return randomize_(MambaOut(**TINY, num_classes=num_classes, **(RW if rw else {})))


def random_variant(name: str) -> MambaOut:
    """A registered variant with random weights, built without its (slow) initialisation."""
    with torch.device("meta"):
        model = create_model(name)
    return randomize_(model.to_empty(device="cpu"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message and message
    for fragment in fragments:
        assert fragment in message, message


# --- layouts ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rw", [False, True], ids=["paper", "rw"])
def test_our_timm_layout_is_timms_own(rw):
    ours = tiny_model(rw=rw).state_dict()
    theirs = timm_mambaout.MambaOut(**TINY, num_classes=5, **(TIMM_RW if rw else {})).state_dict()
    assert detect_layout(ours) == "mambaout"
    assert detect_layout(theirs) == "timm"
    converted = convert_state_dict(ours, to="timm")
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}
    assert detect_layout(convert_state_dict(theirs, to="mambaout")) == "mambaout"


def test_our_official_layout_is_what_timm_reads_as_official():
    ours = tiny_model().state_dict()
    official = convert_state_dict(ours, to="official")
    assert detect_layout(official) == "official"
    assert any(k.startswith("downsample_layers.0.") for k in official)
    # timm's own official -> timm filter is an independent reading of the official layout
    assert_same_tensors(timm_mambaout.checkpoint_filter_fn(official, None), convert_state_dict(ours, to="timm"))


@pytest.mark.parametrize("source", LAYOUTS)
@pytest.mark.parametrize("target", LAYOUTS)
def test_convert_any_to_any(source, target):
    ours = tiny_model().state_dict()
    given = convert_state_dict(ours, to=source)
    assert_same_tensors(convert_state_dict(given, to=target), convert_state_dict(ours, to=target))
    assert_same_tensors(convert_state_dict(convert_state_dict(given, to=target), to="mambaout"), ours)


def test_rw_weights_cannot_become_official():
    with pytest.raises(UserError) as e:
        convert_state_dict(tiny_model(rw=True).state_dict(), to="official")
    assert_one_line(e, "rw", "official")


def test_other_architectures_are_not_detected():
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "fc.weight": torch.zeros(10, 64)}
    with pytest.raises(UserError) as e:
        detect_layout(resnet)
    assert_one_line(e, "not MambaOut weights", "conv1.weight")


# --- reading checkpoints --------------------------------------------------------------------------------------------


def _prefixed(sd: dict) -> dict:
    return {f"module.{k}": v for k, v in sd.items()}


WRAPPERS = {
    "plain": lambda sd, ema: sd,
    "model": lambda sd, ema: {"model": sd, "epoch": 3},
    "state_dict": lambda sd, ema: {"state_dict": sd},
    "ddp": lambda sd, ema: _prefixed(sd),
    "ddp_in_state_dict": lambda sd, ema: {"state_dict": _prefixed(sd)},
    "model_ema": lambda sd, ema: {"model": sd, "model_ema": _prefixed(ema)},
    "state_dict_ema": lambda sd, ema: {"state_dict": sd, "state_dict_ema": ema},
    "ema": lambda sd, ema: {"model": sd, "ema": ema},
}


@pytest.mark.parametrize("prefer_ema", [False, True], ids=["model", "prefer_ema"])
@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_checkpoint_wrappers(tmp_path, wrap, prefer_ema):
    sd, ema = tiny_model().state_dict(), tiny_model().state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(WRAPPERS[wrap](sd, ema), path)
    has_ema = "ema" in wrap
    if prefer_ema and not has_ema:
        with pytest.warns(UserWarning, match="no EMA weights"):
            loaded = read_state_dict(path, prefer_ema=True)
    else:
        loaded = read_state_dict(path, prefer_ema=prefer_ema)
    assert_same_tensors(loaded, ema if prefer_ema and has_ema else sd)


def test_training_checkpoint_loads(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    ema = tiny_model().state_dict()
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": {"model": "mambaout_femto", "lr": 1e-3, "betas": (0.9, 0.999), "data": None},
        "epoch": 1,
        "step": 10,
        "ema": None,
    }
    path = tmp_path / "last.pth"
    torch.save(checkpoint, path)
    fresh = tiny_model()
    load_checkpoint(fresh, path)
    assert_same_tensors(fresh.state_dict(), model.state_dict())

    torch.save({**checkpoint, "ema": ema}, path)
    load_checkpoint(fresh, path, prefer_ema=True)
    assert_same_tensors(fresh.state_dict(), ema)


def test_timm_training_checkpoint_loads(tmp_path):
    """timm's train.py saves its args as an argparse.Namespace beside the weights and their EMA."""
    sd, ema = tiny_model().state_dict(), tiny_model().state_dict()
    checkpoint = {
        "epoch": 7,
        "arch": "mambaout_femto",
        "state_dict": sd,
        "optimizer": {"state": {}, "param_groups": []},
        "args": argparse.Namespace(lr=1e-3, model="mambaout_femto", input_size=None),
        "state_dict_ema": _prefixed(ema),
        "metric": 0.25,
    }
    torch.save(checkpoint, tmp_path / "model_best.pth.tar")
    assert_same_tensors(read_state_dict(tmp_path / "model_best.pth.tar"), sd)
    assert_same_tensors(read_state_dict(tmp_path / "model_best.pth.tar", prefer_ema=True), ema)


@pytest.mark.parametrize("written, named", [(".safetensors", ".pth"), (".pth", ".safetensors"), (".pt", ".bin")])
def test_format_is_read_from_the_bytes(tmp_path, written, named):
    sd = tiny_model().state_dict()
    path = save_state_dict(sd, tmp_path / f"weights{written}")
    path = path.rename(tmp_path / f"misnamed{named}")
    assert_same_tensors(read_state_dict(path), sd)


def test_save_state_dict_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(RuntimeError):
        save_state_dict(tiny_model().state_dict(), path)
    assert path.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["weights.pth"]


def test_atomic_write_into_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as e, atomic_write(tmp_path / "nope" / "predictions.json") as f:
        f.write(b"never")
    assert_one_line(e, "cannot write")
    assert os.listdir(tmp_path) == []


def test_save_state_dict_into_a_missing_folder(tmp_path):
    with pytest.raises(UserError) as e:
        save_state_dict(tiny_model().state_dict(), tmp_path / "nope" / "w.safetensors")
    assert_one_line(e, "cannot write")


# --- loading into a model ---------------------------------------------------------------------------------------------


def test_num_classes_change_drops_the_classifier(tmp_path):
    source = tiny_model(num_classes=5)
    path = save_state_dict(source.state_dict(), tmp_path / "five.safetensors")
    model = tiny_model(num_classes=3)
    fresh_classifier = model.head.fc.weight.clone()
    with pytest.warns(UserWarning, match="classifier has 5 classes and the model 3 classes"):
        missing, unexpected = load_checkpoint(model, path)
    assert missing == ["head.fc.weight", "head.fc.bias"] and unexpected == []
    assert torch.equal(model.head.fc.weight, fresh_classifier)
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("head.fc."):
            assert torch.equal(loaded[key], value), key


def test_create_model_with_a_path_and_new_classes(tmp_path):
    source = random_variant("mambaout_femto")
    path = save_state_dict(convert_state_dict(source.state_dict(), to="official"), tmp_path / "femto.pth")
    with pytest.warns(UserWarning, match="classifier"):
        model = create_model("mambaout_femto", pretrained=str(path), num_classes=10)
    assert model.head.fc.out_features == 10
    assert torch.equal(model.stages[2].blocks[4].mixer.conv.weight, source.stages[2].blocks[4].mixer.conv.weight)


def test_meta_model_takes_the_checkpoint_tensors():
    weights = tiny_model().state_dict()
    with torch.device("meta"):
        model = MambaOut(**TINY, num_classes=5)
    load_checkpoint(model, weights)
    assert not any(p.is_meta for p in model.parameters())
    assert_same_tensors(model.state_dict(), weights)


def test_non_strict_loading_reports_missing_keys():
    sd = {k: v for k, v in tiny_model().state_dict().items() if not k.startswith("head.")}
    missing, unexpected = load_checkpoint(tiny_model(), sd, strict=False)
    assert missing and all(k.startswith("head.") for k in missing) and unexpected == []
    with pytest.raises(UserError) as e:
        load_checkpoint(tiny_model(), sd)
    assert_one_line(e, "missing keys", "head.norm.weight")


# --- published weights: download, cache, hashes ---------------------------------------------------------------------


TEST_MODEL = "mambaout_test_tiny"


def publish(monkeypatch, url: str, sha256: str | None = None) -> None:
    """Register a tiny variant whose weights are published at `url`, so the whole create_model path runs fast."""
    cfg = PretrainedCfg(num_classes=5, sources=(WeightSource("official", url, sha256),))
    monkeypatch.setitem(registry._REGISTRY, TEST_MODEL, ModelSpec(TEST_MODEL, TINY, cfg, "paper"))


@pytest.fixture
def release(tmp_path, monkeypatch):
    """Tiny weights "published" in the official layout at a file:// URL, and an empty torch.hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    weights = tiny_model().state_dict()
    (tmp_path / "release").mkdir()
    path = save_state_dict(convert_state_dict(weights, to="official"), tmp_path / "release" / "mambaout_tiny.pth")
    return weights, path


def test_pretrained_downloads_once_into_the_cache(release, monkeypatch):
    weights, release = release
    publish(monkeypatch, release.as_uri())
    model = create_model(TEST_MODEL, pretrained=True)
    assert_same_tensors(model.state_dict(), weights)
    cached = cache_path(release.as_uri())
    assert cached.parent == Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    assert os.listdir(cached.parent) == [cached.name]
    release.unlink()  # a second download would fail now
    model = create_model(TEST_MODEL, pretrained="official")
    assert_same_tensors(model.state_dict(), weights)


def test_published_sha256_is_checked(release, monkeypatch):
    weights, release = release
    digest = hashlib.sha256(release.read_bytes()).hexdigest()
    publish(monkeypatch, release.as_uri(), sha256=digest)
    assert_same_tensors(create_model(TEST_MODEL, pretrained=True).state_dict(), weights)

    publish(monkeypatch, release.as_uri(), sha256="0" * 64)
    with pytest.raises(UserError) as e:
        create_model(TEST_MODEL, pretrained=True)
    assert_one_line(e, "SHA-256 mismatch", release.as_uri())
    assert os.listdir(cache_path(release.as_uri()).parent) == []  # the bad copy is gone, no temp files left


def test_user_sha256_of_a_local_file(release):
    _, release = release
    digest = hashlib.sha256(release.read_bytes()).hexdigest()
    assert read_state_dict(release, sha256=digest.upper())
    with pytest.raises(UserError) as e:
        read_state_dict(release, sha256="f" * 64)
    assert_one_line(e, "SHA-256 mismatch", str(release))
    assert release.exists()  # the user's own file is never deleted
    with pytest.raises(UserError) as e:
        read_state_dict(release, sha256="abc")
    assert_one_line(e, "64 hex digits")


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = "http://127.0.0.1:9/mambaout_femto.pth"  # the discard port: nothing listens there
    with pytest.raises(UserError) as e:
        read_state_dict(url)
    assert_one_line(e, url, "by hand", "path")
    with pytest.raises(UserError) as e:
        read_state_dict((tmp_path / "absent.pth").as_uri())
    assert_one_line(e, "could not download")


def test_a_file_url_replaced_at_its_source_is_fetched_again(release):
    _, release = release
    first = read_state_dict(release.as_uri())
    newer = {k: v + 1 for k, v in first.items()}
    save_state_dict(newer, release)
    assert_same_tensors(read_state_dict(release.as_uri()), newer)


class _CutShort(http.server.BaseHTTPRequestHandler):
    """Serves the first half of a checkpoint with no Content-Length, then closes: a download cut short unseen."""

    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body[: len(self.body) // 2])

    def log_message(self, *args) -> None:
        pass


def test_a_download_cut_short_without_a_length_is_not_cached(release):
    _, release = release
    _CutShort.body = release.read_bytes()
    server = http.server.HTTPServer(("127.0.0.1", 0), _CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/mambaout_tiny.pth"
        with pytest.raises(UserError) as e:
            read_state_dict(url)
    finally:
        server.shutdown()
    assert_one_line(e, url, "not a whole checkpoint", "central directory")
    assert not cache_path(url).exists() and os.listdir(cache_path(url).parent) == []


def test_a_cached_copy_that_went_bad_is_fetched_once_more(release):
    weights, release = release
    url = release.as_uri()
    read_state_dict(url)
    cached = cache_path(url)
    cached.write_bytes(cached.read_bytes()[:100])  # damaged in the cache (same name, newer than the source)
    os.utime(release)  # ... and the source re-touched, so only a failed load can tell
    assert_same_tensors(convert_state_dict(read_state_dict(url), to="mambaout"), weights)
    release.write_bytes(b"PK\x03\x04 not really")  # now the source itself is bad: named, nothing cached
    with pytest.raises(UserError) as e:
        read_state_dict(url)
    assert_one_line(e, url)
    assert not cached.exists()


def test_non_finite_weights_are_named_once(tmp_path):
    weights = tiny_model().state_dict()
    weights["stages.1.blocks.0.fc1.weight"][0, 0] = float("inf")
    torch.save(weights, tmp_path / "inf.pth")
    argv = [sys.executable, "-m", "mambaout", "convert", str(tmp_path / "inf.pth"), str(tmp_path / "out.pth")]
    done = subprocess.run([*argv, "--to", "timm"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.count("\n") == 1, done.stderr  # one line, in the CLI's own format
    assert done.stderr.startswith("warning: ") and "non-finite weights" in done.stderr
    assert "'stages.1.blocks.0.fc1.weight'" in done.stderr


def test_unknown_source_name_lists_the_valid_ones():
    with pytest.raises(UserError) as e:
        load_pretrained(tiny_model(), get_spec("mambaout_small_rw"), "official")
    assert_one_line(e, "mambaout_small_rw has no 'official' weights", "'timm'")


def test_variant_without_published_weights():
    spec = get_spec("mambaout_femto")
    bare = dataclasses.replace(spec, cfg=dataclasses.replace(spec.cfg, sources=()))
    with pytest.raises(UserError) as e:
        load_pretrained(tiny_model(), bare, True)
    assert_one_line(e, "no published weights")


# --- bad input: one clear UserError, never a traceback, never a pickle run --------------------------------------------


def _write_bad_input(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pth"
    sd = tiny_model().state_dict()
    if kind == "missing":
        return path
    if kind == "empty":
        path.touch()
    elif kind == "truncated_pth":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "truncated_safetensors":
        path = tmp_path / "truncated.safetensors"
        safetensors.torch.save_file(sd, path)
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "corrupt_zip":
        path.write_bytes(b"PK\x03\x04" + os.urandom(4096))
    elif kind == "text":
        path.write_text("this is a README, not a checkpoint\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "net": {"w": 1}}, path)
    elif kind == "resnet":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, path)
    elif kind == "other_variant":
        torch.save(MambaOut(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=5).state_dict(), path)
    return path


BAD_INPUTS = {
    "missing": "no such file",
    "empty": "empty (0 bytes)",
    "truncated_pth": "truncated or corrupt",
    "truncated_safetensors": "truncated or corrupt safetensors",
    "corrupt_zip": "truncated or corrupt",
    "text": "not a PyTorch or safetensors checkpoint",
    "directory": "is a directory",
    "not_a_dict": "not a state dict",
    "no_tensors": "holds no weights",
    "resnet": "not MambaOut weights",
    "other_variant": "shape mismatches",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error(tmp_path, kind):
    path = _write_bad_input(kind, tmp_path)
    with pytest.raises(UserError) as e:
        load_checkpoint(tiny_model(), path)
    assert_one_line(e, BAD_INPUTS[kind], path.name)


def test_femto_checkpoint_into_tiny(tmp_path):
    path = save_state_dict(random_variant("mambaout_femto").state_dict(), tmp_path / "femto.safetensors")
    with torch.device("meta"):  # only shapes matter: no memory, no init time
        tiny = create_model("mambaout_tiny")
    with pytest.raises(UserError) as e:
        load_checkpoint(tiny, path)
    assert_one_line(e, "does not fit mambaout_tiny", "stem.conv1.weight [24, 3, 3, 3] vs [48, 3, 3, 3]")
    with pytest.raises(UserError) as e:
        load_pretrained(tiny, get_spec("mambaout_tiny"), str(path))
    assert_one_line(e, "does not fit mambaout_tiny")


class _Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle", "inside_checkpoint"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if how == "torch_save":
        torch.save(_Exploit(marker), path)
    elif how == "raw_pickle":
        path.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    else:
        torch.save({"model": tiny_model().state_dict(), "config": _Exploit(marker)}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(tiny_model(), path)
    assert_one_line(e, "refused to load", "could run code", "system")
    assert not marker.exists()


def test_unknown_model_name_with_pretrained(tmp_path):
    with pytest.raises(UserError) as e:
        create_model("mambaout_tinyy", pretrained=str(tmp_path / "w.pth"))
    assert_one_line(e, "unknown model 'mambaout_tinyy'", "mambaout_tiny")
