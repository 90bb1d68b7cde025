"""`hubconf.py`: `torch.hub.load(REPO_DIR, name, source="local", ...)` for every registered variant."""

from pathlib import Path

import pytest
import torch
from conftest import randomize_

import mambaout
from mambaout.models import MambaOutFeatures, get_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", mambaout.list_models())
def test_every_variant_has_an_entry_point(name):
    with torch.device("meta"):  # the architecture only: no memory, no init
        model = torch.hub.load(str(REPO), name, source="local", num_classes=3)
    assert model.pretrained_cfg["architecture"] == name and model.num_classes == 3
    assert [len(stage.blocks) for stage in model.stages] == list(get_spec(name).arch["depths"])


def test_pretrained_and_creation_arguments_pass_through(tmp_path):
    with torch.device("meta"):
        weights = mambaout.create_model("mambaout_femto", num_classes=4)
    path = randomize_(weights.to_empty(device="cpu")).save_pretrained(tmp_path / "femto")
    for pretrained in (f"local-dir:{path}", str(path / "model.safetensors")):
        with torch.device("meta"):  # the model takes the checkpoint's tensors
            model = torch.hub.load(str(REPO), "mambaout_femto", source="local", pretrained=pretrained, num_classes=4)
        for key, value in weights.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with torch.device("meta"):
        features = torch.hub.load(str(REPO), "mambaout_femto", source="local", features_only=True, out_indices=(3,))
    assert isinstance(features, MambaOutFeatures) and features.feature_info.channels() == [288]
