"""The three key layouts of MambaOut weights, how to tell them apart, and conversion between them.

- "mambaout": this package's `MambaOut.state_dict()`.
- "timm": timm's `mambaout_*` models; blocks hold `conv.*` directly and the head's hidden layers are `pre_logits.*`.
- "official": the paper's release (github.com/yuweihao/MambaOut, five variants); the stem is `downsample_layers.0`,
  blocks are `stages.{i}.{j}`, and the head's first LayerNorm sits at the top level as `norm.*`.

Every conversion goes through our layout: other -> "mambaout" -> other. Keys are renamed only; tensors are shared,
not copied.
"""

import re
from collections.abc import Mapping

import torch

from mambaout.errors import UserError

__all__ = ["LAYOUTS", "convert_state_dict", "detect_layout"]

LAYOUTS = ("mambaout", "timm", "official")

# (our key prefix, their key prefix) pairs; `{i}` / `{j}` stand for stage / block indices. The first pair whose
# prefix matches renames a key and the rest of the key is kept; keys no pair matches are the same in both layouts.
# A more specific prefix must come before a more general one (blocks' `mixer.conv.` before the block itself).
_RENAMES = {
    "timm": (
        ("stages.{i}.blocks.{j}.mixer.conv.", "stages.{i}.blocks.{j}.conv."),
        ("head.fc1.", "head.pre_logits.fc."),
        ("head.hidden_norm.", "head.pre_logits.norm."),
    ),
    "official": (
        ("stem.", "downsample_layers.0."),
        ("stages.{i}.downsample.", "downsample_layers.{i}."),
        ("stages.{i}.blocks.{j}.mixer.conv.", "stages.{i}.{j}.conv."),
        ("stages.{i}.blocks.{j}.", "stages.{i}.{j}."),
        ("head.norm.", "norm."),
        ("head.hidden_norm.", "head.norm."),
        ("head.fc.", "head.fc2."),
    ),
}

# Keys only one layout has; the first hit decides. Checked in this order because timm and ours share most names.
_MARKERS = (
    ("official", re.compile(r"^(downsample_layers\.|stages\.\d+\.\d+\.)")),
    ("timm", re.compile(r"^(stages\.\d+\.blocks\.\d+\.conv\.|head\.pre_logits\.)")),
    ("mambaout", re.compile(r"^(stages\.\d+\.blocks\.\d+\.mixer\.|head\.fc1\.|head\.hidden_norm\.)")),
)


def _prefix_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(pattern)


def _compile(pairs: tuple[tuple[str, str], ...], reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    """Rename rules `(regex matching the source prefix, target prefix template)` for one direction."""
    return [(_prefix_regex(theirs if reverse else ours), ours if reverse else theirs) for ours, theirs in pairs]


_TO_OURS = {layout: _compile(pairs, reverse=True) for layout, pairs in _RENAMES.items()}
_FROM_OURS = {layout: _compile(pairs, reverse=False) for layout, pairs in _RENAMES.items()}


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for regex, target in rules:
        if match := regex.match(key):
            return target.format(**match.groupdict()) + key[match.end() :]
    return key


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which layout a MambaOut state dict is in.

    Args:
        state_dict: Parameter name -> tensor, with any `module.` prefixes already stripped.

    Returns:
        "official", "timm" or "mambaout".

    Raises:
        UserError: The keys are none of the three (a checkpoint of another architecture, or not weights at all).
    """
    for layout, marker in _MARKERS:
        if any(marker.match(key) for key in state_dict):
            return layout
    sample = ", ".join(list(state_dict)[:4]) or "none"
    raise UserError(
        f"not MambaOut weights: the keys match none of the layouts {', '.join(LAYOUTS)} (first keys: {sample})"
    )


def _check_official_can_hold(state_dict: Mapping[str, torch.Tensor]) -> None:
    """The official layout has only the five paper variants; timm's rw variants have no place in it."""
    rw_signs = [
        any(key.endswith(".ls.gamma") for key in state_dict),
        "stem.conv1.weight" in state_dict and "stem.norm1.weight" not in state_dict,
        "head.fc1.weight" in state_dict and "head.hidden_norm.weight" not in state_dict,
    ]
    if any(rw_signs):
        raise UserError(
            "these are weights of a timm rw variant (LayerScale, no stem or head hidden norm), which the official "
            "layout cannot hold: it has only the five paper variants; convert to 'mambaout' or 'timm' instead"
        )


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], to: str, source: str | None = None
) -> dict[str, torch.Tensor]:
    """Rename the keys of a MambaOut state dict into another layout.

    Args:
        state_dict: Parameter name -> tensor in any of the three layouts.
        to: Target layout, one of `LAYOUTS`.
        source: The input's layout; detected from its keys when None.

    Returns:
        A new dict in layout `to`, sharing the input's tensors (same order).

    Raises:
        UserError: The input is not MambaOut weights, or rw-variant weights are converted to "official".
    """
    if to not in LAYOUTS:
        raise ValueError(f"unknown layout {to!r}; expected one of {LAYOUTS}")
    source = source or detect_layout(state_dict)
    ours = {_rename(k, _TO_OURS[source]): v for k, v in state_dict.items()} if source != "mambaout" else state_dict
    if to == "official":
        _check_official_can_hold(ours)
    if to == "mambaout":
        return dict(ours)
    return {_rename(k, _FROM_OURS[to]): v for k, v in ours.items()}
