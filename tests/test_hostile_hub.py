"""Hub folders and run checkpoints under hostile input (issue 22): validated, not trusted.

A `config.json` is checked field by field before anything is built from it, and the network it describes is counted
before it is allocated; an `hf-hub:` name that is no repository id is refused; `create_model(checkpoint_path=RUN)`
takes the run's classes and refuses a `num_classes` that contradicts them; and `--backend onnxruntime` on an SSM model
says to use `--backend torch`. Each refusal goes through the API (a `UserError` naming the file and field) and the
CLI (`hostile_fixtures.assert_refused`: exit 2, one `error:` line, nothing on disk changed).
"""

import dataclasses
import json
import resource
import time
import tracemalloc
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
import yaml
from conftest import randomize_
from hostile_fixtures import assert_refused
from train_fixtures import TINY_MODEL, flags, make_tree, write_image

import mambaout
from mambaout.cli import main
from mambaout.errors import UserError
from mambaout.models import MambaOut, capacity, get_spec
from mambaout.models.capacity import MAX_PARAMETERS, count_parameters
from mambaout.train.checkpoint import read_checkpoint, save_checkpoint
from mambaout.train.inference import load_classifier
from mambaout.weights import read_state_dict
from mambaout.weights.hub import split_source

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = yaml.safe_load(TINY_MODEL)  # the run's architecture: create_model takes it as keyword arguments
CLASSES = ("cat", "dog", "fox")

# (case, what replaces or updates config.json's keys, what the refusal names): `model_args` and `pretrained_cfg`
# given as objects update the saved ones, anything else replaces the key
HOSTILE_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("classes-huge", {"num_classes": 10**12}, "num_classes=1000000000000"),
    ("classes-negative", {"num_classes": -3}, "num_classes must be an integer >= 0"),
    ("classes-string", {"num_classes": "3"}, "num_classes must be an integer >= 0"),
    ("classes-float", {"num_classes": 3.5}, "num_classes must be an integer >= 0"),
    ("classes-bool", {"num_classes": True}, "num_classes must be an integer >= 0"),
    ("classes-not-its-weights", {"num_classes": 0}, "num_classes 0 does not match the 3-class classifier"),
    ("cfg-classes-string", {"pretrained_cfg": {"num_classes": "x"}}, "pretrained_cfg.num_classes"),
    ("dims-huge", {"model_args": {"dims": [10**6] * 4}}, "dims=[1000000"),
    ("depths-huge", {"model_args": {"depths": [10**12] * 4}}, "depths=[1000000000000"),
    ("depths-many-tiny-blocks", {"model_args": {"depths": [10**6, 1, 1, 1], "dims": [1, 1, 1, 1]}}, "1,000,003 blocks"),
    ("in-chans-huge", {"model_args": {"in_chans": 10**9}, "pretrained_cfg": {"mean": [0.5], "std": [0.5]}}, "in_chans"),
    ("in-chans-zero", {"model_args": {"in_chans": 0}}, "model_args.in_chans"),
    ("depths-not-dims", {"model_args": {"depths": [1, 1]}}, "depths (1, 1) and dims"),
    ("depths-negative", {"model_args": {"depths": [-1, 1, 1, 1]}}, "cannot build mambaout_femto from its model_args"),
    ("dims-strings", {"model_args": {"dims": ["a", "b", "c", "d"]}}, "cannot build mambaout_femto"),
    ("global-pool", {"model_args": {"global_pool": "median"}}, "global_pool"),
    ("unknown-arg", {"model_args": {"wings": 2}}, "wings"),
    ("model-args-list", {"model_args": [1]}, "model_args must be an object"),
    ("pretrained-cfg-string", {"pretrained_cfg": "x"}, "pretrained_cfg must be an object"),
    ("no-architecture", {"architecture": None}, "names no architecture"),
    ("unknown-architecture", {"architecture": "resnet50"}, "resnet50"),
    ("mean-string", {"pretrained_cfg": {"mean": "abc"}}, "pretrained_cfg.mean"),
    ("mean-strings", {"pretrained_cfg": {"mean": ["a", "b", "c"]}}, "pretrained_cfg.mean"),
    ("mean-nan", {"pretrained_cfg": {"mean": [float("nan")] * 3}}, "pretrained_cfg.mean"),
    ("mean-two", {"pretrained_cfg": {"mean": [0.5, 0.5]}}, "pretrained_cfg.mean"),
    ("std-zero", {"pretrained_cfg": {"std": [0, 0.2, 0.2]}}, "pretrained_cfg.std"),
    ("input-size-huge", {"pretrained_cfg": {"input_size": [3, 10**5, 10**5]}}, "pretrained_cfg.input_size"),
    ("input-size-null", {"pretrained_cfg": {"input_size": None}}, "pretrained_cfg.input_size"),
    ("input-size-two", {"pretrained_cfg": {"input_size": [224, 224]}}, "pretrained_cfg.input_size"),
    ("test-input-size", {"pretrained_cfg": {"test_input_size": "big"}}, "pretrained_cfg.test_input_size"),
    ("crop-pct-zero", {"pretrained_cfg": {"crop_pct": 0}}, "pretrained_cfg.crop_pct"),
    ("crop-pct-string", {"pretrained_cfg": {"crop_pct": "1"}}, "pretrained_cfg.crop_pct"),
    ("interpolation", {"pretrained_cfg": {"interpolation": "cubic"}}, "pretrained_cfg.interpolation"),
    ("interpolation-list", {"pretrained_cfg": {"interpolation": ["bicubic"]}}, "pretrained_cfg.interpolation"),
    ("crop-mode", {"pretrained_cfg": {"crop_mode": "corner"}}, "pretrained_cfg.crop_mode"),
    ("label-names", {"pretrained_cfg": {"label_names": ["a"]}}, "pretrained_cfg.label_names"),
]
BAD_REPOS = [
    "hf-hub:../../etc",
    "hf-hub:org/name/extra",
    "hf-hub:org--x/name",
    "hf-hub:/abs/path",
    "hf-hub:" + "a" * 200,
    "hf-hub:org/name@../../../etc",
    "hf-hub:org/name@main/../../x",
    "hf-hub:org/name@/etc",
    "hf_hub:../x",
]


@dataclasses.dataclass
class Workspace:
    root: Path
    photo: Path
    good: Path  # a valid hub folder: a femto with 3 classes
    headless: Path  # a valid hub folder without a classifier (timm writes num_classes 0 for feature models)
    hostile: dict[str, Path]  # case -> its folder
    run: Path
    ssm_run: Path  # a run checkpoint whose blocks mix tokens with the selective scan


def _mutated(config: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(config))
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def _random_femto(**kwargs: Any) -> torch.nn.Module:
    with torch.device("meta"):  # no slow init: the weights are random anyway
        model = mambaout.create_model("mambaout_femto", **kwargs)
    return randomize_(model.to_empty(device="cpu"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("hostile-hub")
    photo = write_image(root / "photo.png", 0, size=32)
    good = _random_femto(num_classes=3).save_pretrained(root / "good")
    headless = _random_femto(num_classes=0).save_pretrained(root / "headless")
    config = json.loads((good / "config.json").read_text())
    hostile = {}
    for case, change, _ in HOSTILE_CONFIGS:
        folder = root / "hostile" / case
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(_mutated(config, change)))
        # a link, not a copy: the refusal checks hash every file under the workspace before and after
        (folder / "model.safetensors").symlink_to(good / "model.safetensors")
        hostile[case] = folder
    tree = make_tree(root / "data", classes=CLASSES, train=4, val=2)
    run = root / "run"
    assert main(["train", "--data", str(tree), "--output", str(run), *flags(epochs=1)]) == 0
    # what `mambaout train --model-kwargs "{..., token_mixer: conv_ssm}"` writes, with random weights
    checkpoint = read_checkpoint(run / "best.pth")
    ssm_args = {**TINY, "token_mixer": "conv_ssm"}
    ssm = mambaout.create_model("mambaout_femto", num_classes=len(CLASSES), **ssm_args)
    config = {**checkpoint["config"], "model_kwargs": ssm_args}
    save_checkpoint(checkpoint | {"model": ssm.state_dict(), "config": config}, root / "ssm.pth")
    return Workspace(root, photo, good, headless, hostile, run, root / "ssm.pth")


# --- config.json: every field read is checked, the network counted before it is built --------------------------------


@pytest.mark.parametrize(("case", "named"), [(case, named) for case, _, named in HOSTILE_CONFIGS])
def test_hostile_config_is_refused_by_create_model(ws, case, named):
    folder = ws.hostile[case]
    start = time.perf_counter()
    with pytest.raises(UserError) as error:
        mambaout.create_model(f"local-dir:{folder}", pretrained=True)
    assert time.perf_counter() - start < 5, "refused only after building"
    message = str(error.value)
    assert named in message and "\n" not in message, message
    if named != "resnet50":  # an unknown architecture is a name, not a field of this file
        assert str(folder) in message, message


@pytest.mark.parametrize(("case", "named"), [(case, named) for case, _, named in HOSTILE_CONFIGS])
def test_hostile_config_is_refused_by_predict(ws, capsys, case, named):
    assert_refused(ws.root, capsys, ["predict", str(ws.photo), "--model", f"local-dir:{ws.hostile[case]}"], named)


def test_valid_folders_still_load(ws, capsys):
    model = mambaout.create_model(f"local-dir:{ws.good}", pretrained=True)
    assert model.num_classes == 3
    features = mambaout.create_model(f"local-dir:{ws.headless}", pretrained=True)  # a feature model, as in timm
    assert features.num_classes == 0
    # a count that contradicts the config is a fresh head to fine-tune, as in timm
    with pytest.warns(UserWarning, match="classifier has 3 classes and the model 5"):
        assert mambaout.create_model(f"local-dir:{ws.hostile['classes-not-its-weights']}", True, 5).num_classes == 5
    assert main(["predict", str(ws.photo), "--model", f"local-dir:{ws.good}", "--backend", "torch", "--json"]) == 0
    labels = {p["label"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]}
    assert labels == {"class_0", "class_1", "class_2"}


def test_a_feature_model_cannot_predict(ws, capsys):
    assert_refused(ws.root, capsys, ["predict", str(ws.photo), "--model", f"local-dir:{ws.headless}"], "no classifier")


def test_a_huge_head_is_refused_before_anything_is_allocated(ws):
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(UserError, match=f"more than the {MAX_PARAMETERS:,} parameters"):
            mambaout.create_model(f"local-dir:{ws.hostile['classes-huge']}", pretrained=True)
        elapsed, (_, python_peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 5 and python_peak < 20 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_peak < 100 * 2**10


def test_weights_that_do_not_fit_in_free_memory_are_refused(ws, monkeypatch):
    monkeypatch.setattr(capacity, "available_bytes", lambda device: 2**20)
    with pytest.raises(UserError, match=r"6,154,995 parameters \(0\.02 GiB\), more than the 0\.00 GiB free on cpu"):
        mambaout.create_model(f"local-dir:{ws.good}")
    with torch.device("meta"):  # a build on the meta device takes no memory
        assert mambaout.create_model(f"local-dir:{ws.good}").num_classes == 3


@pytest.mark.parametrize("mixer", ["conv", "conv_ssm", "attention"])
@pytest.mark.parametrize("name", mambaout.list_models())
def test_the_parameter_count_is_exact(name, mixer):
    args = {**get_spec(name).arch, "num_classes": 7, "token_mixer": mixer}
    with torch.device("meta"):
        model = MambaOut(**args)
    assert count_parameters(args) == sum(t.numel() for t in [*model.parameters(), *model.buffers()])


def test_a_constructor_error_names_the_callers_values():
    with pytest.raises(ValueError, match=r"depths \(3, 3\) and dims"):
        count_parameters({"depths": (3, 3), "dims": (8, 16, 24, 32)})
    with pytest.raises(ValueError, match=r"depths \(3, 3\) and dims"):
        mambaout.create_model("mambaout_femto", depths=(3, 3))


# --- hf-hub names --------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub in offline mode: nothing may reach the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", BAD_REPOS)
def test_a_name_that_is_no_repository_id_is_refused(ws, capsys, tmp_path, name):
    for call in (mambaout.create_model, read_state_dict):
        with pytest.raises(UserError, match=r"hf-hub:ORG/NAME|revision after '@'"):
            call(name, cache_dir=tmp_path)
    assert_refused(ws.root, capsys, ["predict", str(ws.photo), "--model", name], "hf")


@pytest.mark.parametrize("name", ["hf-hub:timm/x.in1k", "hf-hub:x", "hf-hub:timm/x@main", "hf-hub:o/x@refs/pr/1"])
def test_repository_ids_and_revisions_pass(name):
    assert split_source(name) == ("hf-hub", name.removeprefix("hf-hub:"))


# --- run checkpoints: the model takes their classes -----------------------------------------------------------------


def test_checkpoint_path_takes_the_runs_classes(ws):
    best = ws.run / "best.pth"
    model = mambaout.create_model("mambaout_femto", checkpoint_path=best)  # the run's TINY depths and dims too
    assert model.num_classes == len(CLASSES) and model.model_args == TINY
    reference = load_classifier(str(best)).model  # the model `mambaout eval --checkpoint` evaluates
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)


def test_checkpoint_path_refuses_other_classes(ws):
    best = ws.run / "best.pth"
    with pytest.raises(UserError, match=f"checkpoint_path {best} has a 3-class classifier and num_classes is 5"):
        mambaout.create_model("mambaout_femto", checkpoint_path=best, num_classes=5, **TINY)
    # the documented way to a fresh head: the run's weights as a pretrained start
    with pytest.warns(UserWarning, match="classifier has 3 classes and the model 5"):
        tuned = mambaout.create_model("mambaout_femto", pretrained=str(best), num_classes=5, **TINY)
    weights = read_checkpoint(best)["model"]
    assert tuned.num_classes == 5
    torch.testing.assert_close(tuned.state_dict()["stem.conv1.weight"], weights["stem.conv1.weight"])


# --- predict's ONNX backends on the SSM mixer --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_onnx_backends_on_the_ssm_mixer_say_use_torch(ws, capsys, backend):
    argv = ["predict", str(ws.photo), "--checkpoint", str(ws.ssm_run), "--backend", backend, "--device", "cpu"]
    line = assert_refused(ws.root, capsys, argv, "use --backend torch")
    assert "--format" not in line
