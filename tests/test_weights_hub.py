"""Hub folders both ways: ours read by timm, timm's read by us, through a folder and through huggingface_hub's cache.

timm is the oracle: its `save_config_for_hf` for the config of every tag, its `save_for_hf` folders and its
`create_model("local-dir:...")` / `("hf-hub:...")` loaders for the logits. The Hugging Face cache is a folder built
here in huggingface_hub's layout (`models--ORG--NAME/refs/main`, `snapshots/<commit>/...`); nothing is downloaded.
"""

import json
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from conftest import randomize_
from timm.models._hub import save_config_for_hf, save_for_hf

import mambaout
from mambaout.errors import UserError
from mambaout.models.factory import hub_config
from mambaout.weights import convert_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def random_model(create, *args, **kwargs) -> torch.nn.Module:
    """`create(*args, **kwargs)` with random weights, built on the meta device (no slow init)."""
    with torch.device("meta"):
        model = create(*args, **kwargs)
    return randomize_(model.to_empty(device="cpu"))


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):  # a model filled from a checkpoint takes its tensors
        return mambaout.create_model(name, **kwargs)


def assert_same_logits(a: torch.nn.Module, b: torch.nn.Module, chans: int = 3) -> None:
    x = torch.randn(2, chans, 64, 48)
    with torch.inference_mode():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=1e-5)


def hf_cache(root: Path, repo_id: str) -> Path:
    """An empty snapshot folder of `repo_id` in a huggingface_hub cache at `root`, with `main` pointing at it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub in offline mode: a file missing from the cache fails at once instead of going to the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", mambaout.list_models(include_tags=True))
def test_config_is_the_one_timm_writes(name, tmp_path):
    with torch.device("meta"):
        ours, theirs = mambaout.create_model(name), timm.create_model(name)
    save_config_for_hf(theirs, tmp_path / "timm.json")
    timm_config = json.loads((tmp_path / "timm.json").read_text())
    # the one difference: the classes only at the top (timm's copy in model_args breaks transformers' timm wrapper,
    # which passes num_classes beside model_args: see README's notes)
    assert timm_config["model_args"].pop("num_classes") == timm_config["num_classes"]
    assert json.loads(json.dumps(hub_config(ours))) == timm_config
    # and timm builds the same architecture from it
    (tmp_path / "config.json").write_text(json.dumps(hub_config(ours)))
    with torch.device("meta"):
        rebuilt = timm.create_model(f"local-dir:{tmp_path}")
    ours_timm_layout = convert_state_dict(ours.state_dict(), to="timm")
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ours_timm_layout.items()}


def test_timm_loads_our_folder_to_the_same_logits(tmp_path):
    ours = random_model(mambaout.create_model, "mambaout_femto", in_chans=1, num_classes=5, drop_path_rate=0.1)
    folder = ours.save_pretrained(tmp_path / "hub")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert theirs.num_classes == 5 and theirs.in_chans == 1
    assert_same_logits(ours, theirs, chans=1)
    again = meta_model(f"local-dir:{folder}", pretrained=True)
    assert again.pretrained_cfg["input_size"] == (1, 224, 224) and again.pretrained_cfg["source"] == "local-dir"
    assert_same_logits(ours, again, chans=1)


@pytest.mark.parametrize("serialization", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_we_load_timms_folder_to_the_same_logits(serialization, tmp_path):
    theirs = random_model(timm.create_model, "mambaout_femto", num_classes=7)
    save_for_hf(theirs, tmp_path, safe_serialization=serialization)
    ours = meta_model(f"local-dir:{tmp_path}", pretrained=True)
    assert ours.num_classes == 7 and ours.pretrained_cfg["architecture"] == "mambaout_femto"
    assert_same_logits(theirs, ours)
    bare = meta_model(f"local-dir:{tmp_path}")  # as in timm, the weights only with pretrained=True
    assert all(p.is_meta for p in bare.parameters())


def test_hf_hub_ids_resolve_through_the_cache(tmp_path, offline):
    theirs = random_model(timm.create_model, "mambaout_femto")
    save_for_hf(theirs, hf_cache(tmp_path, "timm/mambaout_femto.in1k"), safe_serialization=True)
    ours = meta_model("hf-hub:timm/mambaout_femto.in1k", pretrained=True, cache_dir=tmp_path)
    assert ours.pretrained_cfg["hf_hub_id"] == "timm/mambaout_femto.in1k"
    assert_same_logits(theirs, ours)
    # the registry's "timm" source is the same hub repository, so it comes from the same cache
    assert_same_logits(theirs, meta_model("mambaout_femto", pretrained="timm", cache_dir=tmp_path))
    # and timm reads our cache folder too
    assert_same_logits(
        theirs, timm.create_model("hf-hub:timm/mambaout_femto.in1k", pretrained=True, cache_dir=tmp_path)
    )


def test_hub_mistakes_are_one_line(tmp_path, offline):
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        mambaout.create_model("hf-hub:timm/mambaout_kobe.in1k", cache_dir=tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        mambaout.create_model(f"local-dir:{tmp_path / 'absent'}")
    with pytest.raises(UserError, match=r"has no config\.json"):
        mambaout.create_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "mambaout_femto"}))
    with pytest.raises(UserError, match="has no weights file"):
        mambaout.create_model(f"local-dir:{tmp_path}", pretrained=True)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    with pytest.raises(UserError, match="unknown model 'resnet50'"):
        mambaout.create_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "mambaout_femto", "model_args": {"x": 1}}))
    with pytest.raises(UserError, match="do not share: x"):
        mambaout.create_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        mambaout.create_model(f"local-dir:{tmp_path}")


def test_save_pretrained_refuses_what_timm_cannot_rebuild(tmp_path):
    with pytest.raises(UserError, match="do not share: head_hidden_norm"):
        meta_model("mambaout_femto", head_hidden_norm=False).save_pretrained(tmp_path)
    pruned = meta_model("mambaout_femto")
    pruned.prune_intermediate_layers((0, 1))
    with pytest.raises(UserError, match="no longer has"):
        pruned.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"built by mambaout\.create_model"):
        mambaout.MambaOut(depths=(1, 1), dims=(8, 16)).save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())
