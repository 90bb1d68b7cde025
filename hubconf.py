"""torch.hub entry points, one per registered variant, generated from the registry.

    model = torch.hub.load("path/to/mambaout", "mambaout_tiny", source="local", pretrained=True)

Every entry point takes `mambaout.create_model`'s arguments (`pretrained`, `num_classes`, `features_only`, ...).
"""

from collections.abc import Callable

import torch

import mambaout

dependencies = ["torch", "torchvision", "timm", "safetensors", "huggingface_hub"]


def _entry_point(name: str) -> Callable[..., torch.nn.Module]:
    def entry_point(pretrained: bool | str = False, **kwargs) -> torch.nn.Module:
        return mambaout.create_model(name, pretrained=pretrained, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = f"{name}: `mambaout.create_model({name!r}, pretrained=pretrained, **kwargs)`."
    return entry_point


globals().update({name: _entry_point(name) for name in mambaout.list_models()})
