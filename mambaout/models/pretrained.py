"""Published weights of a registered variant: where `pretrained=` points (a tag's named source, or a path, URL or
hub folder) and loading them into a freshly built model."""

import os
import re
from pathlib import Path

from torch import nn

from mambaout.errors import UserError
from mambaout.models.registry import ModelSpec, PretrainedCfg
from mambaout.weights import load_checkpoint, read_state_dict

__all__ = ["load_pretrained", "pretrained_location"]


def pretrained_location(
    spec: ModelSpec,
    pretrained: bool | str | os.PathLike,
    sha256: str | None = None,
    cfg: PretrainedCfg | None = None,
) -> tuple[str, str | None]:
    """Where the weights `pretrained=` names live, and the SHA-256 to check them against.

    Args:
        spec: The registered variant.
        pretrained: True for the tag's first published source; a source name ("official", "timm"); or a
            checkpoint path, URL or hub folder (see `read_state_dict`).
        sha256: Expected hex SHA-256 of the file; defaults to the source's published hash, if any.
        cfg: The pretrained tag whose sources are meant; default the variant's default tag.

    Raises:
        UserError: The tag has no such source (the message lists those it has).
    """
    cfg = cfg or spec.cfg
    name = spec.name if cfg is spec.cfg else f"{spec.name}.{cfg.tag}"
    sources = {source.name: source for source in cfg.sources}
    if pretrained is True:
        if not sources:
            raise UserError(f"{name} has no published weights; pass a checkpoint path as pretrained")
        pretrained = cfg.sources[0].name
    location = os.fspath(pretrained)
    if location in sources:
        return sources[location].url, sha256 or sources[location].sha256
    if re.fullmatch(r"[\w-]+", location) and not Path(location).exists():
        # a bare word that is no file is meant as a source name, so say which names exist
        valid = ", ".join(f"'{source}'" for source in sources) or "none"
        raise UserError(
            f"{name} has no '{location}' weights: its sources are {valid}; or pass a checkpoint path or URL"
        )
    return location, sha256


def load_pretrained(
    model: nn.Module,
    spec: ModelSpec,
    pretrained: bool | str | os.PathLike,
    sha256: str | None = None,
    cfg: PretrainedCfg | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> None:
    """Load the weights `create_model(..., pretrained=...)` asks for (see `pretrained_location`).

    Args:
        model: A freshly built `spec` model.
        cache_dir: huggingface_hub's cache folder for `hf-hub:` sources.

    Raises:
        UserError: The tag has no such source, or loading failed.
    """
    location, sha256 = pretrained_location(spec, pretrained, sha256, cfg)
    load_checkpoint(model, read_state_dict(location, sha256=sha256, cache_dir=cache_dir), name=location)
