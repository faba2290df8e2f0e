"""The run cache, `runs/<key>/` under the cache root (`$CIRCUITLANG_CACHE`, else the user cache dir).

An entry holds a finished run's trace.json and run.json (auto roots, F(X), and what made the key, for
people), and one `interventions-<key>.json` per set of intervene blocks run on that trace. The run key
hashes ENGINE_VERSION, the compiled plan without what cannot change the trace (output, show, compare,
the intervene blocks and their seed, and which files it was compiled from), the prompts file's bytes,
and the model's identity (`model_identity`). An interventions key adds the intervene blocks and the seed.

Every file has a `.sha256` beside it and is read only when it matches, then validated; an entry that
fails either is discarded with a CacheWarning and recomputed. Entries are written in a temporary
directory or file and moved into place in one step. `circ cache` shows the sizes and clears them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from circuitlang.models.embedded import resolve_embedded
from circuitlang.engine.evaluate import FaithfulnessResults
from circuitlang.engine.intervene import InterventionResults
from circuitlang.models.model import _is_local
from circuitlang.cachefiles import cache_root, discard, read_checked, write_checked
from circuitlang.engine.omega_cache import ENGINE_VERSION, omega_dir
from circuitlang.engine.results import Trace
from circuitlang.engine.roots import RootChoice, RootSkip
from circuitlang.models.weights_cache import directory_digest
from circuitlang.lang import format_plan
from circuitlang.lang.plan import FilePrompts, Output, Plan, Root
from circuitlang.report.export import dumps, trace_from_dict, trace_to_dict
from circuitlang.report.faithfulness import faithfulness_from_dict, faithfulness_to_dict
from circuitlang.report.interventions import interventions_from_dict, interventions_to_dict

REUSED = "reusing cached {what} {key:.12} (spec and model unchanged); --no-cache to recompute"


def model_identity(name: str, progress: Callable[[str], None] | None = None) -> str | None:
    """What the weights of model `name` are, cheaply; None when that cannot be known before loading.

    A local directory (the embedded alias's is named by its GGUF's sha256): sha256 over every file's
    (path, size, mtime_ns) plus config.json's bytes, so rewriting or touching a weight file or the
    tokenizer changes it. A hub name: the snapshot commit the local Hugging Face cache resolves `main` to;
    None if the model is not cached there (the run downloads it and is not cached this time).
    `progress` gets the embedded model's build stages on its first use.
    """
    path = resolve_embedded(name, progress=progress) or name
    if _is_local(path):
        return "dir:" + directory_digest(Path(path)) if Path(path).is_dir() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")  # .../snapshots/<commit>/config.json
    except ValueError:  # not a valid repo id: the load reports it
        return None
    return f"hub:{name}@{Path(found).parent.name}" if isinstance(found, str) else None


def trace_plan_text(plan: Plan) -> str:
    """`format_plan` of the plan with what cannot change the trace reset: output, show, compare, sources,
    and the intervene blocks and their seed (they run after the trace and are cached on their own)."""
    return format_plan(dataclasses.replace(plan, output=Output(), show_min_count=1, compare=None, sources=(),
                                           interventions=(), seed=0, evaluate=None))


def run_key(plan: Plan, model_identity: str) -> str:
    """The run cache key of `plan` on the model `model_identity`; reads the prompts file, if any."""
    parts = [ENGINE_VERSION, trace_plan_text(plan), model_identity]
    if isinstance(plan.prompts, FilePrompts):  # the plan names the file; its content makes the prompts
        parts.append(hashlib.sha256(Path(plan.prompts.path).read_bytes()).hexdigest())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def interventions_key(plan: Plan) -> str:
    """What, besides the run key, makes a plan's intervention results: its intervene blocks and seed."""
    blocks = format_plan(dataclasses.replace(plan, output=Output(), show_min_count=1, compare=None, sources=(), evaluate=None))
    return hashlib.sha256(f"{ENGINE_VERSION}\0{plan.seed}\0{blocks}".encode()).hexdigest()


FAITHFULNESS_VERSION = "2"  # bump when the evaluation's rankings or scores change (2: influence, MIB-style scores)


def faithfulness_key(plan: Plan) -> str:
    """What, besides the run key, makes a plan's faithfulness results: the evaluate statement, the seed, and
    the reference head sets of the top-k overlaps (show, compare)."""
    text = format_plan(dataclasses.replace(plan, output=Output(), sources=(), interventions=()))
    return hashlib.sha256(f"{ENGINE_VERSION}\0faithfulness {FAITHFULNESS_VERSION}\0{text}".encode()).hexdigest()


def load_faithfulness(key: str, fkey: str) -> FaithfulnessResults | None:
    return _load_beside(key, f"faithfulness-{fkey[:16]}.json", faithfulness_from_dict, f"the cached faithfulness results {fkey:.12}")


def store_faithfulness(key: str, fkey: str, results: FaithfulnessResults) -> None:
    _store_beside(key, f"faithfulness-{fkey[:16]}.json", faithfulness_to_dict(results))


def runs_dir() -> Path:
    return cache_root() / "runs"


@dataclasses.dataclass(frozen=True)
class CachedRun:
    trace: Trace
    auto_roots: tuple[RootChoice, ...]
    skipped_roots: tuple[RootSkip, ...]
    logit_diff: tuple[float, ...]


def load_run(key: str) -> CachedRun | None:
    """The cached run of `key`; None if absent. A corrupt entry is discarded (CacheWarning) and None returned."""
    directory = runs_dir() / key
    if not directory.is_dir():
        return None
    try:
        trace_bytes, run_bytes = read_checked(directory / "trace.json"), read_checked(directory / "run.json")
        if trace_bytes is None or run_bytes is None:
            raise ValueError("a file is missing")
        return _parse_run(json.loads(trace_bytes), json.loads(run_bytes))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        _discard_entry(directory, f"the cached run {key:.12}", str(err).splitlines()[0][:160] if str(err) else type(err).__name__)
        return None


def _parse_run(trace_data: Any, extras: Any) -> CachedRun:
    if not isinstance(extras, dict) or extras.get("engine") != ENGINE_VERSION:
        raise ValueError("run.json is not a run of this engine")
    roots = tuple(RootChoice(Root(**c["root"]), float(c["direct_effect"]), int(c["fired"]), bool(c.get("from_end", True)))
                  for c in extras["auto_roots"])
    skipped = tuple(RootSkip(int(s["layer"]), int(s["head"]), float(s["direct_effect"]), str(s["reason"])) for s in extras["skipped_roots"])
    diffs = tuple(float("nan") if d is None else float(d) for d in extras["logit_diff"])
    if not isinstance(trace_data, dict):
        raise ValueError("trace.json is not an object")
    return CachedRun(trace_from_dict(trace_data), roots, skipped, diffs)


def store_run(key: str, run: CachedRun, extras: dict[str, Any]) -> Path:
    """Cache `run` (the trace without timings) and the JSON-ready `extras` (what made the key) under `key`."""
    runs = runs_dir()
    runs.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=runs))
    try:
        data = {"auto_roots": [dataclasses.asdict(c) for c in run.auto_roots], "skipped_roots": [dataclasses.asdict(s) for s in run.skipped_roots],
                "logit_diff": list(run.logit_diff), "engine": ENGINE_VERSION, **extras}
        write_checked(build / "trace.json", dumps(trace_to_dict(run.trace)).encode())
        write_checked(build / "run.json", dumps(data).encode())
        os.chmod(build, 0o755)
        _publish(build, runs / key)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when published
    return runs / key


def load_interventions(key: str, ikey: str) -> InterventionResults | None:
    return _load_beside(key, f"interventions-{ikey[:16]}.json", interventions_from_dict, f"the cached interventions {ikey:.12}")


def store_interventions(key: str, ikey: str, results: InterventionResults) -> None:
    _store_beside(key, f"interventions-{ikey[:16]}.json", interventions_to_dict(results))


def _load_beside(key: str, name: str, parse: Callable[[dict], Any], what: str) -> Any:
    """Results stored beside the trace of run `key`; None if absent, or discarded (CacheWarning) if corrupt."""
    path = runs_dir() / key / name
    try:
        data = read_checked(path)
        return None if data is None else parse(json.loads(data))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        discard(path, what, str(err).splitlines()[0][:160] if str(err) else type(err).__name__)
        return None


def _store_beside(key: str, name: str, data: dict) -> None:
    directory = runs_dir() / key
    if directory.is_dir():  # results of a trace that was not stored (--no-cache, an unknown model) are not either
        write_checked(directory / name, dumps(data).encode())


def _discard_entry(directory: Path, what: str, reason: str) -> None:
    discard(directory / "run.json", what, reason)
    shutil.rmtree(directory, ignore_errors=True)


def _publish(build: Path, target: Path) -> None:
    """Move directory `build` to `target` in one step, replacing an entry there (stale: it was not loaded)."""
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=".old-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, aside / "old")
        shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(OSError):  # a process running the same plan published first: its entry is as good
        os.replace(build, target)


# --- `circ cache` -------------------------------------------------------------------------------------

KINDS = {"runs": runs_dir, "omega": omega_dir, "models": lambda: cache_root() / "models"}


def cache_usage() -> dict[str, tuple[int, int]]:
    """{kind: (entries, bytes)} for the run cache, the Omega cache and the embedded models' copies."""
    out = {}
    for kind, where in KINDS.items():
        directory = where()
        entries = [p for p in directory.iterdir() if not p.name.startswith(".") and not p.name.endswith(".sha256")] if directory.is_dir() else []
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) if directory.is_dir() else 0
        out[kind] = (len(entries), size)
    return out


@dataclasses.dataclass(frozen=True)
class Cleared:
    """What `clear_cache` did: bytes removed, bytes it could not remove, and the first reason why."""

    freed: int
    left: int = 0
    error: str | None = None


def clear_cache(kinds: tuple[str, ...]) -> Cleared:
    """Remove the named kinds of cache entries, file by file, counting only what was removed (a read-only
    cache frees nothing and says why)."""
    freed = left = 0
    error = None
    for kind in kinds:
        directory = KINDS[kind]()
        if not directory.is_dir():
            continue
        for path in [p for p in directory.rglob("*") if p.is_file() or p.is_symlink()]:
            size = path.lstat().st_size
            try:
                path.unlink()
                freed += size
            except OSError as err:
                left += size
                error = error or f"{(err.strerror or str(err)).lower()} ({path})"
        shutil.rmtree(directory, ignore_errors=True)  # the directories, now empty unless a file stayed
    return Cleared(freed, left, error)
