"""The run cache and the Omega cache, under the cache root (`$CIRCUITLANG_CACHE`, else the user cache dir).

Run cache, `runs/<key>/`: a finished run's trace.json and run.json (auto roots, F(X), and what made the
key, for people). The key hashes ENGINE_VERSION, the compiled plan without what cannot change the trace
(output, show, compare, and which files it was compiled from), the prompts file's bytes, and the model's
identity (`model_identity`). A second `circ run` of an unchanged spec loads the trace instead of the model.

Omega cache, `omega/<key>.pt`: one layer's `OmegaSlices` (float64), so a run that changes the spec but not
the model skips the QR and SVDs (for rotary models one core SVD per head and offset). The key hashes the
layer's exact inputs, so no model identity is needed and a dtype or device change cannot alias.

Entries are written in a temporary file or directory and moved into place with one `os.replace`. Nothing
is ever evicted: remove the directories to reclaim the space.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor

from circuitlang.engine.embedded import cache_root, resolve_embedded
from circuitlang.engine.geometry import AttentionGeometry, layer_slices
from circuitlang.engine.model import _is_local
from circuitlang.engine.omega import OmegaSlices
from circuitlang.engine.results import Trace
from circuitlang.engine.roots import RootChoice
from circuitlang.lang import format_plan
from circuitlang.lang.plan import FilePrompts, Output, Plan, Root
from circuitlang.report.atomic import atomic_path, atomic_write
from circuitlang.report.export import dumps, read_trace_json, write_trace_json

if TYPE_CHECKING:
    from circuitlang.engine.run import RunResult

ENGINE_VERSION = "1"  # bump whenever an engine change alters traces or Omega: every cached entry goes stale

REUSED = "reusing cached trace {key:.12} (spec and model unchanged); --no-cache to recompute"

# On only inside `omega_cache()` (`cached_run` uses it): the Python API (`trace`) and the tests never write to
# the user's cache.
_omega_on: ContextVar[bool] = ContextVar("circuitlang_omega_cache", default=False)


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
        return "dir:" + _directory_digest(Path(path)) if Path(path).is_dir() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")  # .../snapshots/<commit>/config.json
    except ValueError:  # not a valid repo id: the load reports it
        return None
    return f"hub:{name}@{Path(found).parent.name}" if isinstance(found, str) else None


def _directory_digest(directory: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.relative_to(directory).as_posix().startswith("."))
    for f in files:
        stat = f.stat()
        h.update(f"{f.relative_to(directory).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    config = directory / "config.json"
    if config.is_file():  # content too: a copy that keeps mtimes (cp -p) of an edited config
        h.update(config.read_bytes())
    return h.hexdigest()


def trace_plan_text(plan: Plan) -> str:
    """`format_plan` of the plan with what cannot change the trace reset: output, show, compare, sources,
    and the intervene blocks and their seed (interventions run after the trace, never from the cache)."""
    return format_plan(dataclasses.replace(plan, output=Output(), show_min_count=1, compare=None, sources=(),
                                           interventions=(), seed=0))


def run_key(plan: Plan, model_identity: str) -> str:
    """The run cache key of `plan` on the model `model_identity`; reads the prompts file, if any."""
    parts = [ENGINE_VERSION, trace_plan_text(plan), model_identity]
    if isinstance(plan.prompts, FilePrompts):  # the plan names the file; its content makes the prompts
        parts.append(hashlib.sha256(Path(plan.prompts.path).read_bytes()).hexdigest())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _runs() -> Path:
    return cache_root() / "runs"


def load_run(key: str) -> tuple[Trace, dict[str, Any]] | None:
    """The cached trace and extras of `key`, or None (not cached, or unreadable: written by another format)."""
    directory = _runs() / key
    try:
        trace = read_trace_json(directory / "trace.json")
        extras = json.loads((directory / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return trace, extras


def store_run(key: str, trace: Trace, extras: dict[str, Any]) -> Path:
    """Cache `trace` (as trace.json, without timings) and the JSON-ready `extras` under `key`."""
    runs = _runs()
    runs.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=runs))
    try:
        write_trace_json(trace, build / "trace.json")
        atomic_write(build / "run.json", dumps(extras))
        _publish(build, runs / key)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when published
    return runs / key


def _publish(build: Path, target: Path) -> None:
    """Move directory `build` to `target` in one step, replacing an entry there (stale: it was not loaded)."""
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=".old-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, aside / "old")
        shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(OSError):  # a process running the same plan published first: its entry is as good
        os.replace(build, target)


def cached_run(plan: Plan, *, device: str | None = None, progress: Callable[[str, int, int], None] | None = None,
               use_cache: bool = True) -> tuple[RunResult, str | None]:
    """`run_plan` through the caches. Returns (RunResult, the run key reused, or None if it was computed).

    With `use_cache` False (`--no-cache`) no cache is read or written. A run whose model cannot be
    identified (a hub model not yet downloaded) is computed and not stored.
    """
    from circuitlang.engine.run import RunResult, run_plan  # run imports trace, which imports this module

    if not use_cache:
        return run_plan(plan, device=device, progress=progress), None
    keyed = plan if device is None else dataclasses.replace(plan, model=dataclasses.replace(plan.model, device=device))
    stage = (lambda what: progress(f"model: {what}", 0, 1)) if progress else None
    identity = model_identity(plan.model.name, stage)
    try:
        key = run_key(keyed, identity) if identity else None
    except OSError:  # the prompts file went missing: the run reports it
        key = None
    hit = load_run(key) if key else None
    if hit is not None:
        trace, extras = hit
        roots = tuple(RootChoice(Root(**c["root"]), c["direct_effect"], c["fired"]) for c in extras["auto_roots"])
        return RunResult(plan, trace, roots, tuple(extras["logit_diff"])), key
    with omega_cache():
        result = run_plan(plan, device=device, progress=progress)
    if key:
        extras = {"auto_roots": [dataclasses.asdict(c) for c in result.auto_roots], "logit_diff": list(result.logit_diff),
                  "engine": ENGINE_VERSION, "model": identity, "plan": trace_plan_text(keyed)}
        with contextlib.suppress(OSError):  # a cache that cannot be written costs only the reuse
            store_run(key, result.trace, extras)
    return result, None


def _layer_digest(geometry: AttentionGeometry, layer: int) -> str:
    g = geometry
    h = hashlib.sha256(f"{ENGINE_VERSION}\0{g.rotary}".encode())
    for t in (g.W_Q[layer], g.b_Q[layer], g.W_K[layer], g.b_K[layer], g.q_gain[layer], g.k_gain[layer]):
        t = t.contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def omega_cache() -> Iterator[None]:
    """Let `cached_layer_slices` read and write the Omega cache inside the block (`cached_run` does)."""
    token = _omega_on.set(True)
    try:
        yield
    finally:
        _omega_on.reset(token)


def cached_layer_slices(geometry: AttentionGeometry, layer: int, cos: Tensor | None = None, sin: Tensor | None = None) -> OmegaSlices:
    """`layer_slices` through the Omega cache inside `omega_cache()` (as in `cached_run`); computed otherwise.

    Rotary models: the cores for offsets 0..M-1 depend only on the first M rows of the rotary tables, so
    a file keeps the most offsets computed so far with the tables it used, and a run with shorter prompts
    takes the first M cores when its tables equal those rows (longer prompts recompute and replace it).
    """
    if not _omega_on.get():
        return layer_slices(geometry, layer, cos, sin)
    path = cache_root() / "omega" / f"{_layer_digest(geometry, layer)}.pt"
    offsets = len(cos) if geometry.rotary else 1
    try:
        saved = torch.load(path, weights_only=True)
        tables_match = not geometry.rotary or (
            len(saved["cos"]) >= offsets and torch.equal(saved["cos"][:offsets], cos) and torch.equal(saved["sin"][:offsets], sin))
        if tables_match:
            return OmegaSlices(Q_a=saved["Q_a"], Q_b=saved["Q_b"], **{k: saved[k][:, :offsets] for k in ("U", "S", "V")})
    except (OSError, RuntimeError, KeyError, TypeError):  # not cached yet, or unreadable: recompute
        pass
    slices = layer_slices(geometry, layer, cos, sin)
    with contextlib.suppress(OSError), atomic_path(path) as tmp:
        torch.save({**{f.name: getattr(slices, f.name) for f in dataclasses.fields(slices)}, "cos": cos, "sin": sin}, tmp)
    return slices
