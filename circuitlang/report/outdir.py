"""Is an output directory usable? Asked before a run loads its model, so a bad `output` or `--out` costs
seconds, not a whole trace. Pure Python: no torch, no Graphviz."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputDirError(OSError):
    """An output directory that can't be created or written; `str(e)` is one line naming it."""


def check_writable(directory: str | os.PathLike) -> None:
    """Raise OutputDirError unless `directory` is, or can be created as, a directory we may write into.

    Creates nothing that stays: a directory that does not exist yet is tested by making (and removing) a
    temporary directory in its nearest existing ancestor; one that exists by making a temporary file in it
    (permission bits say nothing for root, a read-only mount or an ACL, so it is tried, not inferred).
    """
    shown = os.fspath(directory)
    path = Path(directory).expanduser()

    def fail(reason: str) -> OutputDirError:
        return OutputDirError(f"cannot write to {shown}: {reason}")

    if not shown.strip():
        raise fail("the directory name is empty")
    existing = path
    while not existing.exists() and not existing.is_symlink():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise fail(f"{existing} is a broken symbolic link")
    if not existing.is_dir():
        what = "is a file" if existing.is_file() else "exists and is not a directory"
        raise fail(f"{existing} {what}" if existing == path else f"{existing} {what}, so no directory can be made under it")
    try:
        if existing == path:
            with tempfile.TemporaryFile(dir=path, prefix=".circ-write-test-"):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".circ-write-test-"))
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        raise fail(reason if existing == path else f"can't create it in {existing}: {reason}") from None
