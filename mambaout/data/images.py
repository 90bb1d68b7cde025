"""Reading any image a user may have as 8-bit RGB, and telling why a file cannot be read.

Grayscale, palette, CMYK, alpha and 16-bit images are converted; truncated, empty, non-image and oversized files
(decompression bombs, past PIL's `Image.MAX_IMAGE_PIXELS`) raise `UnreadableImage` with a short reason.
"""

import os
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = ["IMG_EXTENSIONS", "UnreadableImage", "has_image_extension", "list_images", "load_image", "to_rgb"]

# What PIL's decoders raise on bad bytes: they do not share a base class.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError, MemoryError)


class UnreadableImage(Exception):
    """A file that is not a readable image; `reason` is a few words for the report."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def has_image_extension(path: str | os.PathLike) -> bool:
    """Whether `path` ends in one of torchvision's image extensions (case-insensitive)."""
    return str(path).lower().endswith(IMG_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit (and 32-bit integer/float) grayscale is rescaled rather than clipped to 255; transparent pixels are
    composited over white, as a viewer shows them.
    """
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values / 65535.0 * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode `path` fully into an 8-bit RGB image.

    Raises:
        UnreadableImage: empty, not an image, truncated or corrupt, or larger than `Image.MAX_IMAGE_PIXELS`.
    """
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; a training loop should not decode such files
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(path, f"too large (over {Image.MAX_IMAGE_PIXELS} pixels)") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(path, "not an image") from None
    except _DECODE_ERRORS as e:
        raise UnreadableImage(path, f"corrupt or truncated ({e})") from None


def list_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (recursively, sorted, image extensions only) into a list of image files.

    A file named explicitly is kept whatever its extension; a missing path raises `FileNotFoundError`.
    """
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(sorted(p for p in entry.rglob("*") if p.is_file() and has_image_extension(p)))
        elif entry.is_file():
            found.append(entry)
        else:
            raise FileNotFoundError(entry)
    return found
