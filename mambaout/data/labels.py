"""Class names: ImageNet-1k's, from timm's bundled `ImageNetInfo`, for weights trained on it."""

from functools import cache

from timm.data import ImageNetInfo

__all__ = ["IMAGENET_CLASSES", "imagenet_class_names", "imagenet_synsets"]

IMAGENET_CLASSES = 1000


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k descriptions in label order, e.g. 'tench, Tinca tinca'."""
    return tuple(ImageNetInfo().label_descriptions())


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 WordNet ids in label order (`n01440764`, ...): the class folder names of an ImageNet tree."""
    return tuple(ImageNetInfo().label_names())
