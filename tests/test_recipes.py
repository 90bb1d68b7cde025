"""The shipped training recipes as users run them: their transforms over thousands of draws, and a real-sized run.

The paper's RandAugment (`rand-m9-mstd0.5-inc1`) draws its magnitude around 9 with std 0.5, so about 1 image in 700
reaches magnitude 10, where timm's PosterizeIncreasing asks Pillow for 0 bits; Pillow 13 raises there, older Pillow
returned a black image. Tests that run a transform a handful of times never get there.
"""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_augment
from torchvision.transforms import Compose
from train_fixtures import TINY_MODEL, flags, make_tree, write_image

from mambaout.cli import main
from mambaout.data.transforms import data_config, train_transform
from mambaout.models import create_model
from mambaout.train import trainer
from mambaout.train.config import CONFIG_DIR, build_config, load_config_file

RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _strict_posterize(image: Image.Image, bits: int) -> Image.Image:
    """Pillow 13's posterize, whatever Pillow is installed: 0 bits is an error."""
    if not 1 <= bits <= 8:
        raise ValueError("bits must be between or equal to 1 and 8")
    mask = ~(2 ** (8 - bits) - 1)
    return image.point([i & mask for i in range(256)] * len(image.getbands()))


@pytest.fixture
def strict_pillow(monkeypatch):
    monkeypatch.setattr(ImageOps, "posterize", _strict_posterize)


def _recipe_transform(recipe: str, size: int = 32):
    """The training transform `mambaout train` builds for `recipe`, at a small input size."""
    config = build_config(None, load_config_file(recipe), {"input_size": size})
    with torch.device("meta"):  # the model is only asked for its preprocessing
        data = data_config(create_model(config.model, num_classes=10), size)
    return train_transform(
        data,
        config.scale,
        config.ratio,
        config.hflip,
        config.vflip,
        config.color_jitter,
        config.auto_augment,
        config.train_interpolation,
        config.re_prob,
        config.re_mode,
        config.re_count,
    )


def _augment_ops(transform) -> list[timm_augment.AugmentOp]:
    rand = [t for t in transform.transforms if isinstance(t, timm_augment.RandAugment)]
    return [op for r in rand for op in r.ops]


def _random_image(rng: np.random.Generator, size: int = 12) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_posterize_at_magnitude_10_gives_the_published_black_image(strict_pillow):
    op = next(op for op in _augment_ops(_recipe_transform("femto_in1k")) if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the draw that asks for 0 bits
    image = _random_image(np.random.default_rng(0))
    out = op(image)
    assert out.mode == "RGB" and out.size == image.size and not np.asarray(out).any()  # black, as Pillow < 13 gave
    op.magnitude = 5  # 2 bits kept: Pillow's own posterize, unchanged
    assert np.array_equal(np.asarray(op(image)), np.asarray(image) & 0b11000000)


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_transform_survives_thousands_of_draws(recipe, strict_pillow):
    """5,000 draws reach the ~1-in-660 branches (RandAugment's 0-bit posterize) of every shipped recipe."""
    transform = _recipe_transform(recipe)
    zero_bits = []
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            fixed = op.aug_fn

            def counted(img, bits, _fixed=fixed, **kwargs):
                zero_bits.append(bits <= 0)
                return _fixed(img, bits, **kwargs)

            op.aug_fn = counted
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(5000):
        out = transform(_random_image(rng))
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    if "inc1" in (load_config_file(recipe).get("auto_augment") or ""):
        assert sum(zero_bits) >= 1, "the draws never reached the 0-bit posterize: raise their number"


def test_the_paper_recipe_trains_a_real_sized_folder(tmp_path, strict_pillow, capsys):
    """femto_in1k as published (RandAugment, mixup/cutmix, erasing, smoothing, AdamW, cosine with warm-up) on 2,000
    images in 10 classes, with loader workers, shortened to one epoch of a tiny network at 32 px."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 200), ("val", 20)):
        for label in range(10):
            for i in range(count):
                path = tmp_path / "data" / split / f"c{label}" / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                _random_image(rng, size=int(rng.integers(8, 20))).save(path)
    argv = ["train", "--model", "mambaout_femto", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run")]
    fast = ["--epochs", "1", "--model-kwargs", TINY_MODEL, "--input-size", "32", "--batch-size", "64"]
    assert main([*argv, *fast, "--workers", "2", "--threads", "1", "--amp", "none"]) == 0
    out = capsys.readouterr().out
    assert "--warmup-epochs 0.0667: the recipe's 20 of 300 epochs, kept in proportion for --epochs 1" in out
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and np.isfinite(record["train_loss"]) and record["step"] == 2000 // 64


class FailOnSize:
    """A transform step that raises on images of one size (the test's marked file)."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.size == self.size:
            raise ValueError("this step cannot take that image")
        return image


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_transform_names_the_file_and_step_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys, workers):
    tree = make_tree(tmp_path / "data", train=8, val=2)
    marked = write_image(tree / "train" / "b" / "marked.png", 1, size=17)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tree), "--output", str(run), *flags(epochs=1, workers=workers)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    build = trainer.train_transform
    monkeypatch.setattr(trainer, "train_transform", lambda *a, **k: Compose([FailOnSize((17, 17)), build(*a, **k)]))
    capsys.readouterr()
    assert main(["train", "--output", str(run), "--resume", "auto", "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: transform FailOnSize failed on "), err
    assert str(marked) in err[0] and "ValueError: this step cannot take that image" in err[0]
    assert f"{run / 'last.pth'} holds the last good state" in err[0]
    assert (run / "last.pth").read_bytes() == before["last.pth"] and (run / "best.pth").read_bytes() == before[
        "best.pth"
    ]
