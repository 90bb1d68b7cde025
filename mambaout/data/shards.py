"""WebDataset shards (`--data wds:...`): classification data past one folder, streamed from local files or http(s).

The layout is timm's (and what `mambaout data shards` writes): `.tar` shards whose samples are `<key>.jpg|png|webp`
with `<key>.cls` (the label as decimal text), and beside them `_info.json`, which declares what a stream cannot tell
before it is read, the classes and every shard's sample count:

    {"classes": ["cat", "dog"],
     "splits": {"train": {"num_samples": 5000, "filenames": ["train-000000.tar", ...], "shard_lengths": [1000, ...]},
                "val": {"num_samples": 500, "filenames": ["val-000000.tar"], "shard_lengths": [500]}}}

(`"num_classes": K` instead of `classes` names the classes `0`..`K-1`; `num_samples` is optional.) `wds:LOCATION`
is either the folder or http(s) URL that holds `_info.json` (training reads its `train` split and validates on `val`,
evaluation reads `val`), or a brace pattern of shards listed in the `_info.json` beside them, such as
`wds:/data/in1k/train-{000000..001023}.tar` or `wds:https://host/in1k/train-{000000..001023}.tar` (training reads
those and validates on `val`; evaluation reads those). Shards are read with webdataset's tar iterators from a plain
file or a `urllib` stream: nothing but Python is needed for http(s).

Training (`training=True`): epoch e deals the shards, in an order drawn from the seed and e (the same on every rank),
round-robin to the world_size × workers readers, rank by rank; each reader reads its shards in turn, shuffles their
samples in a buffer of `SHUFFLE_BUFFER`, decodes and transforms them. An epoch is the declared size split over the
processes (`samples_per_process`). When the shard count is a multiple of the readers and the shards are equal, every
sample is read exactly once per epoch across ranks; otherwise a reader that runs short reads its shards again (some
samples repeat) and one with more than its share leaves its last ones unread that epoch. Fewer shards than readers is
refused. The order depends on the seed, the epoch, the number of processes and of workers only: a run resumed at an
epoch boundary reads what the uninterrupted run would have read, and one resumed mid-epoch (`set_epoch`'s
`skip_batches`) reads that epoch's order again, passing over the samples its batches had already taken without
transforming them, then goes on with the very samples the uninterrupted run would have read next.

Bad samples (an image that does not decode, no image or no `cls`, a label that is no class) are skipped and counted
as the folder datasets do them (`status`, `new_unreadable()`). An http(s) shard whose read fails is read again, up to
`RETRIES` times with growing waits, going on after the samples it gave. A shard that still cannot be read is left out
of that pass with a warning naming it in training (the next pass tries it again; a reader none of whose shards read
is a `DataFailed`), and is a `DataFailed` naming it in evaluation. Evaluation (`training=False`) reads each shard
once, in order, split over ranks and workers.
"""

import bisect
import http.client
import importlib
import io
import itertools
import json
import random
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mambaout.data.folder import DataFailed, transformed
from mambaout.data.images import UnreadableImage, decode_image
from mambaout.errors import UserError, one_line
from mambaout.weights.download import is_url

__all__ = [
    "INFO",
    "RETRIES",
    "RETRY_WAIT_S",
    "SHUFFLE_BUFFER",
    "ShardDataset",
    "eval_shards",
    "shard_splits",
]

INFO = "_info.json"  # beside the shards: classes and each split's shard names and lengths
SHUFFLE_BUFFER = 1000  # samples each reader shuffles among (raw bytes: about 100 MB of ImageNet JPEGs)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEY = "cls"
VAL_SPLITS = ("val", "validation")
_TIMEOUT_S = 60  # an http(s) read that stalls this long fails
RETRIES = 3  # reads again of an http(s) shard whose read failed (a dropped connection, a 5xx), in a row
RETRY_WAIT_S = 2.0  # before the first read again; doubled for each next one
_OK, _NO_IMAGE, _BAD_IMAGE, _NO_LABEL, _BAD_LABEL = range(5)
_REASONS = {
    _NO_IMAGE: "no jpg, png or webp image",
    _BAD_IMAGE: "the image does not decode",
    _NO_LABEL: "no cls label",
    _BAD_LABEL: "the cls label is not a class",
}
_READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, http.client.HTTPException)  # URLError is an OSError


def _require(module: str) -> ModuleType:
    """An optional package of the `data` extra (webdataset, and braceexpand that comes with it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"wds: data needs the {module} package: pip install 'mambaout[data]'") from None


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_url(base) else str(Path(base).expanduser() / name)


def _split_path(shard: str) -> tuple[str, str]:
    """(folder or URL, file name) of a shard."""
    if is_url(shard):
        base, _, name = shard.rpartition("/")
        return base, name
    path = Path(shard).expanduser()
    return str(path.parent), path.name


def _open(location: str) -> BinaryIO:
    """A local file or an http(s) response, to read from the start."""
    if is_url(location):
        return urllib.request.urlopen(location, timeout=_TIMEOUT_S)
    return open(Path(location).expanduser(), "rb")


def _error_text(error: BaseException) -> str:
    # webdataset appends its stream and URL to an exception's args: the first one is the message
    first = error.args[0] if error.args else error
    return one_line(f"{type(error).__name__}: {first}", 200)


class ShardDataset(IterableDataset):
    """Shards read as a stream of (transformed image, label) pairs, split over ranks and loader workers.

    Args:
        shards: Local paths or http(s) URLs of the shards.
        lengths: Samples each shard declares (`_info.json`); reading stops there.
        classes: Class names in label order.
        name: The data as given, for messages.
        training: Shuffled, endless reading for training (see the module); else one ordered pass for evaluation.
        seed: Draws the shard order of each epoch and the readers' buffers.
        rank, world_size: This process's place in a distributed run.
        shuffle_buffer: Samples each reader shuffles among.

    Attributes:
        transform: Applied to each RGB PIL image (set before iterating).
        status: One byte per declared sample in shared memory, non-zero once found bad.

    Raises:
        UserError: A local shard is missing, or the first shard holds no usable sample.
    """

    def __init__(
        self,
        shards: Sequence[str],
        lengths: Sequence[int],
        classes: Sequence[str],
        name: str,
        training: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = SHUFFLE_BUFFER,
    ):
        self.urls, self.lengths, self.classes = list(shards), list(lengths), list(classes)
        self.root, self.training, self.seed = name, training, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.transform = None
        self.epoch = 0
        self.skip = (0, 0)  # (batches this process's loader took already, samples a batch) of the current epoch
        self.starts = [0, *itertools.accumulate(self.lengths)][:-1]
        self.status = torch.zeros(sum(self.lengths), dtype=torch.uint8).share_memory_()
        self._reported = torch.zeros(sum(self.lengths), dtype=torch.bool)
        self._outputs = list(range(len(self.classes)))
        missing = [u for u in self.urls if not is_url(u) and not Path(u).expanduser().is_file()]
        if missing:
            raise UserError(f"--data {name}: {len(missing)} shards are missing, e.g. {missing[0]}")
        self._require_one_readable()

    def __len__(self) -> int:
        return len(self.status)

    @property
    def samples_per_process(self) -> int:
        """Samples each process trains on per epoch: the declared size split over the processes."""
        return len(self) // self.world_size

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 0) -> None:
        """Read epoch `epoch`'s shard order next (call before each epoch's loader iterator), past the first
        `skip_batches` batches of `batch_size` samples that this process's loader had taken (a run resumed mid-epoch).

        A loader with several workers takes its batches from them in turn, so each worker passes over its share.
        """
        self.epoch, self.skip = epoch, (skip_batches, batch_size)

    def relabel(self, labels: Mapping[str, int]) -> None:
        """Yield `labels[class name]` instead of the shards' label (a model's outputs matched to classes by name)."""
        self._outputs = [labels[name] for name in self.classes]

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        worker = get_worker_info()
        workers, index = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        if not self.training:
            readers, reader = self.world_size * workers, self.rank * workers + index
            yield from self._decoded(self._read(range(reader, len(self.urls), readers)))
            return
        # a loader takes batch i from worker i % workers: resumed past `batches`, worker `index` goes on with the
        # stream that would have given the next batch it is asked for, past that stream's batches already taken
        batches, batch_size = self.skip
        slot = (index + batches) % workers
        taken = (batches // workers + (slot < batches % workers)) * batch_size
        readers, reader = self.world_size * workers, self.rank * workers + slot
        epoch_seed = self.seed * 1_000_003 + self.epoch
        order = random.Random(epoch_seed).sample(range(len(self.urls)), len(self.urls))
        rng = random.Random(epoch_seed * 1_009 + reader)
        yield from self._decoded(self._passes(order[reader::readers], rng), endless=True, skip=taken)

    def new_unreadable(self) -> list[tuple[str, str]]:
        """(sample, reason) of the samples found bad since the last call; call it in the main process.

        A distributed run merges `status` over its ranks first, so rank 0 can report every sample once.
        """
        new = ((self.status != _OK) & ~self._reported).nonzero().flatten().tolist()
        self._reported[new] = True
        return [(self._where(i), _REASONS[int(self.status[i])]) for i in new]

    def _where(self, index: int) -> str:
        shard = bisect.bisect_right(self.starts, index) - 1
        return f"{_split_path(self.urls[shard])[1]} sample {index - self.starts[shard]}"

    def _passes(self, shards: list[int], rng: random.Random) -> Iterator[tuple[int, int, dict]]:
        """The reader's shards over and over, each pass shuffled in the buffer on its own (so that one pass, the
        epoch's share when the shards divide evenly, holds every sample once)."""
        while True:
            read = 0
            for sample in _shuffled(self._read(shards), rng, self.shuffle_buffer):
                read += 1
                yield sample
            if not read:
                names = ", ".join(_split_path(self.urls[i])[1] for i in shards[:3])
                raise DataFailed(f"shards {names} of {self.root} gave no sample: they hold none, or none could be read")

    def _read(self, shards: Sequence[int]) -> Iterator[tuple[int, int, dict]]:
        """The samples of `shards` in turn; in training, a shard that cannot be read (after `_samples`' retries) is
        left for this pass with a warning, as WebDataset pipelines with `log_and_continue` leave it; in evaluation it
        is a `DataFailed`, as a metric over part of the data would pass for the whole."""
        for shard in shards:
            try:
                yield from self._samples(shard)
            except DataFailed as e:
                if not self.training:
                    raise
                print(f"warning: {e}: the rest of it is left out of this pass", file=sys.stderr, flush=True)

    def _samples(self, shard: int) -> Iterator[tuple[int, int, dict]]:
        """(shard, position, raw sample) of one shard, up to its declared length; an http(s) shard whose read fails or
        ends early (a dropped connection reads as an early end) is read again up to `RETRIES` times in a row, going
        on after the samples it gave."""
        url, length = self.urls[shard], self.lengths[shard]
        given, failures = 0, 0
        while True:
            held = None  # the last sample read waits for the next: a stream that ends early may have cut it short
            try:
                for position, sample in _tar_samples(url):
                    if position == length:
                        break
                    if held is not None and held[0] >= given:
                        given, failures = held[0] + 1, 0
                        yield shard, *held
                    held = (position, sample)
                read = held[0] + 1 if held is not None else 0
                if read < length:
                    raise _EndedEarly(f"it ended after {read} of its {length} samples")
                if held[0] >= given:
                    yield shard, *held
                return
            except (*_READ_ERRORS, _EndedEarly) as e:
                failures += 1
                if is_url(url) and failures <= RETRIES:
                    time.sleep(RETRY_WAIT_S * 2 ** (failures - 1))
                    continue
                if held is not None and held[0] >= given:
                    yield shard, *held  # as the shard holds it
                tries = f" ({failures} tries)" if failures > 1 else ""
                why = str(e) if isinstance(e, _EndedEarly) else _error_text(e)
                raise DataFailed(f"shard {url} cannot be read{tries}: {why}") from None

    def _decoded(
        self, samples: Iterator[tuple[int, int, dict]], endless: bool = False, skip: int = 0
    ) -> Iterator[tuple[Any, int]]:
        """Usable samples transformed, but for the first `skip` ones, passed over untransformed (so that the random
        draws of the transforms go on from where the interrupted run left them)."""
        bad_in_a_row = 0
        for shard, position, sample in samples:
            item = self._sample(shard, position, sample)
            if item is not None:
                bad_in_a_row = 0
                if skip:
                    skip -= 1
                    continue
                yield transformed(self.transform, item[0], item[2]), item[1]
                continue
            bad_in_a_row += 1
            if endless and bad_in_a_row > len(self) + self.shuffle_buffer:  # every sample it reads went bad
                where = self._where(self.starts[shard] + position)
                raise DataFailed(f"no sample of {self.root} this reader gets is usable any more, e.g. {where}")

    def _sample(self, shard: int, position: int, sample: dict) -> tuple[Image.Image, int, str] | None:
        """(image, output label, name) of a raw sample, or None for a bad one (recorded in `status`)."""
        index = self.starts[shard] + position
        if self.status[index] != _OK:
            return None
        name = f"{self.urls[shard]} sample {sample.get('__key__')}"
        image_key = next((key for key in IMAGE_KEYS if key in sample), None)
        label = _label(sample.get(LABEL_KEY))
        if image_key is None:
            problem = _NO_IMAGE
        elif label is None or not 0 <= label < len(self.classes):
            problem = _NO_LABEL if LABEL_KEY not in sample else _BAD_LABEL
        else:
            problem = _OK
        if problem != _OK:
            self.status[index] = problem
            return None
        try:
            image = decode_image(io.BytesIO(sample[image_key]), name)
        except UnreadableImage:
            self.status[index] = _BAD_IMAGE
            return None
        return image, self._outputs[label], name

    def _require_one_readable(self) -> None:
        """Read the first shard until a sample is usable (one sample when the data is fine); none is a `UserError`."""
        first = next((i for i, n in enumerate(self.lengths) if n), None)
        if first is None:
            raise UserError(f"--data {self.root}: its shards declare no samples")
        for shard, position, sample in self._samples(first):
            if self._sample(shard, position, sample) is not None:
                return
        found = self.new_unreadable()
        example = f", e.g. {found[0][0]}: {found[0][1]}" if found else " (it holds none)"
        raise UserError(f"--data {self.root}: no usable sample in {self.urls[first]}{example}")


class _EndedEarly(Exception):
    """A shard's stream ended before its declared sample count."""


def _tar_samples(url: str) -> Iterator[tuple[int, dict]]:
    """(position, raw sample) of a shard from its start, with webdataset's tar iterators."""
    iterators = _require("webdataset").tariterators
    with _open(url) as stream:
        files = iterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from enumerate(iterators.group_by_keys(files))


def _label(raw: bytes | None) -> int | None:
    try:
        return int(raw.decode("ascii").strip()) if raw is not None else None
    except (UnicodeDecodeError, ValueError):
        return None


def _shuffled(items: Iterator[Any], rng: random.Random, size: int) -> Iterator[Any]:
    """`items` in an order shuffled within a buffer of `size` (webdataset's and timm's streaming shuffle)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


# --- `_info.json` and `wds:` names ----------------------------------------------------------------------------------


@dataclass
class _Info:
    """A checked `_info.json`: classes, and each split's shard file names and lengths."""

    where: str
    classes: list[str]
    splits: dict[str, tuple[list[str], list[int]]] = field(default_factory=dict)


def _read_info(base: str, data: str) -> _Info:
    where = _join(base, INFO)
    try:
        with _open(where) as f:
            raw = f.read()
    except _READ_ERRORS as e:
        raise UserError(
            f"--data {data}: cannot read {where} ({_error_text(e)}); shards need an {INFO} beside them that "
            "declares the classes and shard sizes (`mambaout data shards` writes one)"
        ) from None
    try:
        info = json.loads(raw)
    except ValueError:  # not UTF-8, or not JSON
        raise UserError(f"--data {data}: {where} is not JSON") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise UserError(f"--data {data}: {where} has no 'splits' mapping (see docs/training.md for its form)")
    checked = _Info(where, _classes(info, where))
    for split, entry in info["splits"].items():
        checked.splits[str(split)] = _split_entry(entry, f"{where} split {split!r}")
    return checked


def _classes(info: dict, where: str) -> list[str]:
    classes, count = info.get("classes"), info.get("num_classes")
    if classes is not None:
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
            raise UserError(f"{where}: 'classes' must be a list of class names")
        if len(set(classes)) != len(classes):
            raise UserError(f"{where}: 'classes' names a class twice")
        return list(classes)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
        return [str(i) for i in range(count)]
    raise UserError(f"{where}: name the classes with 'classes' (a list of names) or 'num_classes' (a count)")


def _split_entry(entry: Any, where: str) -> tuple[list[str], list[int]]:
    names = entry.get("filenames") if isinstance(entry, dict) else None
    lengths = entry.get("shard_lengths") if isinstance(entry, dict) else None
    plain = isinstance(names, list) and all(
        isinstance(n, str) and n.endswith(".tar") and "/" not in n and "\\" not in n for n in names
    )
    if not plain:
        raise UserError(f"{where}: 'filenames' must list the shards' .tar file names (no folders)")
    counts = isinstance(lengths, list) and all(type(n) is int and n >= 0 for n in lengths)  # bool is no count
    if not counts or len(lengths) != len(names):
        raise UserError(f"{where}: 'shard_lengths' must give each shard's sample count, one per file name")
    declared = entry.get("num_samples", sum(lengths))
    if declared != sum(lengths):
        raise UserError(f"{where}: 'num_samples' {declared} is not the sum of 'shard_lengths' ({sum(lengths)})")
    return names, lengths


def _locate(location: str, data: str) -> tuple[str, list[str] | None]:
    """(the folder or URL holding `_info.json`, the shard file names a pattern gives, or None for a folder)."""
    if not location:
        raise UserError(f"--data {data}: name the shards' folder, URL or pattern after wds:")
    expanded = list(_require("braceexpand").braceexpand(location))
    if not any(name.endswith(".tar") for name in expanded):
        if len(expanded) > 1:
            raise UserError(f"--data {data}: a brace pattern must name .tar shards")
        return location.rstrip("/") or "/", None
    if not all(name.endswith(".tar") for name in expanded):
        raise UserError(f"--data {data}: the pattern names files that are not .tar shards")
    places = [_split_path(name) for name in expanded]
    if len({base for base, _ in places}) != 1:
        raise UserError(f"--data {data}: the shards must sit in one folder, beside their {INFO}")
    names = [name for _, name in places]
    if len(set(names)) != len(names):
        raise UserError(f"--data {data}: the pattern names a shard twice")
    return places[0][0], names


def _shards_of(info: _Info, base: str, names: list[str], data: str) -> tuple[list[str], list[int]]:
    """URLs and lengths of the shards `names`, all of one split of `info`."""
    for filenames, lengths in info.splits.values():
        length_of = dict(zip(filenames, lengths, strict=True))
        if all(name in length_of for name in names):
            return [_join(base, n) for n in names], [length_of[n] for n in names]
    listed = {n for filenames, _ in info.splits.values() for n in filenames}
    unknown = next((n for n in names if n not in listed), names[0])
    raise UserError(f"--data {data}: {unknown} is not listed in {info.where}, or the shards are of several splits")


def _split(info: _Info, base: str, wanted: Sequence[str], data: str) -> tuple[list[str], list[int]]:
    name = next((s for s in wanted if s in info.splits), None)
    if name is None:
        raise UserError(f"--data {data}: {info.where} has no {' or '.join(wanted)} split")
    filenames, lengths = info.splits[name]
    return [_join(base, n) for n in filenames], lengths


def shard_splits(
    location: str, data: str, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0
) -> tuple[ShardDataset, ShardDataset]:
    """The training and validation shards `wds:LOCATION` names (see the module).

    Args:
        location: What follows `wds:`.
        data: The `--data` value, for messages.
        seed: The run's seed (shard orders and shuffle buffers).
        rank, world_size: This process's place in a distributed run.
        workers: DataLoader workers per process (0: the process itself reads).

    Raises:
        UserError: No webdataset package, an unreadable or malformed `_info.json`, shards it does not list, missing
            local shards, no usable first sample, or fewer training shards than readers (processes × workers).
    """
    base, names = _locate(location, data)
    info = _read_info(base, data)
    urls, lengths = _shards_of(info, base, names, data) if names else _split(info, base, ("train",), data)
    readers = world_size * max(workers, 1)
    if len(urls) < readers:
        raise UserError(
            f"--data {data}: {len(urls)} training shards cannot be shared by {world_size} process(es) × "
            f"{max(workers, 1)} loader worker(s), each of which reads its own: write smaller shards "
            "(`mambaout data shards --shard-size`) or lower --workers"
        )
    train = ShardDataset(urls, lengths, info.classes, data, True, seed, rank, world_size)
    val_urls, val_lengths = _split(info, base, VAL_SPLITS, data)
    return train, ShardDataset(val_urls, val_lengths, info.classes, data, False, seed, rank, world_size)


def eval_shards(location: str, data: str, rank: int = 0, world_size: int = 1) -> ShardDataset:
    """The shards `wds:LOCATION` names for evaluation: a pattern's shards, or a folder's `val` split.

    Raises:
        UserError: As `shard_splits`, but for the count of shards.
    """
    base, names = _locate(location, data)
    info = _read_info(base, data)
    urls, lengths = _shards_of(info, base, names, data) if names else _split(info, base, VAL_SPLITS, data)
    return ShardDataset(urls, lengths, info.classes, data, False, rank=rank, world_size=world_size)
