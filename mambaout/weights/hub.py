"""Hub folders in timm's format: `config.json` plus `model.safetensors` in timm's key layout.

A folder is named as timm names it: `local-dir:DIR` for a folder on disk, `hf-hub:ORG/REPO[@REVISION]` for a
Hugging Face Hub repository, whose files are taken from huggingface_hub's cache when it has them and downloaded into
it otherwise (so timm and this package share one copy); a repository id or revision huggingface_hub would refuse,
or one that would lead out of its cache, is refused first. A `config.json` read is checked field by field
(`hub_config`). `write_hub_folder` writes the format that `timm.create_model("local-dir:DIR", pretrained=True)` reads.
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from mambaout.errors import UserError, one_line
from mambaout.weights.hub_config import check_hub_config
from mambaout.weights.io import atomic_write, save_state_dict
from mambaout.weights.layouts import convert_state_dict

__all__ = ["HUB_SOURCES", "hub_weights_file", "read_hub_config", "split_source", "write_hub_folder"]

HUB_SOURCES = ("hf-hub", "local-dir")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# the weight files timm looks for in a folder, in its order of preference (safetensors first)
_WEIGHT_FILES = (WEIGHTS_NAME, "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# a branch, tag or commit: names joined by '/', none of them '.' or '..' (huggingface_hub reads `refs/<revision>` in
# its cache, so a revision must not climb out of it)
_REVISION = re.compile(r"(?!\.\.?(/|$))[\w.-]+(/(?!\.\.?(/|$))[\w.-]+)*", re.ASCII)


def split_source(name: str) -> tuple[str | None, str]:
    """`"hf-hub:timm/x"` -> `("hf-hub", "timm/x")`; a name without a hub prefix -> `(None, name)`.

    Raises:
        UserError: A hub prefix with nothing after it, or an `hf-hub:` name that is no repository id
            (`ORG/NAME[@REVISION]` as huggingface_hub validates it, and a revision that stays in its cache).
    """
    prefix, sep, rest = name.partition(":")
    source = prefix.lower().replace("_", "-")  # timm also takes `hf_hub:`
    if not sep or source not in HUB_SOURCES:
        return None, name
    if not rest:
        raise UserError(f"'{name}' names no folder or repository after '{prefix}:'")
    if source == "hf-hub":
        _check_repo(name, rest)
    return source, rest


def _check_repo(name: str, repo: str) -> None:
    repo_id, at, revision = repo.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(
            f"'{one_line(name, 120)}' is no Hugging Face Hub repository id ({e}): name one as hf-hub:ORG/NAME"
        ) from None
    if at and not _REVISION.fullmatch(revision):
        raise UserError(
            f"'{one_line(name, 120)}': the revision after '@' must be a branch, tag or commit (letters, digits, "
            "'.', '_', '-' and '/', no '.' or '..' part)"
        )


def _hf_file(repo: str, filename: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """`filename` of Hub repository `repo` (`id[@revision]`): from the cache, else downloaded; None if absent."""
    repo_id, _, revision = repo.partition("@")
    revision = revision or None
    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache records that the repository has no such file
        return None
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError, its base class
        raise UserError(
            f"'{filename}' of hf-hub:{repo} is not in the Hugging Face cache and could not be downloaded (offline?); "
            "download the repository once with network access, or pass its folder as local-dir:DIR"
        ) from e
    except EntryNotFoundError:
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise UserError(f"no Hugging Face Hub repository or revision 'hf-hub:{repo}' (or it is private)") from e
    except OSError as e:  # HTTP and connection errors
        raise UserError(f"could not fetch '{filename}' of hf-hub:{repo} ({type(e).__name__}: {e})") from e


def _hub_file(source: str, location: str, filename: str, cache_dir: str | os.PathLike | None) -> Path | None:
    if source == "hf-hub":
        return _hf_file(location, filename, cache_dir)
    folder = Path(location).expanduser()
    if not folder.is_dir():
        raise UserError(f"local-dir:{location} is not a folder")
    path = folder / filename
    return path if path.is_file() else None


def read_hub_config(source: str, location: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The `config.json` of a hub folder, checked (`check_hub_config`), in timm's current form.

    Args:
        source: "hf-hub" or "local-dir" (see `split_source`).
        location: The repository id or folder.
        cache_dir: huggingface_hub's cache folder; default its own.

    Returns:
        `architecture`, `num_classes`, `model_args` (constructor arguments), `pretrained_cfg` (with `source` and
        `hf_hub_id` or `file` saying where it came from, as timm records them) and `path` (the file read).

    Raises:
        UserError: No config.json, not JSON, or a field missing, mistyped or out of range (the message names it).
    """
    name = f"{source}:{location}"
    path = _hub_file(source, location, CONFIG_NAME, cache_dir)
    if path is None:
        raise UserError(f"{name} has no {CONFIG_NAME}: is it a timm model folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    check_hub_config(config, path)
    cfg = dict(config.get("pretrained_cfg", {}))
    if "pretrained_cfg" not in config:  # timm's older single-dict configs
        cfg = {k: v for k, v in config.items() if k not in ("architecture", "num_features")}
    if "num_classes" in config:
        cfg["num_classes"] = config["num_classes"]
    cfg.update(
        {"source": source, "hf_hub_id": location} if source == "hf-hub" else {"source": source, "file": location}
    )
    model_args = dict(config.get("model_args", {}))
    if "in_chans" in model_args:  # the saved input is the current model's, as timm reads it
        cfg["input_size"] = (model_args["in_chans"], *cfg.get("input_size", (3, 224, 224))[1:])
    return {
        "architecture": config["architecture"],
        "num_classes": cfg.get("num_classes", 1000),
        "model_args": model_args,
        "pretrained_cfg": cfg,
        "path": path,
    }


def hub_weights_file(source: str, location: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The weights file of a hub folder: the first of timm's preferred names it has.

    Raises:
        UserError: The folder has none of them.
    """
    for filename in _WEIGHT_FILES:
        path = _hub_file(source, location, filename, cache_dir)
        if path is not None:
            return path
    raise UserError(f"{source}:{location} has no weights file (looked for {', '.join(_WEIGHT_FILES)})")


def write_hub_folder(
    directory: str | os.PathLike, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> Path:
    """Write a hub folder: `model.safetensors` (converted to timm's key layout) and `config.json`, each atomically.

    Args:
        directory: The folder, created if missing; files of the same names in it are replaced.
        config: timm's `config.json` content (architecture, num_classes, pretrained_cfg, ...).
        state_dict: The weights, in any layout `convert_state_dict` reads.

    Returns:
        The folder.

    Raises:
        UserError: The folder cannot be created or written.
    """
    folder = Path(directory).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e.strerror or e}") from e
    save_state_dict(convert_state_dict(state_dict, to="timm"), folder / WEIGHTS_NAME)
    with atomic_write(folder / CONFIG_NAME) as f:
        f.write((json.dumps(config, indent=2) + "\n").encode())
    return folder
