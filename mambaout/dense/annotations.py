"""COCO instance annotation files, checked entry by entry before pycocotools sees them.

pycocotools trusts its input: a NaN polygon coordinate crashes its C code (the process dies), a huge one makes it
allocate without end, an RLE whose runs fall short of its size decodes to whatever its memory held, and COCOeval
takes a ground-truth box of NaN for an object, which moves the AP. `read_coco` therefore checks every field that
training or evaluation reads, with one small checker per kind of field, and builds pycocotools' index (the ground
truth of `COCOeval` too) from the entries that pass:

- an image needs an integer `id` used once, a positive integer `width` and `height`, and a `file_name` that is a
  relative path without `..` (a name that leaves the image folder is never read; a symbolic link placed inside the
  folder is followed, as the folder datasets follow links into a central image store);
- an annotation needs integer `id` (used once), `image_id` and `category_id`, a `bbox` of four finite numbers with
  width and height ≥ 0, a finite `area` ≥ 0, an `iscrowd` of 0 or 1, and, where masks are read or a `segmentation` is
  given, polygons (each an even number ≥ 6 of finite numbers, within the image grown by its own size on every side)
  or an RLE of the image's `[height, width]` whose runs (a list of non-negative integers, or COCO's compressed text)
  add up to its pixels.

An entry that fails is skipped and handed to `skip(reason, example)` (the dataset's problem report), the example
naming the image or annotation id and the field; the annotations of a skipped image go with it. A file that is no
COCO annotation file (not a JSON object, no `images` list, categories without unique integer ids) is a `UserError`.
"""

import contextlib
import io
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from pycocotools.coco import COCO

from mambaout.errors import UserError, describe, one_line

__all__ = ["read_coco"]

Skip = Callable[[str, str], None]  # (reason, example) of an entry left out

_INT64 = 2**63  # ids and sizes go through numpy's int64 in pycocotools
_RLE_DIGITS = range(48, 48 + 64)  # COCO's compressed RLE: 6 bits per character, from "0"


def read_coco(path: Path, masks: bool, skip: Skip) -> COCO:
    """pycocotools' index of the usable entries of the instances JSON `path` (quietly: it prints as it loads).

    Args:
        path: The annotation file.
        masks: Whether instance masks are read (then every annotation needs a `segmentation`).
        skip: Told of each entry left out.

    Raises:
        UserError: The file is not JSON or not a COCO annotation file.
    """
    try:
        dataset = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not a readable JSON file ({describe(e)})") from None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise UserError(f"{path} is not a COCO annotation file (no 'images' list)")
    for key in ("annotations", "categories"):
        if not isinstance(dataset.get(key, []), list):
            raise UserError(f"{path} is not a COCO annotation file ('{key}' is not a list)")
    categories = _categories(dataset.get("categories", []), path)
    images, dropped = _images(dataset["images"], skip)
    annotations = _annotations(dataset.get("annotations", []), images, dropped, masks, skip)
    coco = COCO()
    coco.dataset = {"images": list(images.values()), "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _categories(entries: list[Any], path: Path) -> list[dict[str, Any]]:
    """The categories, each with an integer id used once; anything else leaves the classes unknown: refused."""
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _is_integer(entry.get("id")):
            raise UserError(f"{path}: entry {i} of 'categories' has no integer 'id' ({_shown(entry)})")
    repeated = [c for c, n in Counter(e["id"] for e in entries).items() if n > 1]
    if repeated:
        raise UserError(f"{path}: category id {repeated[0]} is given twice in 'categories': each needs its own id")
    return entries


def _images(entries: list[Any], skip: Skip) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """The usable image entries by id, and the ids of the image entries skipped (their annotations go with them).

    An id given twice makes its annotations ambiguous: every entry of that id is skipped.
    """
    ids = Counter(e["id"] for e in entries if isinstance(e, dict) and _is_integer(e.get("id")))
    usable, dropped = {}, set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _is_integer(entry.get("id")):
            skip("images without an integer id", f"entry {i} of 'images': {_shown(entry)}")
            continue
        where, name = f"image {entry['id']}", entry.get("file_name")
        width, height = entry.get("width"), entry.get("height")
        if not (_is_integer(width) and _is_integer(height) and width > 0 and height > 0):
            size = f"width {_shown(width)}, height {_shown(height)}"
            skip("images without a positive integer width and height", f"{where}: {size}")
        elif not _is_relative_path(name):
            skip("images whose file_name is no path inside the image folder", f"{where}: file_name {_shown(name)}")
        elif ids[entry["id"]] > 1:
            skip("images whose id is given twice", f"{where}: file_name {_shown(name)}")
        else:
            usable[entry["id"]] = entry
            continue
        dropped.add(entry["id"])
    return usable, dropped


def _annotations(
    entries: list[Any], images: dict[int, dict[str, Any]], dropped: set[int], masks: bool, skip: Skip
) -> list[dict[str, Any]]:
    """The usable annotations of the usable images, in the file's order."""
    kept, ids = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _is_integer(entry.get("id")):
            skip("annotations without an integer id", f"entry {i} of 'annotations': {_shown(entry)}")
            continue
        where = f"annotation {entry['id']}"
        image_id = entry.get("image_id")
        if _is_integer(image_id) and image_id in dropped:
            continue  # its image is skipped and counted
        if _is_integer(image_id) and image_id not in images:
            skip("annotations of unknown image ids", f"{where}: image_id {image_id}")
            continue
        problem = _field_problem(entry) or _segmentation_problem(entry, images.get(image_id), masks)
        if problem is not None:
            skip(problem[0], f"{where}: {problem[1]}")
        elif entry["id"] in ids:
            skip("annotations whose id is given twice", where)
        else:
            ids.add(entry["id"])
            kept.append(entry)
    return kept


def _is_integer(value: Any) -> bool:
    return type(value) is int and -_INT64 <= value < _INT64  # bool is no id


def _is_number(value: Any) -> bool:
    """A finite int or float (JSON's NaN and Infinity are floats; a huge integer is too large for a float)."""
    return _are_numbers([value])


def _are_numbers(values: list[Any]) -> bool:
    """Whether every value is a finite int or float, at C speed (COCO holds millions of polygon coordinates).

    A NaN or infinity makes the sum non-finite; so does an overflowing sum, of numbers no image has.
    """
    try:
        return set(map(type, values)) <= {int, float} and math.isfinite(sum(values))
    except OverflowError:  # an integer too large for a float
        return False


def _is_box(value: Any) -> bool:
    """COCO's `[x, y, w, h]`: four finite numbers, width and height ≥ 0 (zero-area boxes are the dataset's call)."""
    return type(value) is list and len(value) == 4 and _are_numbers(value) and value[2] >= 0 and value[3] >= 0


def _is_area(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _is_crowd_flag(value: Any) -> bool:
    return type(value) in (int, bool) and value in (0, 1)


# (field, check, what the field must be): the fields every annotation needs, checked in this order
_FIELDS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("image_id", _is_integer, "an integer"),
    ("category_id", _is_integer, "an integer"),
    ("bbox", _is_box, "[x, y, w, h] of finite numbers, w and h ≥ 0"),
    ("area", _is_area, "a finite number ≥ 0"),
    ("iscrowd", _is_crowd_flag, "0 or 1"),
)


def _field_problem(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, detail) of the first field of `_FIELDS` that is missing or wrong, or None."""
    for field, check, wanted in _FIELDS:
        if field not in entry:
            return f"annotations without {field}", f"no '{field}'"
        if not check(entry[field]):
            return f"annotations whose {field} is not {wanted}", f"{field} {_shown(entry[field])}"
    return None


def _segmentation_problem(entry: dict[str, Any], image: dict[str, Any], masks: bool) -> tuple[str, str] | None:
    """(reason, detail) of a `segmentation` that is missing where masks are read, or unusable on `image`, or None."""
    if "segmentation" not in entry:
        return ("segmentations that are no polygon or RLE", "no 'segmentation'") if masks else None
    segmentation, width, height = entry["segmentation"], image["width"], image["height"]
    if type(segmentation) is dict:
        return _rle_problem(segmentation, width, height)
    if type(segmentation) is list and segmentation:
        return next(filter(None, (_polygon_problem(p, width, height) for p in segmentation)), None)
    return "segmentations that are no polygon or RLE", f"segmentation {_shown(segmentation)}"


def _polygon_problem(polygon: Any, width: int, height: int) -> tuple[str, str] | None:
    if not (type(polygon) is list and len(polygon) >= 6 and len(polygon) % 2 == 0 and _are_numbers(polygon)):
        return "segmentations that are no polygon or RLE", f"polygon {_shown(polygon)}"
    xs, ys = polygon[0::2], polygon[1::2]
    # pycocotools rasterises every point between the corners: a far-away corner costs memory without end
    if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
        return "polygons reaching far outside their image", f"polygon {_shown(polygon)} on {width}×{height} pixels"
    return None


def _rle_problem(rle: dict[str, Any], width: int, height: int) -> tuple[str, str] | None:
    size, counts = rle.get("size"), rle.get("counts")
    if not (type(size) is list and len(size) == 2 and all(map(_is_integer, size))):
        return "segmentations that are no polygon or RLE", f"RLE size {_shown(size)}"
    if size != [height, width]:
        return "RLE masks of another size than their image", f"RLE size {size}, image [height, width] {[height, width]}"
    runs = _rle_text_runs(counts) if type(counts) is str else counts
    if not (type(runs) is list and all(map(_is_integer, runs)) and min(runs, default=0) >= 0):
        return "segmentations that are no polygon or RLE", f"RLE counts {_shown(counts)}"
    if sum(runs) != height * width:
        return "segmentations that are no polygon or RLE", f"RLE runs covering {sum(runs)} of {height * width} pixels"
    return None


def _rle_text_runs(text: str) -> list[int] | None:
    """The runs of COCO's compressed RLE text (pycocotools' `rleFrString`), or None where it is no such text."""
    runs: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            if p == len(text) or ord(text[p]) not in _RLE_DIGITS:
                return None
            c = ord(text[p]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p, shift = p + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift  # the sign bit of the last character
        runs.append(value + runs[-2] if len(runs) > 2 else value)  # runs after the third are stored as differences
    return runs


def _is_relative_path(value: Any) -> bool:
    """A non-empty relative path that does not climb out with `..` (nor hold a NUL, which no file name can)."""
    if type(value) is not str or "\x00" in value:
        return False
    path = PurePosixPath(value)
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts


def _shown(value: Any) -> str:
    """`value` as JSON on one short line (a hostile value may be huge)."""
    return one_line(json.dumps(value), 80)
