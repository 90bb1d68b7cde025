"""Checkpoint files on disk: safe reading, atomic writing, and SHA-256 digests.

Reading never runs code from the file: PyTorch files go through `torch.load(weights_only=True)`, which refuses any
pickled object that is not a tensor or a plain container, and safetensors files hold no code at all. The format is
told from the file's first bytes, so a misnamed file still loads.
"""

import argparse
import hashlib
import os
import pickle
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import safetensors
import safetensors.torch
import torch

from mambaout.errors import UserError

__all__ = [
    "atomic_path",
    "atomic_write",
    "check_sha256_format",
    "file_format",
    "file_sha256",
    "read_file",
    "save_state_dict",
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


def _describe(error: BaseException, limit: int = 200) -> str:
    """`Type: message` on one line, shortened; parsers' messages can run over many lines."""
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason, without its advice on turning the check off."""
    lines = [line.strip() for line in str(error).splitlines()[1:]]
    detail = [line for line in lines if line and not line.startswith(("Please file", "Check the documentation"))]
    return " ".join(detail).split(" Please use", 1)[0] or _describe(error)


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
            raise UserError(f"cannot read {path}: truncated or corrupt safetensors file ({_describe(e)})") from e
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
        raise UserError(f"cannot read {path}: truncated or corrupt PyTorch file ({_describe(e)})") from e


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


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A new temporary file beside `path`, for writers that take a file name; on success it is synced and renamed
    onto `path`.

    Readers see either the old file or the complete new one, never a partial write; if the block raises, the
    temporary file is removed and an existing `path` is untouched. The temporary name keeps `path`'s suffix (some
    writers and loaders go by it, e.g. torch.export's `.pt2`). A folder that is missing or not writable raises a
    `UserError` naming `path`.
    """
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        # mode 0o666 lets the umask apply, as for a plain open(); tempfile.mkstemp would leave the file owner-only
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:  # a missing or read-only folder: the user's path, so one line naming it
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """`atomic_path` opened for binary writing: the file object to write `path`'s new content to."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict atomically; the extension picks the format.

    Args:
        state_dict: Parameter name -> tensor (any device; written from CPU copies).
        path: Destination; `.safetensors` writes safetensors, anything else a `torch.save` of a plain dict.

    Returns:
        The path written.

    Raises:
        UserError: The destination's folder is missing or not writable.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    try:
        with atomic_write(path) as f:
            if path.suffix == ".safetensors":
                f.write(safetensors.torch.save(tensors, metadata={"format": "pt"}))
            else:
                torch.save(tensors, f)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    return path
