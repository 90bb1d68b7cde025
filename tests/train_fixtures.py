"""Helpers for the data and training tests: tiny learnable ImageFolder trees, fast training flags, waiting on a
training process, and comparing the weights of runs made in two processes."""

import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# a 40k-parameter MambaOut and settings that make a run deterministic and take a second or two on a CPU
TINY_MODEL = "{depths: [1, 1, 1, 1], dims: [8, 16, 24, 32]}"
FAST = {
    "model_kwargs": TINY_MODEL,
    "input_size": "32",
    "batch_size": "4",
    "epochs": "2",
    "lr": "1e-3",
    "warmup_epochs": "0",
    "workers": "0",
    "threads": "1",
    "mixup": "0",
    "cutmix": "0",
    "auto_augment": "none",
    "color_jitter": "none",
    "re_prob": "0",
    "hflip": "0",
    "scale": ["1", "1"],
    "ratio": ["1", "1"],
    "train_interpolation": "bicubic",
    "drop_path": "0",
    "amp": "none",
    "channels_last": "false",
    "log_interval": "1000",
}


def flags(**overrides: object) -> list[str]:
    """`mambaout train` flags: FAST updated by `overrides` (lists for multi-value flags, "true"/"false" for on/off)."""
    return settings_flags(FAST, **overrides)


def settings_flags(base: dict, **overrides: object) -> list[str]:
    """Command-line flags of the settings `base` updated by `overrides`."""
    settings = {**base, **overrides}
    argv: list[str] = []
    for key, value in settings.items():
        flag = key.replace("_", "-")
        if value in ("true", "false"):  # on/off flags: --ema / --no-ema
            argv.append(f"--{flag}" if value == "true" else f"--no-{flag}")
            continue
        argv.append(f"--{flag}")
        argv.extend(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])
    return argv


def write_image(path: Path, label: int, size: int = 16, seed: int = 0) -> Path:
    """A noisy image whose mean color says its class (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    base = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40]][label % 4], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_tree(root: Path, classes: tuple[str, ...] = ("a", "b"), train: int = 16, val: int = 4) -> Path:
    """`root/{train,val}/<class>/<i>.png` with `train` and `val` images per class."""
    for split, count in (("train", train), ("val", val)):
        for label, name in enumerate(classes):
            for i in range(count):
                write_image(
                    root / split / name / f"{i:03d}.png", label, seed=(split == "val") * 100_000 + label * 1_000 + i
                )
    return root


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `process` (a run in the background) has written `path`; fail if it ends or `timeout` s pass first.

    Polls every 5 ms, so that a signal sent next lands close to the write (mid-run, or mid-save).
    """
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


# About one fresh process in 20 on the CPU where this was measured (AMD Zen 4) computes the same training with last-bit
# differences (found by hashing the weights of 80 identical runs; not the core, the hash seed, malloc or the load):
# after 12 epochs of the resume tests' recipe they reach 1.8e-7. A resume that does not restore the random state
# moves test_train_resume's weights by 1.5e-2, one whose schedule is one step off by 9e-5.
CROSS_PROCESS_ATOL = 1e-5


def assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """The state dicts of two runs of the same training, one of them made in another process, are the same weights."""
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        named = lambda message, name=name: f"{name}: {message}"  # noqa: E731
        torch.testing.assert_close(ours[name], value, rtol=0, atol=CROSS_PROCESS_ATOL, msg=named)
