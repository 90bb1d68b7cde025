"""`create_model` and `save_pretrained`: timm's model creation and hub folders, for the registered variants.

`create_model` reads as timm's: resolve the name (`name`, `name.tag`, `hf-hub:ORG/REPO`, `local-dir:DIR`) to a
variant and its pretrained config, apply `pretrained_cfg_overlay`, count the network the creation arguments
describe (refused when too large, before anything is allocated), build it, load the pretrained weights and then
`checkpoint_path`, and wrap the network for `features_only`. `save_pretrained` writes
the hub folder timm's `create_model("local-dir:DIR", pretrained=True)` reads.
"""

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm.models
import torch
from timm.layers import set_layer_config
from torch import nn

from mambaout.errors import UserError, describe
from mambaout.models.capacity import check_model_size
from mambaout.models.features import features_only as wrap_features
from mambaout.models.mambaout import MambaOut
from mambaout.models.pretrained import load_pretrained
from mambaout.models.registry import get_spec, split_tag
from mambaout.weights import checkpoint_num_classes, load_checkpoint, our_layout, read_checkpoint_path, read_state_dict
from mambaout.weights.hub import read_hub_config, split_source, write_hub_folder

__all__ = ["create_model", "hub_config", "save_pretrained"]

# where a pretrained config says its weights are, in timm's order of precedence
_SOURCE_KEYS = ("state_dict", "file", "hf_hub_id", "url")
# constructor arguments timm's MambaOut takes with the same meaning as ours: the only ones a hub config can carry
_TIMM_ARGS = (
    "in_chans",
    "num_classes",
    "global_pool",
    "depths",
    "dims",
    "act_layer",
    "conv_ratio",
    "expansion_ratio",
    "kernel_size",
    "stem_mid_norm",
    "ls_init_value",
    "drop_rate",
    "drop_path_rate",
)
# a features_only extractor has no classifier, so its config drops what describes one (timm does the same)
_CLASSIFIER_KEYS = ("num_classes", "classifier", "global_pool")
# what the constructor raises on a bad argument (a hub config's become one line naming the file)
_CONSTRUCTOR_ERRORS = (TypeError, ValueError, RuntimeError)


def _check_timm_args(args: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(args) - set(_TIMM_ARGS))
    if unknown:
        raise UserError(f"{where} has model arguments timm's MambaOut and this one do not share: {', '.join(unknown)}")


def _timm_cfg(pretrained_cfg: Mapping[str, Any] | timm.models.PretrainedCfg) -> dict[str, Any]:
    """A whole pretrained config given by the caller, completed with timm's defaults as timm completes it."""
    if isinstance(pretrained_cfg, timm.models.PretrainedCfg):
        return pretrained_cfg.to_dict()
    known = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)}
    unknown = sorted(set(pretrained_cfg) - known)
    if unknown:
        raise UserError(f"pretrained_cfg has keys timm does not know: {', '.join(map(repr, unknown))}")
    return timm.models.PretrainedCfg(**pretrained_cfg).to_dict()


def _num_classes(
    num_classes: int | None,
    cfg: Mapping[str, Any],
    checkpoint: Mapping[str, torch.Tensor] | None,
    checkpoint_path: str | os.PathLike | None,
) -> int:
    """The classes to build: `num_classes`, else `checkpoint_path`'s classifier, else the pretrained config's.

    A `checkpoint_path` is loaded whole, as timm loads it (strictly): its classifier is the model's, so a
    `num_classes` that contradicts it is refused rather than served with a fresh, random head.
    """
    if checkpoint is None:
        return cfg.get("num_classes", 1000) if num_classes is None else num_classes
    theirs = checkpoint_num_classes(checkpoint)
    if num_classes is not None and num_classes != theirs:
        fresh = f", or pass it as pretrained= to fine-tune a fresh {num_classes}-class head" if theirs else ""
        raise UserError(
            f"checkpoint_path {os.fspath(checkpoint_path)} has a {theirs}-class classifier and num_classes is "
            f"{num_classes}: drop num_classes to take the checkpoint's{fresh}"
        )
    return theirs


def _check_declared_classes(
    weights: Mapping[str, torch.Tensor], name: str, declared: int, classes: int, where: str
) -> None:
    """Refuse weights whose classifier contradicts the `num_classes` their config declares, when the model takes
    their classifier (`classes` is the declared count), as timm's strict loading refuses them; another `classes`
    asks for a fresh head, and theirs is dropped."""
    theirs = checkpoint_num_classes(weights)
    if classes == declared != theirs:
        raise UserError(
            f"{where}: num_classes {declared} does not match the {theirs}-class classifier of {name}: fix the "
            f"config, or pass num_classes={theirs} (another count fine-tunes a fresh head)"
        )


def create_model(
    model_name: str,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    sha256: str | None = None,
    *,
    pretrained_cfg: str | Mapping[str, Any] | timm.models.PretrainedCfg | None = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] = (0, 1, 2, 3),
    feature_cls: str | type[nn.Module] = "list",
    feature_cfg: Mapping[str, Any] | None = None,
    scriptable: bool | None = None,
    exportable: bool | None = None,
    no_jit: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered variant, optionally with weights, taking timm's `create_model` arguments.

    Args:
        model_name: A name from `list_models()`; `name.tag` for one of its pretrained tags (a bare name means the
            default tag); `local-dir:DIR` or `hf-hub:ORG/REPO[@REVISION]` for a hub folder in timm's format.
        pretrained: False; True for the config's weights (the tag's first published source, a hub folder's own
            weights, or a source set in `pretrained_cfg_overlay`); a source name ("official", "timm"); or a
            checkpoint path, URL or hub folder in any layout `load_checkpoint` reads.
        num_classes: Classifier outputs (0: pooled features); default `checkpoint_path`'s classifier, else the
            pretrained config's. When it differs from the config's, the pretrained weights' classifier is dropped with
            a warning (a fresh head to fine-tune); when it differs from `checkpoint_path`'s, it is refused.
        sha256: Expected SHA-256 of the downloaded or given file.
        pretrained_cfg: A tag name, or a whole pretrained config (dict) used instead of the tag's.
        pretrained_cfg_overlay: Keys replacing the config's, e.g. `dict(file="weights.pth")` to load other weights
            with `pretrained=True`, or other `input_size`, `mean`, `std`.
        checkpoint_path: Weights loaded after the pretrained ones (its EMA weights when it has them, as timm does),
            whole: the model takes its classifier, so a run's checkpoint (`mambaout train`) gives the run's classes;
            a run of this variant also gives its model_kwargs (token mixer, depths, dims), under the ones passed.
        cache_dir: huggingface_hub's cache folder for `hf-hub:` names and sources; default its own.
        features_only: Return a feature extractor (see `mambaout.models.features`) instead of the classifier.
        out_indices: The extractor's stages (0-3, negative from the end, or an int n for the last n).
        feature_cls: The extractor: "list" (default) / "getter" (NCHW maps), timm's "dict", "hook", "fx", or a class.
        feature_cfg: More arguments for the extractor, e.g. `dict(output_fmt="NHWC")`.
        scriptable: timm's layer config flags, set while the model is built.
        exportable: As `scriptable`.
        no_jit: As `scriptable`.
        **kwargs: Constructor arguments such as `in_chans` (a 3-channel checkpoint's first conv is adapted as
            timm's `adapt_input_conv` does), `global_pool` ("avg", "max", "avgmax", ""), `drop_rate`,
            `drop_path_rate`; and `device` / `dtype` to build the model on or in. None values are ignored, as in
            timm.

    Returns:
        The model in train mode, with `pretrained_cfg` and `default_cfg` (the same dict, timm's keys) describing its
        expected input, or the feature extractor.

    Raises:
        UserError: Unknown name or tag; unreadable hub folder or checkpoint; a hub config with a bad field or
            arguments the constructor refuses; a network past `capacity.MAX_PARAMETERS` parameters or the memory
            free where it is built (checked before anything is allocated); weights that do not fit, or whose
            classifier contradicts their config's or the given `num_classes`.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    hub, location = split_source(model_name)
    if hub:
        if pretrained_cfg is not None:
            raise UserError(f"{model_name} brings its own pretrained config: drop pretrained_cfg")
        config = read_hub_config(hub, location, cache_dir)
        spec, tag_cfg, cfg = get_spec(config["architecture"]), None, config["pretrained_cfg"]
        hub_args = {k: v for k, v in config["model_args"].items() if k != "num_classes"}
        _check_timm_args(hub_args, model_name)
        kwargs = {**hub_args, **kwargs}
        explicit = {"file": f"{hub}:{location}"}  # the folder's own weights
        where = str(config["path"])
    else:
        spec = get_spec(model_name)
        tag_cfg = spec.tag_cfg(pretrained_cfg if isinstance(pretrained_cfg, str) else split_tag(model_name)[1])
        given = pretrained_cfg is not None and not isinstance(pretrained_cfg, str)
        cfg = _timm_cfg(pretrained_cfg) if given else tag_cfg.timm_dict(spec.name)
        explicit = cfg if given else {}
        where = model_name
    overlay = dict(pretrained_cfg_overlay or {})
    cfg = {**cfg, **overlay, "architecture": spec.name}
    sources = {k: v for k, v in {**explicit, **overlay}.items() if k in _SOURCE_KEYS and v}  # timm: '' is none
    checkpoint, run_model = read_checkpoint_path(checkpoint_path, cache_dir) if checkpoint_path else (None, None)
    classes = _num_classes(num_classes, cfg, checkpoint, checkpoint_path)
    adopted = run_model is not None and split_tag(run_model[0])[0] == spec.name  # a run of this variant
    if adopted:  # built as the run built it (another mixer, depths, dims); given arguments win
        kwargs = {**run_model[1], **kwargs}
    built_from = os.fspath(checkpoint_path) if adopted else where  # whose arguments a refusal names

    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)  # where to build, not what
    args = {"num_classes": classes, "in_chans": cfg.get("input_size", (3,))[0], **kwargs}
    try:
        check_model_size(spec.name, spec.arch, args, built_from, torch.device(device or torch.get_default_device()))
    except _CONSTRUCTOR_ERRORS as e:
        if not (hub or adopted):
            raise  # the constructor's own error, as from timm's create_model
        raise UserError(f"{built_from}: cannot build {spec.name} from its model_args: {describe(e)}") from None
    placement = torch.device(device) if device is not None else contextlib.nullcontext()
    with placement, set_layer_config(scriptable=scriptable, exportable=exportable, no_jit=no_jit):
        model = spec.build(**args)
    if dtype is not None:
        model.to(dtype)
    model.pretrained_cfg = model.default_cfg = {**cfg, "num_classes": classes}
    model.model_args = kwargs  # what `save_pretrained` records for rebuilding

    if pretrained is True and sources:
        key = next(k for k in _SOURCE_KEYS if k in sources)
        if key == "state_dict":
            load_checkpoint(model, sources[key], name="pretrained_cfg['state_dict']")
        else:
            name = f"hf-hub:{sources[key]}" if key == "hf_hub_id" else os.fspath(sources[key])
            weights = our_layout(read_state_dict(name, sha256=sha256, cache_dir=cache_dir), name)
            _check_declared_classes(weights, name, cfg.get("num_classes", 1000), classes, where)
            load_checkpoint(model, weights, name=name)
    elif pretrained:
        load_pretrained(model, spec, pretrained, sha256=sha256, cfg=tag_cfg, cache_dir=cache_dir)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name=os.fspath(checkpoint_path))
    if not features_only:
        return model
    extractor = wrap_features(model, out_indices, feature_cls, **(feature_cfg or {}))
    extractor.pretrained_cfg = extractor.default_cfg = {
        k: v for k, v in model.pretrained_cfg.items() if k not in _CLASSIFIER_KEYS
    }
    return extractor


def hub_config(model: MambaOut) -> dict[str, Any]:
    """The `config.json` `save_pretrained` writes for `model`, in the form timm's `save_for_hf` writes.

    Returns:
        architecture, num_classes, num_features, global_pool, the creation arguments as `model_args` (the ones
        timm's MambaOut shares), and the pretrained config of the model's current input and classes.

    Raises:
        UserError: The model is not a registered architecture timm can rebuild: not built by `create_model`, built
            with arguments timm does not share, pruned, or its head reset with `reset_other`.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(model, MambaOut) or not isinstance(cfg, Mapping) or "architecture" not in cfg:
        raise UserError("save_pretrained takes a model built by mambaout.create_model (a registered variant)")
    name = cfg["architecture"]
    args = {**getattr(model, "model_args", {}), "num_classes": model.num_classes, "in_chans": model.in_chans}
    args["global_pool"] = model.head.pool_type
    _check_timm_args(args, f"this {name}")
    with torch.device("meta"):
        twin = get_spec(name).build(**args)
    if {k: v.shape for k, v in twin.state_dict().items()} != {k: v.shape for k, v in model.state_dict().items()}:
        raise UserError(
            f"this {name} no longer has {name}'s layers (pruned, or its head reset): timm cannot rebuild it"
        )
    try:
        json.dumps(args)
    except TypeError as e:
        raise UserError(f"this {name} was built with arguments a config file cannot hold ({e})") from e

    # where the weights came from does not travel with them, nor the architecture (a top-level key), as in timm
    dropped = (*_SOURCE_KEYS, "hf_hub_filename", "source", "architecture")
    pretrained_cfg = {k: v for k, v in cfg.items() if k not in dropped and v is not None}
    # the current input, as timm's save_for_hf records it: the model's channels, and a mean/std that does not fit
    # them replaced by its average
    chans = model.in_chans
    for key in ("input_size", "test_input_size"):
        if key in pretrained_cfg:
            pretrained_cfg[key] = (chans, *pretrained_cfg[key][1:])
    for key in ("mean", "std"):
        if key in pretrained_cfg and len(pretrained_cfg[key]) not in (1, chans):
            pretrained_cfg[key] = (sum(pretrained_cfg[key]) / len(pretrained_cfg[key]),)
    pretrained_cfg.update(num_classes=model.num_classes, custom_load=False, fixed_input_size=False)
    return {
        "architecture": name,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        **({"global_pool": model.head.pool_type} if model.head.pool_type else {}),
        # timm's save_for_hf writes the class names at the top too, where transformers' timm wrapper reads them
        **({"label_names": pretrained_cfg["label_names"]} if "label_names" in pretrained_cfg else {}),
        # the classes once, at the top: transformers' timm wrapper passes `num_classes` beside `model_args`
        "model_args": {k: v for k, v in args.items() if k != "num_classes"},
        "pretrained_cfg": pretrained_cfg,
    }


def save_pretrained(model: MambaOut, directory: str | os.PathLike) -> Path:
    """Write `model` as a hub folder in timm's format, which `timm.create_model("local-dir:DIR")` loads.

    The folder gets `model.safetensors` (timm's key layout) and `config.json` (`hub_config`).

    Args:
        model: A model from `create_model` (a registered architecture, any classifier size and input channels).
        directory: The folder, created if missing.

    Returns:
        The folder.

    Raises:
        UserError: The model is not one timm can rebuild (see `hub_config`), or the folder cannot be written.
    """
    return write_hub_folder(directory, hub_config(model), model.state_dict())
