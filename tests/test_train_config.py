"""mambaout.train.config: the paper's recipe per variant, the lr rule, overrides, and one-line errors naming flags."""

import argparse
import dataclasses
import io
from pathlib import Path

import pytest
import torch
import yaml

import mambaout
from mambaout.errors import UserError
from mambaout.train.config import (
    CONFIG_DIR,
    TrainConfig,
    add_config_arguments,
    build_config,
    config_overrides,
    load_config_file,
)

DROP_PATH = {"femto": 0.025, "kobe": 0.025, "tiny": 0.2, "small": 0.4, "base": 0.6}


@pytest.mark.parametrize("variant", sorted(DROP_PATH))
def test_each_paper_variant_has_the_papers_recipe(variant):
    config = build_config(None, load_config_file(f"{variant}_in1k"))
    assert config.model == f"mambaout_{variant}" and config.drop_path == DROP_PATH[variant]
    assert (config.opt, config.weight_decay, config.sched, config.epochs, config.warmup_epochs) == (
        "adamw", 0.05, "cosine", 300, 20
    )  # fmt: skip
    assert (config.warmup_lr, config.min_lr, config.smoothing, config.re_prob) == (1e-6, 1e-5, 0.1, 0.25)
    assert (config.mixup, config.cutmix, config.mixup_switch_prob) == (0.8, 1.0, 0.5)
    assert config.auto_augment == "rand-m9-mstd0.5-inc1" and config.color_jitter == 0.4
    assert (config.interpolation, config.eval_crop_pct, config.train_interpolation) == ("bicubic", 1.0, "random")
    # the official launch: 8 GPUs x 128 x 4 accumulation = 4096 images, lr 4e-3
    assert config.resolved_lr(8) * 4 == pytest.approx(4e-3 * config.accum_steps)
    assert dataclasses.replace(config, accum_steps=4).resolved_lr(8) == pytest.approx(4e-3)


def test_every_recipe_file_loads():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert names == [
        "ablate_digits",
        "ablate_pathfinder",
        "base_in1k",
        "digits_cpu",
        "femto_in1k",
        "kobe_in1k",
        "pathfinder_cpu",
        "small_in1k",
        "tiny_in1k",
    ]
    for name in names:
        build_config(None, load_config_file(name))
    # the recipes are package data, so a wheel install has them too (pyproject's package-data ships the folder)
    assert CONFIG_DIR.parent == Path(mambaout.__file__).parent
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    package_data = pyproject.split("[tool.setuptools.package-data]\nmambaout = [")[1].split("]")[0]
    assert '"configs/*.yaml"' in package_data.split(", ")


def test_lr_follows_the_global_batch_unless_set():
    config = TrainConfig(base_lr=1e-3, batch_size=128, accum_steps=2)
    assert config.global_batch(4) == 1024 and config.resolved_lr(4) == pytest.approx(1e-3)
    assert config.resolved_lr(1) == pytest.approx(2.5e-4)
    assert TrainConfig(lr=3e-4).resolved_lr(64) == 3e-4


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_overrides(parser.parse_args(argv))


def test_every_field_is_a_flag_and_only_given_flags_override():
    assert _parse([]) == {}
    given = _parse(["--batch-size", "64", "--no-channels-last", "--scale", "0.5", "1", "--lr", "none", "--ema"])
    config = build_config(None, {"lr": 1.0}, given)
    assert (config.batch_size, config.channels_last, config.scale, config.lr, config.ema) == (
        64,
        False,
        (0.5, 1.0),
        None,
        True,
    )
    config = build_config(None, _parse(["--model-kwargs", "{depths: [1, 1, 1, 1]}", "--opt-betas", "0.9", "0.95"]))
    assert config.model_kwargs == {"depths": [1, 1, 1, 1]} and config.opt_betas == (0.9, 0.95)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": "0"}, "--batch-size must be >= 1 (got 0)"),
        ({"epochs": "abc"}, "--epochs expects an integer, got 'abc'"),
        ({"epochs": "2.5"}, "--epochs expects an integer"),
        ({"amp": "fp8"}, "--amp must be one of auto, none, bf16, fp16"),
        ({"drop_path": "1.5"}, "--drop-path must be in [0, 1)"),
        ({"model": "mambaout_femtoo"}, "--model: unknown model 'mambaout_femtoo': did you mean 'mambaout_femto'?"),
        ({"opt": "adamz"}, "--opt must be a timm optimizer name"),
        ({"batch_size": "5"}, "--batch-size must be even when mixup/cutmix is on"),
        ({"scale": ["0.9", "0.1"]}, "--scale must be 0 < min <= max <= 1"),
        ({"warmup_epochs": "400"}, "--warmup-epochs must be within 0..--epochs"),
        ({"micro_batch": "0"}, "--micro-batch must be >= 1 (got 0)"),
        ({"split_linears": "maybe"}, "--split-linears must be one of auto, on, off"),
        ({"ema": "maybe"}, "--ema expects true or false"),
        ({"model_kwargs": "[1, 2]"}, "--model-kwargs expects a YAML mapping"),
    ],
)
def test_bad_values_name_their_flag(overrides, message):
    with pytest.raises(UserError) as info:
        build_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_recipe_files(tmp_path):
    (tmp_path / "typo.yaml").write_text("model: mambaout_tiny\nbatch_sise: 64\n")
    with pytest.raises(
        UserError, match=r"unknown config key 'batch_sise' in .*typo.yaml \(did you mean 'batch_size'\?\)"
    ):
        load_config_file(str(tmp_path / "typo.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config_file(str(tmp_path / "list.yaml"))
    with pytest.raises(UserError, match=r"no recipe named 'nope'.*femto_in1k"):
        load_config_file("nope")


def test_resolved_config_is_yaml_and_weights_only_safe():
    config = TrainConfig(opt_betas=(0.9, 0.99), model_kwargs={"depths": [1, 1, 1, 1]})
    plain = config.to_dict()
    assert TrainConfig(**yaml.safe_load(yaml.safe_dump(plain))) == config
    buffer = io.BytesIO()
    torch.save({"config": plain}, buffer)
    buffer.seek(0)
    assert TrainConfig(**torch.load(buffer, weights_only=True)["config"]) == config
