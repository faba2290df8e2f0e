"""Cache files shared by every cache (the Omega cache, the processed weights, the run cache): where they live,
when they may be used, and how an entry is written and checked.

An entry is the file and `<name>.sha256`, the digest of its bytes, each moved into place in one step; it is
read only when the digest matches, and a bad entry is discarded with one `CacheWarning` and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

from circuitlang.atomic import atomic_path, atomic_write

from circuitlang.environment import CACHE_ENV, cache_override


def cache_root() -> Path:
    """The cache root: `$CIRCUITLANG_CACHE` if set, else the platform's user cache dir for circuitlang."""
    override = cache_override()
    if override is not None:
        return override
    import platformdirs

    return Path(platformdirs.user_cache_dir("circuitlang"))


class CacheWarning(UserWarning):
    """A cache entry that could not be used (unreadable, edited, or of another shape) and was recomputed."""


# On only inside `use_caches()` (the runner uses it): the Python API (`trace`) and the tests never write to
# the user's cache.
_caches_on: ContextVar[bool] = ContextVar("circuitlang_caches", default=False)


@contextlib.contextmanager
def use_caches() -> Iterator[None]:
    """Let the engine's caches be read and written inside the block: the Omega cache (`cached_layer_slices`),
    the processed weights (`load_model`, models/weights_cache.py) and, in the runner, the run cache."""
    token = _caches_on.set(True)
    try:
        yield
    finally:
        _caches_on.reset(token)


def caches_on() -> bool:
    """Whether the block is inside `use_caches()`."""
    return _caches_on.get()


def write_checked(path: Path, data: bytes) -> None:
    """`data` at `path` and its sha256 at `path.sha256`-style sidecar, each moved into place in one step."""
    atomic_write(path, data)
    atomic_write(_sidecar(path), hashlib.sha256(data).hexdigest().encode())


def read_checked(path: Path) -> bytes | None:
    """The bytes at `path` if its sidecar digest matches them; None if the entry is absent.

    Raises ValueError for an entry that is there but does not check out (edited, truncated, no digest).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if hashlib.sha256(data).hexdigest() != _expected_digest(path):
        raise ValueError("its contents do not match their checksum")
    return data


def write_checked_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write_checked` for a file too large to hold twice in memory: `write(tmp)` writes it, the digest is
    read back from the disk."""
    with atomic_path(path) as tmp:
        write(tmp)
        with tmp.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
    atomic_write(_sidecar(path), digest.encode())


def verify_checked(path: Path) -> bool:
    """`read_checked` for a file too large to hold in memory (it is read in blocks): False if the entry is
    absent, True if it matches its digest; ValueError for an entry that does not check out."""
    try:
        with path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        return False
    if digest != _expected_digest(path):
        raise ValueError("its contents do not match their checksum")
    return True


def _expected_digest(path: Path) -> str:
    try:
        return _sidecar(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError("its checksum file is missing or unreadable") from err


NOT_STORED = "could not write to the cache {root} ({reason}); this run's results are not stored there, so later runs compute them again"


@contextlib.contextmanager
def storing() -> Iterator[None]:
    """A cache write: one that fails (a read-only or full cache) costs only the reuse, and says so with a
    CacheWarning (the same line from every cache, which the CLI prints once)."""
    try:
        yield
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        warnings.warn(CacheWarning(NOT_STORED.format(root=cache_root(), reason=reason)), stacklevel=3)


def discard(path: Path, what: str, reason: str) -> None:
    """Remove a bad cache entry and say so once (the CLI prints CacheWarnings as one line each)."""
    for p in (path, _sidecar(path)):
        with contextlib.suppress(OSError):
            p.unlink()
    warnings.warn(CacheWarning(f"discarded {what} ({reason}); recomputing it"), stacklevel=3)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


