"""Reading any image a user may have as 8-bit RGB, and telling why a file cannot be read.

Grayscale, palette, CMYK, alpha and 16-bit images are converted; truncated, empty, non-image and oversized files
(decompression bombs, past PIL's `Image.MAX_IMAGE_PIXELS`) and anything but a regular file (a FIFO, whose read would
wait for a writer forever; a device) raise `UnreadableImage` with a short reason.
"""

import os
import stat
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "IMG_EXTENSIONS",
    "ImageScan",
    "UnreadableImage",
    "decode_image",
    "has_image_extension",
    "list_images",
    "load_image",
    "scan_images",
    "to_rgb",
]

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
    """Decode `path` fully into an 8-bit RGB image, turned upright by its EXIF orientation (as timm and torchvision
    users expect of photos).

    Raises:
        UnreadableImage: unreadable (permissions), not a regular file (a FIFO or device), empty, not an image,
            truncated or corrupt, or larger than `Image.MAX_IMAGE_PIXELS`.
    """
    try:
        with open(path, "rb", opener=_open_without_waiting) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or other special file"
                raise UnreadableImage(path, f"{kind}, not a regular file")
            if info.st_size == 0:
                raise UnreadableImage(path, "empty file")
            return decode_image(f, path)
    except (PermissionError, IsADirectoryError, FileNotFoundError) as e:
        raise UnreadableImage(path, f"cannot open it: {e.strerror}") from None
    except _DECODE_ERRORS as e:  # opening or sizing it failed otherwise (a socket, a name too long)
        raise UnreadableImage(path, f"corrupt or truncated ({e})") from None


def decode_image(f: BinaryIO, name: str | os.PathLike) -> Image.Image:
    """Decode an open binary file (or `io.BytesIO` of an image held in memory: a tar shard's sample, a dataset's
    image column) as `load_image` decodes a file: fully, upright, 8-bit RGB.

    Raises:
        UnreadableImage: Named `name`: not an image, truncated or corrupt, or larger than `Image.MAX_IMAGE_PIXELS`.
    """
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; a training loop should not decode such files
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as image:
                image.load()
                upright = ImageOps.exif_transpose(image)
                return to_rgb(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(name, f"too large (over {Image.MAX_IMAGE_PIXELS} pixels)") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(name, "not an image") from None
    except _DECODE_ERRORS as e:
        raise UnreadableImage(name, f"corrupt or truncated ({e})") from None


def _open_without_waiting(path: str, flags: int) -> int:
    # opening a FIFO waits for a writer, maybe forever; O_NONBLOCK returns at once (reads of a regular file ignore it)
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))  # Windows has neither FIFOs nor the flag


@dataclass
class ImageScan:
    """What `scan_images` found under one folder.

    Attributes:
        files: Image files, each real file once, sorted as torchvision's ImageFolder sorts them (folder, then name).
        skipped_links: (link, reason) of the symbolic links not followed.
        ignored: Files without an image extension (hidden files aside).
    """

    files: list[str] = field(default_factory=list)
    skipped_links: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def scan_images(folder: str | os.PathLike, fence: str | os.PathLike | None = None) -> ImageScan:
    """Every image file under `folder`, recursively, following symbolic links only where that is safe.

    A link is skipped (and reported) when it is broken, points back to `folder` or one of its ancestors (a loop), or
    points into `fence` outside `folder` (for a class folder, `fence` is its split: a link into a sibling class would
    give that class's images this one's label). Other links, such as a tree of links into a central image store, are
    followed; a real file reached twice is listed once. Hidden entries are left out.
    """
    top = os.path.realpath(folder)
    fenced = os.path.realpath(fence) if fence is not None else None
    scan, seen_files, seen_dirs = ImageScan(), set(), set()
    found: list[tuple[str, str]] = []
    pending = [os.fspath(folder)]
    while pending:
        directory = pending.pop()
        real_directory = os.path.realpath(directory)
        if real_directory in seen_dirs:
            continue
        seen_dirs.add(real_directory)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            scan.skipped_links.append((directory, f"cannot list it: {e.strerror}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                problem = _link_problem(os.path.realpath(entry.path), top, fenced)
                if problem:
                    scan.skipped_links.append((entry.path, problem))
                    continue
            if entry.is_dir():
                pending.append(entry.path)
            elif not has_image_extension(entry.name):
                scan.ignored.append(entry.path)
            elif (real := os.path.realpath(entry.path)) not in seen_files:
                seen_files.add(real)
                found.append((directory, entry.name))
            else:
                scan.skipped_links.append((entry.path, "a second path to a file already listed"))
    scan.files = [os.path.join(d, name) for d, name in sorted(found)]
    return scan


def _link_problem(target: str, top: str, fence: str | None) -> str | None:
    """Why a link to `target` found under folder `top` must not be followed, or None."""
    if not os.path.exists(target):
        return "broken link"
    if top == target or top.startswith(target.rstrip(os.sep) + os.sep):
        return "points to the folder itself or one above it (a loop)"
    inside_top = target.startswith(top + os.sep)
    if fence is not None and not inside_top and (target == fence or target.startswith(fence + os.sep)):
        return "points outside its class folder, into another part of the dataset"
    return None


def list_images(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and directories (recursively, sorted, image extensions only) into a list of image files.

    A file named explicitly is kept whatever its extension or kind (`load_image` says why a FIFO or `/dev/null` cannot
    be read); a missing path raises `FileNotFoundError`. Folders are read by `scan_images`.

    Returns:
        The image files, and the (link, reason) of every symbolic link not followed.
    """
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            scan = scan_images(entry)
            found.extend(map(Path, scan.files))
            skipped.extend(scan.skipped_links)
        elif entry.exists():
            found.append(entry)
        else:
            raise FileNotFoundError(entry)
    return found, skipped
