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
from mambaout.weights.io import atomic_write, check_sha256_format, file_sha256

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

    Raises:
        UserError: The download failed (with the URL and what to do instead), or its SHA-256 did not match (nothing
            is left in the cache then).
    """
    expected = check_sha256_format(sha256) if sha256 else None
    path = cache_path(url)
    if path.exists():
        if expected is None or file_sha256(path) == expected:
            return path
        path.unlink()  # a stale or damaged copy: fetch the file again
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as f, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            size = response.headers.get("Content-Length")
            digest, received = hashlib.sha256(), 0
            with tqdm(
                total=int(size) if size else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"downloading {path.name}",
                disable=None if progress else True,  # None: only on a terminal
            ) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if size and received != int(size):
                raise UserError(_failure(url, f"the connection closed after {received} of {size} bytes"))
            # the atomic write is abandoned (nothing lands in the cache) when the file is wrong
            if expected and digest.hexdigest() != expected:
                raise UserError(
                    f"SHA-256 mismatch for {url}: expected {expected}, got {digest.hexdigest()}; the download was "
                    "discarded"
                )
    except urllib.error.HTTPError as e:
        raise UserError(_failure(url, f"HTTP {e.code} {e.reason}")) from e
    except urllib.error.URLError as e:
        raise UserError(_failure(url, str(e.reason))) from e
    except (OSError, http.client.HTTPException) as e:
        raise UserError(_failure(url, f"{type(e).__name__}: {e}")) from e
    return path


def _failure(url: str, reason: str) -> str:
    return (
        f"could not download {url} ({reason}); download it by hand (browser, curl, wget) and pass the file's path "
        "instead"
    )
