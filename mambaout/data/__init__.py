"""Data: an ImageFolder that survives bad files, the bundled digits default, the Pathfinder generator and
the data names that write its trees, WebDataset shards and Hugging Face datasets (`wds:`, `hfds:`), transforms,
samplers, class names."""

from mambaout.data.digits import cache_dir, digits_tree
from mambaout.data.folder import DataFailed, ImageFiles, RobustImageFolder, TransformFailed
from mambaout.data.images import ImageScan, UnreadableImage, list_images, load_image, scan_images, to_rgb
from mambaout.data.labels import IMAGENET_CLASSES, imagenet_class_names, imagenet_synsets
from mambaout.data.named import (
    DataName,
    SourceName,
    data_label,
    named_inputs,
    parse_data_name,
    parse_source_name,
    resolve_data,
    source_eval_set,
    source_splits,
)
from mambaout.data.pathfinder import PathfinderConfig, PathfinderSample, make_sample, make_samples
from mambaout.data.samplers import ResumableSampler, ShardSampler
from mambaout.data.transforms import data_config, eval_transform, train_transform

__all__ = [
    "IMAGENET_CLASSES",
    "DataFailed",
    "DataName",
    "ImageFiles",
    "ImageScan",
    "PathfinderConfig",
    "PathfinderSample",
    "ResumableSampler",
    "RobustImageFolder",
    "ShardSampler",
    "SourceName",
    "TransformFailed",
    "UnreadableImage",
    "cache_dir",
    "data_config",
    "data_label",
    "digits_tree",
    "eval_transform",
    "imagenet_class_names",
    "imagenet_synsets",
    "list_images",
    "load_image",
    "make_sample",
    "make_samples",
    "named_inputs",
    "parse_data_name",
    "parse_source_name",
    "resolve_data",
    "scan_images",
    "source_eval_set",
    "source_splits",
    "to_rgb",
    "train_transform",
]
