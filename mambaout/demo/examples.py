"""The images the demo page offers as examples: held-out images of the run that trained the model (for the embedded
default, digit scans of the digits tree's val split), and scikit-image's sample photos for ImageNet classifiers.

Nothing is downloaded: the photos ship inside scikit-image and are written once as PNGs to the cache folder.
"""

from pathlib import Path

from PIL import Image

from mambaout.data import cache_dir, imagenet_synsets, list_images
from mambaout.data.folder import class_folders
from mambaout.train.inference import Classifier
from mambaout.weights.io import atomic_path

__all__ = ["SKIMAGE_PHOTOS", "bundled_examples", "held_out_images", "skimage_photos"]

# scikit-image's bundled color photos of things ImageNet has classes for (a tabby cat, an espresso, ...)
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
# at most this many held-out images (one per class, in class order), so that a 1000-class tree stays a short list
MAX_HELD_OUT = 12


def skimage_photos(folder: Path | None = None) -> list[Path]:
    """scikit-image's sample photos as PNG files, written on first use.

    Args:
        folder: Where to write them; default `<cache>/demo-photos`.

    Returns:
        One path per name in `SKIMAGE_PHOTOS`.
    """
    import skimage.data

    folder = folder or cache_dir() / "demo-photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SKIMAGE_PHOTOS:
        path = folder / f"{name}.png"
        if not path.is_file():
            with atomic_path(path) as tmp:
                Image.fromarray(getattr(skimage.data, name)()).save(tmp, format="PNG")
        paths.append(path)
    return paths


def held_out_images(val_root: Path, limit: int = MAX_HELD_OUT) -> list[Path]:
    """The first image (by name) of each class folder under `val_root`, for the first `limit` classes."""
    found = []
    for name in class_folders(val_root)[:limit]:
        images, _ = list_images([val_root / name])
        if images:
            found.append(images[0])
    return found


def bundled_examples(classifier: Classifier) -> list[Path]:
    """The examples for `classifier`: its run's held-out images when that split is on disk, and scikit-image's
    photos when it predicts ImageNet-1k's classes (published weights, or a run on an ImageNet tree)."""
    examples = held_out_images(classifier.val_data) if classifier.val_data is not None else []
    if classifier.folder_classes == list(imagenet_synsets()):
        examples += skimage_photos()
    return examples
