"""The environment variables circuitlang reads, each parsed here and checked by the CLI before any model
loads: a wrong value is one line naming the variable and what was expected, never a traceback later; and
the one setting of the process the CLI makes at start (glibc's mmap threshold)."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CACHE_ENV = "CIRCUITLANG_CACHE"
"""Environment variable overriding the cache root (default: `platformdirs.user_cache_dir("circuitlang")`)."""
BUDGET_ENV = "CIRCUITLANG_CHUNK_MB"
"""Environment variable setting the activation budget of a chunk, in MiB (runner/chunks.py)."""
MAX_BUDGET_MB = 2**30  # a petabyte of activations: beyond any machine, and still an exact integer of bytes


class EnvironmentVariableError(ValueError):
    """A variable set to something circuitlang cannot use; `str(e)` is one line naming it."""


def chunk_budget_mb() -> float | None:
    """$CIRCUITLANG_CHUNK_MB as a number of MiB in [1, MAX_BUDGET_MB]; None when it is unset or empty."""
    text = os.environ.get(BUDGET_ENV, "")
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 1 <= value <= MAX_BUDGET_MB:  # NaN fails too; below 1 MiB every chunk would be one prompt
        raise EnvironmentVariableError(f"${BUDGET_ENV}={text!r}: expected the megabytes of activations a chunk may "
                                       f"hold, a number from 1 to {MAX_BUDGET_MB}")
    return value


def cache_override() -> Path | None:
    """$CIRCUITLANG_CACHE as a path; None when it is unset or empty. A path that is, or lies under, something
    other than a directory is an error (a read-only directory is not: the run goes on without storing)."""
    text = os.environ.get(CACHE_ENV, "")
    if not text:
        return None
    path = Path(text).expanduser()
    for existing in (path, *path.parents):
        if existing.exists() or existing.is_symlink():
            if not existing.is_dir():
                where = "is" if existing == path else f"lies under {existing}, which is"
                raise EnvironmentVariableError(f"${CACHE_ENV}={text!r}: expected a directory for the caches; it {where} "
                                               "not a directory")
            break
    return path


def check_environment() -> None:
    """Raise EnvironmentVariableError for the first variable set to a value that cannot be used."""
    chunk_budget_mb()
    cache_override()


MMAP_THRESHOLD = 4 << 20
"""Blocks of at least this many bytes are mapped (and unmapped when freed) by glibc's malloc, whatever was freed before."""


def fix_mmap_threshold() -> None:
    """glibc raises its mmap threshold to the size of every mapped block freed (up to 32 MiB): after a first
    run's GGUF conversion and weight processing freed their 10-30 MB slices, blocks of that size came from
    the heap and stayed resident when freed (the trace of a first run of specs/ioi.circ peaked 0.2 GB above
    a later run's). A fixed threshold is what MALLOC_MMAP_THRESHOLD_ sets; no-op off glibc."""
    import ctypes
    import ctypes.util

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # the user's own choice
        return
    M_MMAP_THRESHOLD = -3  # malloc.h
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
