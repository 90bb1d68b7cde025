"""Evaluation and prediction with a trained model: from any checkpoint to metrics or top-k class names.

Evaluation reads an ImageFolder tree, or WebDataset shards / a Hugging Face dataset (`wds:`/`hfds:` names,
`mambaout.data.named.source_eval_set`) with their classes matched to the model's outputs the same way.

A `mambaout train` checkpoint brings its model name, class names and preprocessing, and so does a hub folder
(`local-dir:DIR`, `hf-hub:ORG/REPO`: its `pretrained_cfg`, e.g. a run shared by `mambaout export --format hub`);
other weights (published, official, timm, a plain state dict) need `--model` and use the model's ImageNet
preprocessing and class names.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mambaout.data import (
    ImageFiles,
    RobustImageFolder,
    ShardSampler,
    digits_tree,
    list_images,
    named_inputs,
    parse_source_name,
    resolve_data,
    source_eval_set,
)
from mambaout.data.folder import class_folders
from mambaout.data.labels import IMAGENET_CLASSES, imagenet_class_names, imagenet_synsets
from mambaout.data.transforms import data_config, eval_transform
from mambaout.errors import UserError
from mambaout.models import create_model
from mambaout.models.settings import check_activation_memory, create_configured_model
from mambaout.train.checkpoint import is_run_checkpoint
from mambaout.train.distributed import DistEnv
from mambaout.train.engine import evaluate, predict
from mambaout.weights import checkpoint_num_classes, load_checkpoint, our_layout, unwrap_state_dict
from mambaout.weights.download import is_url
from mambaout.weights.hub import split_source
from mambaout.weights.io import read_file

__all__ = [
    "Classifier",
    "evaluate_folder",
    "find_images",
    "load_classifier",
    "match_class_folders",
    "match_class_names",
    "predict_files",
    "resolve_eval_folder",
]


@dataclass
class Classifier:
    """A model ready for inference with what it needs to read images and name classes.

    Attributes:
        model: In eval mode, on its device.
        model_name: Registered variant.
        class_names: Display name per output (folder names, ImageNet descriptions, or `class_<i>`).
        folder_classes: Folder name per output, to label an ImageFolder tree (None: sorted folders).
        data: timm data config (input_size, interpolation, crop_pct, mean, std).
        source: Where the weights came from, for records.
        val_data: The validation split of the run that trained it (a folder, or the run's `wds:`/`hfds:` data,
            whose validation split evaluation reads), when known.
    """

    model: nn.Module
    model_name: str
    class_names: list[str]
    folder_classes: list[str] | None
    data: dict[str, Any]
    source: str
    val_data: Path | str | None = None


def load_classifier(
    checkpoint: str | None,
    model_name: str | None = None,
    prefer_ema: bool = False,
    device: torch.device | str = "cpu",
    input_size: int | None = None,
    crop_pct: float | None = None,
) -> Classifier:
    """Build the model a checkpoint describes and load it.

    Args:
        checkpoint: A `mambaout train` checkpoint; any weights file or URL `load_checkpoint` reads (needs
            `model_name`); a source name ("official", "timm"); or None for the variant's published weights.
        model_name: Registered variant; default the training checkpoint's.
        prefer_ema: Use the checkpoint's EMA weights.
        device: Where to put the model.
        input_size: Evaluate at this square size instead of the checkpoint's / model's.
        crop_pct: Center-crop fraction instead of the checkpoint's / model's.

    Raises:
        UserError: Unreadable or unfitting checkpoint, unknown model, a model without a classifier, or `model_name`
            missing when needed.
    """
    local = checkpoint is not None and not is_url(checkpoint) and Path(checkpoint).expanduser().exists()
    loaded = read_file(Path(checkpoint).expanduser()) if local else None
    if is_run_checkpoint(loaded):
        task = loaded.get("task", "classification")
        if task != "classification":  # a `mambaout detect|segment train` run
            command = {"detection": "detect", "segmentation": "segment"}.get(task, task)
            raise UserError(f"{checkpoint} is a {task} checkpoint: use it with `mambaout {command} eval` or `predict`")
        saved = loaded["config"]
        if model_name and model_name != loaded["model_name"]:
            raise UserError(f"{checkpoint} holds a {loaded['model_name']}, not a {model_name}: drop --model")
        model_name = loaded["model_name"]
        names = list(loaded["class_names"])
        kwargs = saved.get("model_kwargs", {})
        model = create_configured_model(model_name, kwargs, f"{checkpoint}'s model_kwargs", num_classes=len(names))
        load_checkpoint(model, loaded, prefer_ema=prefer_ema, name=str(checkpoint))
        data = data_config(
            model,
            saved.get("input_size") if input_size is None else input_size,
            saved.get("eval_crop_pct") if crop_pct is None else crop_pct,
            saved.get("interpolation"),
            saved.get("mean"),
            saved.get("std"),
        )
        trained_on = parse_source_name(saved.get("data"))  # wds:/hfds: data, whose validation split eval reads
        if trained_on is None:
            val = resolve_data(saved.get("data"), "classification", digits_tree) / "val"
        else:
            val = trained_on.validation
        return Classifier(model.to(device).eval(), model_name, names, names, data, str(checkpoint), val)
    if checkpoint is not None and split_source(checkpoint)[0] is not None:  # a hub folder: its config says it all
        model = create_model(checkpoint, pretrained=True)
        name = model.pretrained_cfg["architecture"]
        if model_name and model_name != name:
            raise UserError(f"{checkpoint} holds a {name}, not a {model_name}: drop --model")
        if not model.num_classes:
            raise UserError(f"{checkpoint} has no classifier (num_classes 0): use a classification model")
        names = model.pretrained_cfg.get("label_names")
        offset = model.pretrained_cfg.get("label_offset") or 0
        if names is None or offset:
            names, folders = _default_names(model.num_classes)
        else:
            names, folders = list(names), list(names)
        data = data_config(model, input_size, crop_pct)
        return Classifier(model.to(device).eval(), name, names, folders, data, checkpoint)
    if not model_name:
        raise UserError(
            f"--model is needed for {checkpoint or 'published weights'} (not a `mambaout train` checkpoint)"
        )
    if loaded is not None:
        weights = our_layout(unwrap_state_dict(loaded, prefer_ema, name=str(checkpoint)), str(checkpoint))
        model = create_model(model_name, num_classes=checkpoint_num_classes(weights))
        load_checkpoint(model, weights, name=str(checkpoint))
    else:
        model = create_model(model_name, pretrained=checkpoint or True)
    classes = model.num_classes
    if not classes:  # a feature extractor's outputs are features, not class scores
        raise UserError(f"{checkpoint or model_name} has no classifier (num_classes 0): use a classification model")
    names, folders = _default_names(classes)
    data = data_config(model, input_size, crop_pct)
    return Classifier(model.to(device).eval(), model_name, names, folders, data, checkpoint or "published")


def _default_names(classes: int) -> tuple[list[str], list[str] | None]:
    """Display names and folder names of a model's outputs when nothing names them: ImageNet's for 1000, else
    `class_<i>` (folders then matched in sorted order)."""
    if classes == IMAGENET_CLASSES:
        return list(imagenet_class_names()), list(imagenet_synsets())
    return [f"class_{i}" for i in range(classes)], None


def resolve_eval_folder(root: str | os.PathLike) -> Path:
    """The class-folder tree to evaluate: `root`, or `root/val` when `root` is a dataset root (`train/` and `val/`);
    a data name (`pathfinder:32-14`) stands for its tree."""
    root = resolve_data(root, "classification", digits_tree)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root / "val"
    return root


def match_class_folders(
    classifier: Classifier, root: Path, class_map: dict[str, str] | None = None, by_position: bool = False
) -> dict[str, int]:
    """The output index of each class folder under `root`.

    Folders are matched to the model's outputs by name: the checkpoint's class names, or ImageNet's WordNet ids
    (`n01440764`) for ImageNet weights; `class_map` renames folders first (folder -> class). `by_position` (and a
    model whose outputs have no names) takes the sorted folders as the outputs in order instead, as torchvision's
    ImageFolder labels them.

    Raises:
        UserError: A folder the model does not know (its name is not a class and `class_map` does not map it), a
            mapping to an unknown class, or matching by position with another number of folders than outputs.
    """
    return match_class_names(classifier, class_folders(root), str(root), class_map, by_position)


def match_class_names(
    classifier: Classifier,
    folders: list[str],
    where: str,
    class_map: dict[str, str] | None = None,
    by_position: bool = False,
    noun: str = "class folders",
) -> dict[str, int]:
    """The output index of each of the data's class names `folders` (in label order), as `match_class_folders`.

    Args:
        where: The data, for messages.
        noun: What the names are, for messages ("class folders", "classes").

    Raises:
        UserError: As `match_class_folders`.
    """
    names = classifier.folder_classes
    if by_position or names is None:
        if len(folders) != len(classifier.class_names):
            raise UserError(
                f"{where} has {len(folders)} {noun} and the model {len(classifier.class_names)} outputs: "
                "matching by position needs one per output"
            )
        return {folder: i for i, folder in enumerate(folders)}
    index = {name: i for i, name in enumerate(names)}
    class_map = class_map or {}
    unknown_targets = sorted(set(class_map.values()) - set(index))
    if unknown_targets:
        raise UserError(f"--class-map maps to classes the model does not have: {', '.join(unknown_targets[:10])}")
    unknown = [f for f in folders if class_map.get(f, f) not in index]
    if unknown:
        known = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise UserError(
            f"{where} has {noun} the model does not know: {', '.join(unknown[:10])} (its classes: {known}); "
            "rename them, map them with --class-map FOLDER=CLASS, or pass --by-position to take sorted folders as "
            "the outputs in order"
        )
    return {f: index[class_map.get(f, f)] for f in folders}


def evaluate_folder(
    classifier: Classifier,
    root: str | os.PathLike,
    env: DistEnv,
    batch_size: int = 128,
    workers: int = 4,
    amp_dtype: torch.dtype | None = None,
    class_map: dict[str, str] | None = None,
    by_position: bool = False,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Top-1/top-5, loss and throughput of `classifier` on an ImageFolder tree (`root/<class>/<images>`), or on
    the shards or dataset a `wds:`/`hfds:` name gives (its validation split, or the shards a pattern names).

    A dataset root (holding `train/` and `val/`) is evaluated on its `val/`. Folders (or classes) are matched to
    outputs by name (`match_class_folders`). `model` runs instead of `classifier.model` when given (its
    `mambaout.fast.inference_module` twin).

    Returns:
        The metrics of `evaluate` plus `data` (what was evaluated), `unreadable` (files or samples skipped),
        `skipped_links` and `seconds`.
    """
    check_activation_memory(classifier.model, batch_size, classifier.data["input_size"][-1], env.device)
    source = parse_source_name(root)
    if source is not None:
        dataset: Dataset = source_eval_set(source, env.rank, env.world_size)
        dataset.relabel(match_class_names(classifier, dataset.classes, source.data, class_map, by_position, "classes"))
        dataset.transform, links = eval_transform(classifier.data), []
    else:
        root = resolve_eval_folder(root)
        # a missing or empty tree is left to RobustImageFolder, which says what it expected
        labels = match_class_folders(classifier, root, class_map, by_position) if class_folders(root) else None
        dataset = RobustImageFolder(root, eval_transform(classifier.data), substitute=False, labels=labels)
        links = dataset.skipped_links
    streamed = isinstance(dataset, IterableDataset)  # shards split over the ranks by themselves
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=None if streamed else ShardSampler(dataset, env.world_size, env.rank),
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
    )
    start = time.perf_counter()
    metrics = evaluate(model or classifier.model, loader, env, amp_dtype)
    unreadable = dataset.new_unreadable()
    return {
        **metrics,
        "data": str(root),
        "unreadable": [f"{p} ({r})" for p, r in unreadable],
        "skipped_links": [f"{p} ({r})" for p, r in links],
        "seconds": time.perf_counter() - start,
    }


def find_images(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files among `paths` (files, or folders searched recursively; a data name, `pathfinder:32-14`, for
    its validation images) and the links skipped on the way.

    Raises:
        UserError: A path does not exist, or no image file was found.
    """
    paths = named_inputs(paths, "classification")
    try:
        files, skipped = list_images(paths)
    except FileNotFoundError as e:
        raise UserError(f"no such file or folder: {e.args[0]}") from None
    if not files:
        raise UserError(f"no image files in {', '.join(map(str, paths))}")
    return files, skipped


def predict_files(
    classifier: Classifier,
    files: list[Path],
    top: int = 5,
    batch_size: int = 32,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    model: nn.Module | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Top-`top` classes of every image file in `files` (`find_images` lists them from files and folders).

    `model` runs instead of `classifier.model` when given (its `mambaout.fast.inference_module` twin).

    Returns:
        One `{"path", "predictions": [{"rank", "label", "index", "probability"}]}` per readable image, in input
        order, and the (path, reason) of each unreadable one.

    Raises:
        UserError: No file is readable.
    """
    device = next(classifier.model.parameters()).device
    check_activation_memory(classifier.model, min(batch_size, len(files)), classifier.data["input_size"][-1], device)
    dataset = ImageFiles([(str(f), i) for i, f in enumerate(files)], eval_transform(classifier.data), substitute=False)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    found = predict(model or classifier.model, loader, device, top, amp_dtype)
    results = [
        {
            "path": str(files[i]),
            "predictions": [
                {"rank": r + 1, "label": classifier.class_names[c], "index": c, "probability": p}
                for r, (p, c) in enumerate(zip(*found[i], strict=True))
            ],
        }
        for i in sorted(found)
    ]
    return results, dataset.new_unreadable()
