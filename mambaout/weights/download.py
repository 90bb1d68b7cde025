"""Fetching published weights: download once into torch.hub's cache, atomically, checking SHA-256 when known.

The cache is `torch.hub.get_dir()/checkpoints` (so `TORCH_HOME` moves it), shared with `torch.hub`. The official
release publishes no hashes; its files are checked instead by loading them safely and fitting them to the
architecture (`load_checkpoint`).
"""

import hashlib
import http.client
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from mambaout.errors import UserError
from mambaout.weights.io import atomic_path, check_complete, check_sha256_format, file_sha256

__all__ = ["cache_path", "download_cached", "is_url"]

URL_SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20
_TIMEOUT_S = 60


def is_url(location: str) -> bool:
    """Whether `location` is an http(s):// or file:// URL rather than a local path."""
    return urllib.parse.urlparse(location).scheme in URL_SCHEMES


def cache_path(url: str) -> Path:
    """Where `url` is cached: its file name tagged with a hash of the URL.

    The tag keeps apart files that share a name, such as every timm hub repository's `model.safetensors`.
    """
    name = Path(urllib.parse.urlparse(url).path).name or "weights.pth"
    tag = hashlib.sha256(url.encode()).hexdigest()[:8]
    stem, dot, suffix = name.rpartition(".")
    cached = f"{stem}-{tag}.{suffix}" if dot else f"{name}-{tag}"
    return Path(torch.hub.get_dir()) / "checkpoints" / cached


def download_cached(url: str, sha256: str | None = None, progress: bool = True) -> Path:
    """The local path of `url`'s file, downloading it on first use.

    Args:
        url: An http(s):// or file:// URL.
        sha256: Expected hex SHA-256 of the file; a cached copy that does not match is fetched again.
        progress: Show a progress bar on a terminal.

    Returns:
        The cached file.

    A file:// source replaced since it was cached (another size, or newer) is fetched again. A download is kept only
    when it is complete: its Content-Length, its SHA-256 when known, and its own structure (a zip archive's
    directory, a safetensors header's sizes) are checked before it lands in the cache.

    Raises:
        UserError: The download failed (with the URL and what to do instead), or was cut short, or its SHA-256 did
            not match (nothing is left in the cache then).
    """
    expected = check_sha256_format(sha256) if sha256 else None
    path = cache_path(url)
    if path.exists():
        if not _changed_at_source(url, path) and (expected is None or file_sha256(path) == expected):
            return path
        path.unlink()  # a stale or damaged copy: fetch the file again
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            size = response.headers.get("Content-Length")
            digest, received = hashlib.sha256(), 0
            with (
                open(tmp, "wb") as f,
                tqdm(
                    total=int(size) if size else None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"downloading {path.name}",
                    disable=None if progress else True,  # None: only on a terminal
                ) as bar,
            ):
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # the atomic write is abandoned (nothing lands in the cache) when the file is wrong
            if size and received != int(size):
                raise UserError(_failure(url, f"the connection closed after {received} of {size} bytes"))
            if expected and digest.hexdigest() != expected:
                raise UserError(
                    f"SHA-256 mismatch for {url}: expected {expected}, got {digest.hexdigest()}; the download was "
                    "discarded"
                )
            try:  # a server that sends no length can still cut the file short: its own structure tells
                check_complete(tmp)
            except UserError as e:
                raise UserError(_failure(url, f"the file that arrived is not a whole checkpoint: {e}")) from None
    except urllib.error.HTTPError as e:
        raise UserError(_failure(url, f"HTTP {e.code} {e.reason}")) from e
    except urllib.error.URLError as e:
        raise UserError(_failure(url, str(e.reason))) from e
    except (OSError, http.client.HTTPException) as e:
        raise UserError(_failure(url, f"{type(e).__name__}: {e}")) from e
    return path


def _changed_at_source(url: str, cached: Path) -> bool:
    """Whether a file:// source was replaced since it was cached (another size, or newer); a gone source has not."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        return False  # published http(s) files do not change under their URL
    source = Path(urllib.request.url2pathname(parsed.path))
    try:
        stat, kept = source.stat(), cached.stat()
    except FileNotFoundError:
        return False
    return stat.st_size != kept.st_size or stat.st_mtime_ns > kept.st_mtime_ns


def _failure(url: str, reason: str) -> str:
    return (
        f"could not download {url} ({reason}); download it by hand (browser, curl, wget) and pass the file's path "
        "instead"
    )
