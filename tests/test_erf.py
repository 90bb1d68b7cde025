"""`mambaout erf`: the effective receptive field's exact supports (causal mixers see nothing after the centre, the conv
nothing past its kernels' reach, attention and the SSM far away), normalisation, radii on hand-made maps, and the
command end to end (random init, a trained checkpoint, an image folder, and the bad inputs it refuses)."""

import json

import numpy as np
import pytest
import torch
from train_fixtures import flags, make_tree, write_image

from mambaout.ablate import ErfSettings, effective_receptive_field, mass_radii, run_erf
from mambaout.ablate.erf import centre_of, erf_images
from mambaout.cli import main
from mambaout.data import data_config
from mambaout.errors import UserError
from mambaout.models import create_model
from mambaout.outputs import PNG_SOFTWARE
from mambaout.train.checkpoint import read_checkpoint, save_checkpoint

DIMS = (8, 16, 24, 32)
TINY = "{depths: [1, 1, 1, 1], dims: [8, 16, 24, 32]}"


def _model(mixer: str, depths: tuple[int, ...] = (2, 1, 1, 1), kernel_size: int = 7) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"depths": depths, "dims": DIMS, "kernel_size": kernel_size, "token_mixer": mixer}
    return create_model("mambaout_femto", num_classes=0, **kwargs).eval()


def _images(count: int = 2, size: int = 64) -> torch.Tensor:
    images, _, _ = erf_images(None, count, data_config(_model("conv"), size))
    return images


def _chebyshev(shape: tuple[int, int], centre: tuple[int, int]) -> np.ndarray:
    rows, cols = np.indices(shape)
    return np.maximum(abs(rows - centre[0]), abs(cols - centre[1]))


@pytest.mark.parametrize("mixer", ["causal_conv", "causal_attention", "causal_conv_ssm"])
def test_a_causal_mixer_sees_nothing_after_the_centre_token(one_thread, mixer):
    erf = effective_receptive_field(_model(mixer), _images(1), stage=1, wrt="tokens")
    h, w = erf.shape
    assert (h, w) == (16, 16)
    flat, centre = erf.ravel(), (h // 2) * w + w // 2  # the centre token in raster order
    assert (flat[centre + 1 :] == 0).all()  # exactly: no later token reaches it
    assert flat[centre] > 0 and (flat[:centre] > 0).sum() > centre // 2
    assert erf.sum() == pytest.approx(1.0, abs=1e-12) and (erf >= 0).all()


@pytest.mark.parametrize("stage, depths, kernel_size", [(1, (2, 1, 1, 1), 7), (2, (1, 3, 1, 1), 3)])
def test_the_conv_mixer_reaches_exactly_depth_times_half_its_kernel(one_thread, stage, depths, kernel_size):
    model = _model("conv", depths, kernel_size)
    size = 64 if stage == 1 else 128  # token maps of 16×16 and 16×16
    erf = effective_receptive_field(model, _images(1, size), stage=stage, wrt="tokens")
    reach = depths[stage - 1] * (kernel_size - 1) // 2
    distance = _chebyshev(erf.shape, (erf.shape[0] // 2, erf.shape[1] // 2))
    assert (erf[distance > reach] == 0).all()  # exactly zero past the kernels' reach
    assert (erf[distance == reach] > 0).any()  # and the reach is met


def test_the_input_erf_of_a_conv_stage_is_centred_under_the_centre_token(one_thread):
    """Stage 1 token i sees pixels 4i-3..4i+3 through the stem, so the map's support is a square of half-side
    4·reach + 3 around `centre_of`'s pixel (4·(H//2), 4·(W//2))."""
    model = _model("conv")
    erf = effective_receptive_field(model, _images(2), stage=1, wrt="input")
    centre = centre_of(model, 1, 64, "input")
    assert erf.shape == (64, 64) and centre == (32, 32)
    half_side = 4 * 2 * 3 + 3  # two 7×7 blocks reach 6 tokens
    distance = _chebyshev(erf.shape, centre)
    assert (erf[distance > half_side] == 0).all() and (erf[distance == half_side] > 0).any()
    assert erf.sum() == pytest.approx(1.0, abs=1e-12)


def test_the_token_map_leaves_the_skip_connection_out(one_thread):
    model = _model("conv")
    with torch.no_grad():
        for block in model.stages[0].blocks:  # residual branches that add nothing: each block is the identity
            block.fc2.weight.zero_()
            block.fc2.bias.zero_()
    images = _images(1)
    with pytest.raises(UserError, match="zero everywhere"):
        effective_receptive_field(model, images, stage=1, wrt="tokens")
    erf = effective_receptive_field(model, images, stage=1, wrt="input")  # the stem's alone: pixels 4i-3..4i+3
    distance = _chebyshev(erf.shape, centre_of(model, 1, 64, "input"))
    assert (erf[distance > 3] == 0).all() and (erf[distance == 3] > 0).any()


@pytest.mark.parametrize("mixer", ["attention", "conv_ssm"])
def test_attention_and_the_ssm_reach_every_token(one_thread, mixer):
    erf = effective_receptive_field(_model(mixer), _images(1), stage=1, wrt="tokens")
    assert (erf > 0).all()  # the corners too, far past a 7×7 kernel's reach
    assert erf.sum() == pytest.approx(1.0, abs=1e-12)


def test_radii_of_a_hand_made_map():
    erf = np.zeros((11, 11))
    erf[5, 5] = 0.3  # the centre
    erf[4, 5] = erf[6, 5] = erf[5, 4] = erf[5, 6] = 0.1  # distance 1
    erf[5, 9] = 0.3  # distance 4
    assert mass_radii(erf, (5, 5), (0.2, 0.3, 0.5, 0.7, 0.9, 1.0)) == (0.0, 0.0, 1.0, 1.0, 4.0, 4.0)
    assert mass_radii(erf * 7, (5, 5), (0.5,)) == (1.0,)  # shares of the total, whatever its scale
    corner = np.zeros((4, 4))
    corner[0, 0], corner[3, 3] = 0.5, 0.5
    assert mass_radii(corner, (0, 0), (0.5, 0.9)) == (0.0, pytest.approx(np.sqrt(18)))  # off-centre, discs past the map


def test_cli_writes_the_json_maps_and_plot_and_refuses_a_foreign_folder(one_thread, tmp_path, capsys):
    out = tmp_path / "erf"
    argv = ["erf", "--model-kwargs", TINY, "--token-mixer", "conv,attention", "--img-size", "64", "--images", "2"]
    assert main([*argv, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| mambaout_femto | conv | 1 | input |" in printed and "erf.json" in printed
    record = json.loads((out / "erf.json").read_text())
    assert [m["mixer"] for m in record["maps"]] == ["conv", "attention"]
    for row in record["maps"]:
        assert (row["model"], row["stage"], row["wrt"], row["img_size"], row["images"]) == (
            "mambaout_femto", 1, "input", 64, 2
        )  # fmt: skip
        assert row["image_names"] == ["astronaut", "chelsea"] and row["centre"] == [32, 32]
        assert 0 <= row["radius_20"] <= row["radius_50"] <= row["radius_90"] < 64
        erf = np.load(out / row["file"])
        assert erf.shape == (64, 64) and erf.sum() == pytest.approx(1.0, abs=1e-12)
        assert row["radius_50"] == round(mass_radii(erf, (32, 32), (0.5,))[0], 3)
    assert record["settings"]["seed"] == 0 and "definition" in record
    png = (out / "erf.png").read_bytes()
    assert png.startswith(b"\x89PNG") and PNG_SOFTWARE.encode() in png[:4096]

    assert main([*argv, "--wrt", "tokens", "--output", str(out)]) == 0  # its own folder: replaced
    rows = json.loads((out / "erf.json").read_text())["maps"]
    assert [np.load(out / r["file"]).shape for r in rows] == [(16, 16), (16, 16)] and rows[0]["unit"] == "token"

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    assert main([*argv, "--output", str(foreign)]) == 2
    assert "--force" in capsys.readouterr().err and sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]
    assert main([*argv, "--output", str(foreign), "--force"]) == 0
    assert (foreign / "todo.txt").read_text() == "mine" and (foreign / "erf.json").is_file()

    # our folder, but a file of another kind where a map goes: refused, and nothing in the folder changes
    clobbered = out / rows[0]["file"]
    clobbered.write_text("notes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*argv, "--wrt", "tokens", "--output", str(out)]) == 2
    assert "is not a NumPy .npy array" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_images_from_a_folder_skip_unreadable_files(one_thread, tmp_path):
    data = tmp_path / "photos"
    for i in range(2):
        write_image(data / "sub" / f"{i}.png", i, size=40)
    (data / "broken.jpg").write_text("not an image")
    out = tmp_path / "erf"
    argv = ["erf", "--model-kwargs", TINY, "--token-mixer", "conv", "--img-size", "32", "--images", "5"]
    with pytest.warns(UserWarning, match=r"2 usable images \(skipped 1 unreadable: broken.jpg \(not an image\)\)"):
        assert main([*argv, "--data", str(data), "--output", str(out)]) == 0
    (row,) = json.loads((out / "erf.json").read_text())["maps"]
    assert row["data"] == str(data) and sorted(row["image_names"]) == ["sub/0.png", "sub/1.png"]


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    """A `mambaout train` run of a 1-block-per-stage causal-conv MambaOut (a second or two)."""
    root = tmp_path_factory.mktemp("erf-run")
    tree = make_tree(root / "data", train=4, val=2)
    kwargs = "{depths: [2, 1, 1, 1], dims: [8, 16, 24, 32], token_mixer: causal_conv}"
    argv = ["train", "--data", str(tree), "--output", str(root / "run"), *flags(epochs=1, model_kwargs=kwargs)]
    assert main(argv) == 0
    return tree, root / "run" / "last.pth"


def test_a_checkpoint_brings_its_model_mixer_size_and_images(one_thread, causal_run, tmp_path):
    tree, checkpoint = causal_run
    maps = run_erf(
        ErfSettings(checkpoint=(str(checkpoint),), wrt="tokens", images=3, output=str(tmp_path / "e")), log=print
    )
    (erf_map,) = maps
    assert (erf_map.mixer, erf_map.img_size, erf_map.checkpoint) == ("causal_conv", 32, str(checkpoint))
    assert erf_map.data == str(tree / "val") and len(erf_map.image_names) == 3
    assert erf_map.erf.shape == (8, 8) and (erf_map.erf.ravel()[4 * 8 + 4 + 1 :] == 0).all()
    row = json.loads((tmp_path / "e" / "erf.json").read_text())["maps"][0]
    assert row["checkpoint"] == str(checkpoint) and row["file"] == "mambaout_femto-causal_conv-stage1-tokens.npy"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--token-mixer", "conv,nope"], "--token-mixer nope: choose from conv, conv_ssm"),
        (["--stage", "5"], "--stage 5: mambaout_femto has stages 1-4"),
        (["--stage", "4", "--img-size", "64"], "--img-size 64 gives stage 4 (stride 32) a 2×2 token map"),
        (["--data", "/no/such/folder"], "--data /no/such/folder: no such folder"),
        (["--data", "TMP"], "is inside --data"),
        (["--model", "mambaout_femto", "--checkpoint", "x.pth"], "--model and --checkpoint: give one"),
        (["--checkpoint", "CKPT", "--token-mixer", "conv"], "--token-mixer with --checkpoint"),
        (["--checkpoint", "NOTES"], "NOTES"),
        (["--checkpoint", "LISTED"], "model_kwargs must be a mapping"),
        (["--model-kwargs", "{token_mixer: conv}"], "leave token_mixer out"),
        (["--model", "nope"], "unknown model 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(causal_run, tmp_path, capsys, argv, message):
    notes, listed = tmp_path / "notes.pth", tmp_path / "listed.pth"
    notes.write_text("not a checkpoint")
    saved = read_checkpoint(causal_run[1])
    save_checkpoint(saved | {"config": {**saved["config"], "model_kwargs": [1, 2]}}, listed)
    given = {"CKPT": str(causal_run[1]), "NOTES": str(notes), "LISTED": str(listed), "TMP": str(tmp_path)}
    message = message.replace("NOTES", str(notes))
    out = tmp_path / "erf"
    assert main(["erf", "--images", "1", *[given.get(a, a) for a in argv], "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()
