"""`mambaout data shards`: an ImageFolder tree written as WebDataset shards with their `_info.json`, in the layout
`mambaout.data.shards` reads (`--data wds:...`)."""

import io
import json
import math
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mambaout.data.folder import RobustImageFolder
from mambaout.data.images import UnreadableImage, load_image
from mambaout.data.shards import IMAGE_KEYS, INFO, LABEL_KEY
from mambaout.errors import UserError
from mambaout.outputs import check_output
from mambaout.weights.io import atomic_write

__all__ = ["ShardsWritten", "write_shards"]


@dataclass
class ShardsWritten:
    """What `write_shards` wrote: samples and shards per split, the info file, and the files left out."""

    samples: dict[str, int]
    shards: dict[str, list[Path]]
    info: Path
    unreadable: list[tuple[str, str]]


def write_shards(src: Path, dst: Path, shard_size: int, seed: int = 0, force: bool = False) -> ShardsWritten:
    """Write the ImageFolder tree `src` (`train/<class>/...` and `val/<class>/...`) as shards in `dst`.

    Each split's images are shuffled with `seed` (a shard then mixes the classes: a reader's buffer holds only a
    shard or two) and written `shard_size` to a shard as `<split>-NNNNNN.tar`, keys `<split>_NNNNNNNN`; then
    `_info.json` (the module's layout). JPEG, PNG and WebP files are stored as they are, other formats as PNG; every
    image is decoded first, and unreadable ones are left out. Each file is written atomically; every output is
    checked before anything is written (`mambaout.outputs.check_output`: never inside `src`, never over a file that
    is not a shard or an `_info.json` unless `force`).

    Raises:
        UserError: `src` is not a tree with train/ and val/, or an output is refused.
    """
    for split in ("train", "val"):
        if not (src / split).is_dir():
            raise UserError(f"SRC {src}: no {split}/ folder (expected {src}/train/<class>/<images> and val/)")
    train = RobustImageFolder(src / "train", substitute=False)
    splits = {"train": train, "val": RobustImageFolder(src / "val", classes=train.classes, substitute=False)}
    planned = {split: math.ceil(len(folder) / shard_size) for split, folder in splits.items()}
    outputs = [dst / f"{split}-{i:06d}.tar" for split, count in planned.items() for i in range(count)]
    for path in outputs:
        check_output(path, "DST", "shard", inputs=[src], force=force)
    info_path = check_output(dst / INFO, "DST", "shard-info", inputs=[src], force=force)
    dst.mkdir(parents=True, exist_ok=True)
    written = ShardsWritten({}, {}, info_path, [])
    info_splits = {}
    for split, folder in splits.items():
        order = random.Random(seed).sample(folder.samples, len(folder.samples))
        usable = []
        for path, label in order:
            try:
                usable.append((_stored(path), label))
            except UnreadableImage as e:
                written.unreadable.append((path, e.reason))
        chunks = [usable[i : i + shard_size] for i in range(0, len(usable), shard_size)]
        written.shards[split] = [dst / f"{split}-{i:06d}.tar" for i in range(len(chunks))]
        for i, (path, chunk) in enumerate(zip(written.shards[split], chunks, strict=True)):
            with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for j, ((suffix, data), label) in enumerate(chunk):
                    key = f"{split}_{i * shard_size + j:08d}"
                    _add(tar, f"{key}.{suffix}", data)
                    _add(tar, f"{key}.{LABEL_KEY}", str(label).encode())
        written.samples[split] = len(usable)
        info_splits[split] = {
            "num_samples": len(usable),
            "filenames": [p.name for p in written.shards[split]],
            "shard_lengths": [len(chunk) for chunk in chunks],
        }
    info = {"classes": train.classes, "splits": info_splits, "seed": seed}
    with atomic_write(info_path) as f:
        f.write((json.dumps(info, indent=1) + "\n").encode())
    return written


def _stored(path: str) -> tuple[str, bytes]:
    """(suffix, bytes) an image is stored as: its own bytes for JPEG/PNG/WebP, else PNG. Decoded first to check it."""
    image = load_image(path)
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in IMAGE_KEYS:
        return ("jpg" if suffix == "jpeg" else suffix), Path(path).read_bytes()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    entry = tarfile.TarInfo(name)
    entry.size, entry.mode = len(data), 0o644  # mtime 0, no owner: the same tree writes the same bytes
    tar.addfile(entry, io.BytesIO(data))
