"""Checkpoint files on disk: safe reading, atomic writing, and SHA-256 digests.

Reading never runs code from the file: PyTorch files go through `torch.load(weights_only=True)`, which refuses any
pickled object that is not a tensor or a plain container, and safetensors files hold no code at all. The format is
told from the file's first bytes, so a misnamed file still loads.
"""

import argparse
import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import safetensors
import safetensors.torch
import torch

from mambaout.errors import UserError, describe

__all__ = [
    "atomic_path",
    "atomic_write",
    "check_complete",
    "check_sha256_format",
    "file_format",
    "file_sha256",
    "read_file",
    "remove_stale_temps",
    "save_state_dict",
    "tensor_bytes",
    "verify_sha256",
]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6 writes a zip archive
_PICKLE_PROTO = b"\x80"  # older torch.save files are a bare pickle stream, which opens with a PROTO opcode


def file_format(path: Path) -> str:
    """The file's format, "safetensors" or "torch", told from its first bytes.

    A safetensors file opens with the little-endian u64 length of a JSON header that starts with `{`.

    Raises:
        UserError: The file is missing, empty, or neither format (a text file, an image, random bytes).
    """
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():  # reading a FIFO would wait for a writer; a device has no end
        kind = "a FIFO" if path.is_fifo() else "a device or other special file"
        raise UserError(f"{path} is {kind}, not a checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): an interrupted download or copy? fetch it again")
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    if head[8:9] == b"{":  # no pickle stream has `{` there; a header length past the end is caught on reading
        return "safetensors"
    if head.startswith(_PICKLE_PROTO):
        return "torch"
    raise UserError(f"{path} is not a PyTorch or safetensors checkpoint (it starts with {head[:8]!r})")


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason, without its advice on turning the check off."""
    lines = [line.strip() for line in str(error).splitlines()[1:]]
    detail = [line for line in lines if line and not line.startswith(("Please file", "Check the documentation"))]
    return " ".join(detail).split(" Please use", 1)[0] or describe(error)


def read_file(path: Path) -> Any:
    """The object stored in a checkpoint file, read without running any code from it.

    Args:
        path: A `.pth`/`.pt` (zip or legacy pickle) or `.safetensors` file; the extension is not trusted.

    Returns:
        A dict of tensors (safetensors) or whatever tensors-and-containers object `torch.save` stored.

    Raises:
        UserError: Missing, empty, truncated or corrupt file, not a checkpoint, or a pickle holding code.
    """
    if file_format(path) == "safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except safetensors.SafetensorError as e:
            raise UserError(f"cannot read {path}: truncated or corrupt safetensors file ({describe(e)})") from e
    try:
        # an open file, not the path: torch.load would take a `.safetensors` name for the safetensors format;
        # argparse.Namespace (timm's train.py stores its args as one) is a plain attribute bag that runs no code
        with path.open("rb") as f, torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        if "GLOBAL" in reason:
            raise UserError(
                f"refused to load {path}: it holds pickled Python objects, not just tensors, and unpickling them "
                f"could run code ({reason}); only plain state dicts and checkpoints of tensors are loaded"
            ) from e
        raise UserError(
            f"cannot read {path}: corrupt PyTorch file or a pickle the safe loader refuses ({reason})"
        ) from e
    # torch.load reports a damaged archive or stream with whatever its parser hit (OSError, KeyError, EOFError,
    # RuntimeError, ...); all of them mean the same thing to the user.
    except Exception as e:
        raise UserError(f"cannot read {path}: truncated or corrupt PyTorch file ({describe(e)})") from e


def check_complete(path: Path) -> None:
    """Raise `UserError` unless `path` is a whole checkpoint file, checked from its structure without loading it.

    A zip archive (torch.save) must end in its central directory; a safetensors file must be exactly as long as its
    header says; a legacy pickle stream is read through (`read_file`).
    """
    if file_format(path) == "torch":
        with path.open("rb") as f:
            zipped = f.read(4) == _ZIP_MAGIC
        if zipped and not zipfile.is_zipfile(path):
            raise UserError(f"{path} is cut short or corrupt: its zip archive has no central directory at the end")
        if not zipped:
            read_file(path)
        return
    size = path.stat().st_size
    if _safetensors_end(path) != size:
        raise UserError(f"{path} is cut short or corrupt: its safetensors header does not match its {size} bytes")


def _safetensors_end(path: Path) -> int | None:
    """Where a safetensors file's data ends by its header (8 + header + last tensor's end), or None if unreadable."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(length))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # JSON, UTF-8 or layout
            return None
    return 8 + length + max(ends, default=0)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256_format(sha256: str) -> str:
    """The expected digest in lower case; anything but 64 hex digits is a `UserError`."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
        raise UserError(f"sha256 must be 64 hex digits, got '{sha256}'")
    return sha256.lower()


def verify_sha256(path: Path, sha256: str) -> None:
    """Raise `UserError` unless the file's SHA-256 is `sha256` (the file is left in place)."""
    expected = check_sha256_format(sha256)
    actual = file_sha256(path)
    if actual != expected:
        raise UserError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual}; is it the file meant?")


# atomic_path's temporary files: `.<stem>.<pid>-<8 hex>.tmp<suffix>`; the pid tells a killed writer's leftovers
# (releases before 0.2 wrote `.<stem>.<8 hex>.tmp<suffix>`, without one)
_TEMP_NAME = re.compile(r"^\.(?P<stem>.*)\.(?:(?P<pid>\d+)-)?[0-9a-f]{8}\.tmp(?:\..*)?$")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
_NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_MIB = 1 << 20


def _writer_gone(pid: str | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process, or a pid no system has
        return False
    return False


def remove_stale_temps(folder: Path, stem: str | None = None) -> list[Path]:
    """Delete the temporary files of atomic writes in `folder` whose writer process is gone (killed mid-write).

    Args:
        folder: Where to look.
        stem: Only those of outputs with this stem (`last` for `last.pth`); default all.

    Returns:
        The files removed.
    """
    removed = []
    for candidate in folder.glob(".*.tmp*"):
        match = _TEMP_NAME.match(candidate.name)
        if match and (stem is None or match["stem"] == stem) and _writer_gone(match["pid"]):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _size(n: float) -> str:
    return f"{n / _MIB:.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


def _no_room(path: Path, reason: str, needed: int | None, written: int) -> UserError:
    """One line for a write that failed for room: how much the folder's file system has and the file needed."""
    free = shutil.disk_usage(path.parent).free
    need = f"about {_size(needed)}" if needed else f"more than the {_size(written)} written before it failed"
    return UserError(f"cannot write {path}: {reason}; {_size(free)} free there, the file needs {need}; {_kept(path)}")


def _kept(path: Path) -> str:
    return f"{path} is as it was" if path.exists() else "nothing was written"


def _write_failure(error: BaseException) -> str | None:
    """Why a writer failed, when it failed writing (disk full, quota, size limit, I/O error); None for any other
    error, which is raised as it is.

    torch.save reports a failed write of its zip archive as a RuntimeError from its C++ stream writer, not an OSError.
    """
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        return error.strerror or str(error)
    markers = ("inline_container", "PytorchStreamWriter", "unexpected pos", "file write failed")
    if isinstance(error, RuntimeError) and any(m in str(error) for m in markers):
        return "the write failed"
    return None


@contextmanager
def atomic_path(path: Path, size_hint: int | None = None) -> Iterator[Path]:
    """A new temporary file beside `path`, for writers that take a file name; on success it is synced and renamed
    onto `path`.

    Readers see either the old file or the complete new one, never a partial write; if the block raises, the
    temporary file is removed and an existing `path` is untouched. The temporary name keeps `path`'s suffix (some
    writers and loaders go by it, e.g. torch.export's `.pt2`) and carries the writer's pid, so the leftovers of a
    killed writer are removed by the next write of the same file (`remove_stale_temps`).

    Args:
        path: The file to write.
        size_hint: Bytes the file will take, when known: a file system with less room is refused before writing.

    Raises:
        UserError: The folder is missing or not writable, or the disk, quota or file-size limit ran out (the message
            gives the room there and what the file needs).
    """
    path = Path(path)
    if path.parent.is_dir():
        remove_stale_temps(path.parent, path.stem)
        if size_hint and shutil.disk_usage(path.parent).free < size_hint:
            raise _no_room(path, "not enough room", size_hint, 0)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        # mode 0o666 lets the umask apply, as for a plain open(); tempfile.mkstemp would leave the file owner-only
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:  # a missing or read-only folder: the user's path, so one line naming it
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        yield tmp
    except BaseException as e:
        _abandon(tmp, path, e, size_hint)
        raise
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. `path` became a folder, or the folder went read-only
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}; {_kept(path)}") from e


def _abandon(tmp: Path, path: Path, error: BaseException, size_hint: int | None) -> None:
    """Remove a failed write's temporary file; a failure to write (not a writer's bug) becomes a `UserError`."""
    reason = None if isinstance(error, UserError) else _write_failure(error)
    # room is judged before the temporary file goes: it is what filled the disk
    full = reason is not None and (
        getattr(error, "errno", None) in _NO_ROOM_ERRNOS or shutil.disk_usage(path.parent).free < _MIB
    )
    written = tmp.stat().st_size if tmp.exists() else 0
    tmp.unlink(missing_ok=True)
    if full:
        raise _no_room(
            path, "the disk is full" if reason == "the write failed" else reason, size_hint, written
        ) from error
    if reason is not None:
        raise UserError(f"cannot write {path}: {reason}; {_kept(path)}") from error


class _WriteErrors:
    """A binary file that remembers the OSError its last write raised: torch.save's C++ writer turns that error into
    a RuntimeError without its errno, which says whether the disk is full."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextmanager
def atomic_write(path: Path, size_hint: int | None = None) -> Iterator[BinaryIO]:
    """`atomic_path` opened for binary writing: the file object to write `path`'s new content to."""
    with atomic_path(path, size_hint) as tmp, open(tmp, "wb") as raw:
        f = _WriteErrors(raw)
        try:
            yield f  # type: ignore[misc]
        except BaseException as e:
            if f.error is not None and e is not f.error:
                raise f.error from e  # the write's own error, with its errno, for atomic_path to report
            raise


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict/list checkpoint: what `torch.save` will need, less a little."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict atomically; the extension picks the format.

    Args:
        state_dict: Parameter name -> tensor (any device; written from CPU copies).
        path: Destination; `.safetensors` writes safetensors, anything else a `torch.save` of a plain dict.

    Returns:
        The path written.

    Raises:
        UserError: The destination's folder is missing or not writable, or the disk is full.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_write(path, size_hint=tensor_bytes(tensors)) as f:
        if path.suffix == ".safetensors":
            f.write(safetensors.torch.save(tensors, metadata={"format": "pt"}))
        else:
            torch.save(tensors, f)
    return path
