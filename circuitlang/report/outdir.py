"""Output directories: is one usable (asked before a run loads its model, so a bad `output` or `--out` costs
seconds, not a whole trace), and whose files are in it. A run writes its files with a manifest naming
its spec, its plan and every file with its sha256; it replaces only its own spec's earlier outputs (others'
with --force), and `circ view` and `circ diff` read only files a manifest lists, so two runs never mix.
Pure Python: no torch, no Graphviz."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from circuitlang.atomic import atomic_write


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


# --- Ownership: every file in an output directory belongs to the run that its manifest names ---------------

MANIFEST = "circuitlang-run.json"
MANIFEST_FORMAT = "circuitlang.outputs/1"
# What circuitlang writes into an output directory: files like these with no manifest naming them are a
# run's of unknown origin (an older circuitlang, or a copy), so they are never silently mixed with a new run.
# Exact names (and the plots' pattern), so that --force never takes a user's own file (a trace.py, say).
_OUTPUT_PATTERNS = (*(f"{stem}.{ext}" for stem in ("trace", "diff") for ext in ("json", "graphml", "dot", "svg", "png", "html")),
                    "interventions.json", "interventions-*.png", "faithfulness.json", "faithfulness.png",
                    "neuronpedia/*.json", MANIFEST)


@dataclass(frozen=True)
class Owner:
    """Who writes an output directory: a `circ run` of one spec file (`spec`: its resolved path), or any
    `circ diff` (a diff replaces the diff before it). A run of the same spec replaces its earlier outputs;
    another owner's are replaced only with --force."""

    kind: str  # "run" or "diff"
    spec: str | None = None
    spec_sha256: str | None = None
    plan: str | None = None

    def same(self, manifest: dict) -> bool:
        return manifest.get("kind") == self.kind and (self.kind == "diff" or manifest.get("spec") == self.spec)


def run_owner(spec_path: str | os.PathLike, plan_text: str) -> Owner:
    path = Path(spec_path).resolve()
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return Owner("run", str(path), digest, plan_text)


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of an output directory; None if it has none. ValueError if it is there but unreadable."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
        raise ValueError(f"{path} is not a circuitlang manifest")
    return data


def _foreign(directory: Path, owner: Owner) -> tuple[str | None, list[Path]]:
    """(who owns them, the files) of outputs in `directory` that are not `owner`'s: none if it may write there."""
    if not directory.is_dir():
        return None, []
    try:
        manifest = read_manifest(directory)
    except ValueError:  # unreadable: its outputs are found by their names, as with no manifest
        manifest = None
    if manifest is not None:
        if owner.same(manifest):
            return None, []
        listed = [directory / name for name in manifest["files"] if _inside(name)] + [directory / MANIFEST]
        who = f"`circ run {manifest.get('spec')}`" if manifest.get("kind") == "run" else "`circ diff`"
        return who, [p for p in listed if p.exists()]
    found = sorted({p for pattern in _OUTPUT_PATTERNS for p in directory.glob(pattern) if p.is_file()})
    return ("a run with no manifest" if found else None), found


def claim(directory: str | os.PathLike, owner: Owner, force: bool) -> None:
    """Raise OutputDirError (one line) if `directory` holds another run's outputs and `force` is not set;
    asked before the work, so a refusal costs nothing. Nothing is removed here (see `publish`)."""
    who, files = _foreign(Path(directory).expanduser(), owner)
    if files and not force:
        shown = ", ".join(p.name for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise OutputDirError(f"{os.fspath(directory)} holds the outputs of {who} ({shown}); give another --out, "
                             f"or --force to replace them")


@contextlib.contextmanager
def staged(directory: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden directory inside `directory` for a run's outputs, removed afterwards (`publish` empties
    it on success); on failure or Ctrl-C `directory` is as it was (and removed if this made it)."""
    directory = Path(directory).expanduser()
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".circ-new-", dir=directory))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if nothing was published into it


def publish(stage: Path, directory: str | os.PathLike, owner: Owner, force: bool) -> list[Path]:
    """Move the files written in `stage` into `directory` and write its manifest, replacing the outputs there
    of this owner (or, with `force`, anyone's): files of the old run that this one did not write are removed.

    The old run keeps its files untouched until the new one is complete; then, with Ctrl-C and SIGTERM held
    back, the old manifest goes first (a reader never sees it list a new file), the files are swapped by
    renames, and the new manifest, with every file's sha256, comes last. Returns the paths published."""
    directory = Path(directory).expanduser()
    claim(directory, owner, force)  # another run may have written there while this one worked
    names = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())  # neuronpedia/ nests
    old: list[Path] = []
    try:
        manifest = read_manifest(directory)
    except ValueError:
        manifest = None
    if manifest is not None:
        old = [directory / name for name in manifest["files"] if name not in names and _inside(name)]
    if force:
        old += [p for p in _foreign(directory, owner)[1] if p.relative_to(directory).as_posix() not in names]
    entry = {"format": MANIFEST_FORMAT, "kind": owner.kind, "spec": owner.spec, "spec_sha256": owner.spec_sha256,
             "plan": owner.plan, "files": {name: file_digest(stage / name) for name in names}}
    with _signals_held():
        (directory / MANIFEST).unlink(missing_ok=True)
        for path in old:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a subdirectory the old run made, if nothing else is in it now
                if path.parent != directory:
                    path.parent.rmdir()
        for name in names:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, directory / name)
        atomic_write(directory / MANIFEST, json.dumps(entry, indent=1, sort_keys=True) + "\n")
    return [directory / name for name in names]


def _inside(name: str) -> bool:
    """Whether a manifest's file name stays inside its directory (never removes anything outside it)."""
    return not Path(name).is_absolute() and ".." not in Path(name).parts


def listed(path: str | os.PathLike) -> tuple[bool, dict | None]:
    """Whether the output file `path` may be read as part of its directory's run: (True, manifest) if the
    manifest lists it and its bytes are those the run wrote; (False, manifest) if there is a manifest that
    does not list it or lists other bytes; (True, None) for a file outside any managed directory."""
    path = Path(path)
    manifest = read_manifest(path.parent)
    if manifest is None:
        return True, None
    digest = manifest["files"].get(path.name)
    return digest is not None and path.is_file() and file_digest(path) == digest, manifest


class NotThisRun(ValueError):
    """A file that its directory's manifest does not list with these bytes (changed, or another run's)."""


def require_listed(path: str | os.PathLike) -> dict | None:
    """`listed`, raising NotThisRun (one line) for a file that may not be read as its run's; the manifest."""
    ok, manifest = listed(path)
    if not ok:
        what = "other bytes" if Path(path).name in manifest["files"] else "no such file"
        raise NotThisRun(f"{os.fspath(path)} is not the {Path(path).name} its run wrote ({MANIFEST} beside it lists {what}); "
                         "run its spec again")
    return manifest


def record(path: Path, manifest: dict) -> None:
    """Add a file written after the run (the viewer's trace.html) to its directory's manifest."""
    files = {**manifest["files"], path.name: file_digest(path)}
    atomic_write(path.parent / MANIFEST, json.dumps({**manifest, "files": files}, indent=1, sort_keys=True) + "\n")


def file_digest(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block (a few renames) is done, then act as they would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {s: signal.signal(s, lambda n, _f: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in caught:
            signal.raise_signal(s)
