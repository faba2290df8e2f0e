"""Run a compiled Plan: model, prompts, roots, the trace chunk by chunk, the interventions, through the caches.

This is the orchestration above the engine and the report: the engine's functions are pure (a chunk of
prompts in, its share of the trace out), and this module decides the chunks, merges them, and reads
and writes the run cache. With more than one chunk, `trace from auto` first reads its evidence from
every chunk (a pass that keeps only what the choice needs), then traces them. The chunks run in this
process (`LocalChunks`) or on Ray workers (circuitlang.runner.distributed); both do a chunk's work through
the same `ChunkWork` methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from circuitlang.data.ioi import ioi_prompts
from circuitlang.data.prompts import PromptSet, load_prompt_file
from circuitlang.data.tasks import task_prompts
from circuitlang.engine import intervene as iv
from circuitlang.engine.evaluate import FaithfulnessResults, evaluate_plan
from circuitlang.engine.forward import Activations, answer_ids, capture
from circuitlang.engine.omega_cache import omega_scratch
from circuitlang.models.geometry import AttentionGeometry, attention_geometry
from circuitlang.engine.intervene import InterventionResults
from circuitlang.models.model import LoadedModel, load_model
from circuitlang.cachefiles import storing, use_caches
from circuitlang.engine.results import Trace
from circuitlang.engine.roots import RootChoice, RootError, RootEvidence, RootSkip, auto_roots, direct_effects, last_token_writes, root_evidence
from circuitlang.engine.trace import build_trace
from circuitlang.lang.compiler import check_against_model
from circuitlang.lang.plan import AutoRoots, FilePrompts, ModelSpec, Plan, Root, TaskPrompts
from circuitlang.runner import cache as rc
from circuitlang.runner.chunks import FORWARD_BATCH, ChunkTrace, chunk_bounds, chunk_size, merge_chunks, trace_chunk

if TYPE_CHECKING:
    from circuitlang.runner.distributed import Cluster

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RunResult:
    """A traced plan: the trace, the roots chosen automatically (and those passed over), F(X) per prompt,
    the interventions, and which parts came from the run cache ("trace", "interventions")."""

    plan: Plan
    trace: Trace
    auto_roots: tuple[RootChoice, ...] = ()
    logit_diff: tuple[float, ...] = ()
    interventions: InterventionResults | None = None
    skipped_roots: tuple[RootSkip, ...] = ()
    reused: tuple[str, ...] = ()
    faithfulness: FaithfulnessResults | None = None  # `evaluate faithfulness`

    @property
    def metric(self) -> dict | None:
        """The task metric on the clean prompts, as trace.json records it (None when the prompts have no answers)."""
        if not self.logit_diff:
            return None
        f = np.array(self.logit_diff, dtype=np.float64)
        task = self.plan.prompts.task if isinstance(self.plan.prompts, TaskPrompts) else None
        return {"kind": f"{task.metric if task else 'logit'} difference", "mean": float(f.mean()),
                "positive_fraction": float((f > 0).mean()), "prompts": len(f)}

    @property
    def roots(self) -> list[Root]:
        """The roots traced, strongest first for `trace from auto`."""
        return [c.root for c in self.auto_roots] if isinstance(self.plan.roots, AutoRoots) else list(self.plan.roots)


def resolve_model(spec: ModelSpec, device: str | None = None, progress: Progress | None = None) -> LoadedModel:
    """Built-in aliases (the embedded model) first, then a hub name or local directory."""
    from circuitlang.models.embedded import resolve_embedded

    stage = (lambda what: progress(f"model: {what}", 0, 1)) if progress else None
    path = resolve_embedded(spec.name, progress=stage) or spec.name
    model = load_model(path, device or spec.device, spec.dtype)
    return dataclasses.replace(model, name=spec.name)


def build_prompts(plan: Plan, model: LoadedModel) -> PromptSet:
    if isinstance(plan.prompts, FilePrompts):
        return load_prompt_file(plan.prompts.path, model.tokenizer, prepend_bos=model.prepend_bos)
    p = plan.prompts
    if isinstance(p, TaskPrompts):
        return task_prompts(p.task, model.tokenizer, p.n, p.seed, prepend_bos=model.prepend_bos)
    return ioi_prompts(model.tokenizer, p.n, p.kind, p.seed, prepend_bos=model.prepend_bos, labels=plan.readings.labels)


def evidence_of(model: LoadedModel, acts: Activations, prompts: PromptSet, threshold: float, geometry: AttentionGeometry) -> RootEvidence:
    """What `trace from auto` reads from these prompts' activations (see circuitlang.engine.roots)."""
    answers = answer_ids(prompts)
    if answers is None:
        raise RootError("`trace from auto` needs prompts with a target and a distractor answer")
    W_U = model.bridge.W_U.detach().to("cpu", torch.float32)
    rows, last = torch.arange(len(prompts)), acts.lengths - 1
    post = acts.post_scale[:, rows, last].T if acts.post_scale is not None else None
    writes = last_token_writes(acts.z[rows, last], geometry.W_O, post)
    effects = direct_effects(writes, W_U, answers, acts.final_scale[rows, last])
    return root_evidence(acts, effects, prompts, threshold)


def choose_roots(model: LoadedModel, acts: Activations, prompts: PromptSet, k: int, threshold: float,
                 geometry: AttentionGeometry | None = None) -> tuple[RootChoice, ...]:
    """`trace from auto k` on activations of every prompt (the Python API's one-chunk case)."""
    return auto_roots(evidence_of(model, acts, prompts, threshold, geometry or attention_geometry(model)), k)[0]


@dataclass(frozen=True)
class InterventionJob:
    """What every chunk of the interventions reads: the sets resolved against the trace, F(X) per prompt, the
    answers, and the layers where the sets' partial passes start."""

    plans: tuple[iv.SetPlan, ...]
    f_base: np.ndarray
    answers: torch.Tensor | None  # [P, 2, K] (forward.answer_ids)
    starts: tuple[int, ...]
    metric: str = "logit"  # how F compares the answers (PromptSet.metric)


@dataclass(frozen=True)
class ChunkWork:
    """What every chunk of a run reads, and the work of one chunk: one process (`LocalChunks`) and each Ray
    worker (circuitlang.runner.distributed) call these same methods, so both give the same trace."""

    plan: Plan
    model: LoadedModel
    prompts: PromptSet
    geometry: AttentionGeometry
    length: int  # every chunk is padded to the longest prompt of the set, as one unchunked pass would be

    @classmethod
    def of(cls, plan: Plan, model: LoadedModel) -> ChunkWork:
        prompts = build_prompts(plan, model)
        return cls(plan, model, prompts, attention_geometry(model), max(len(p.token_ids) for p in prompts))

    def forward(self, start: int, stop: int, resid_layers: tuple[int, ...] = (), kv: bool = False) -> Activations:
        return capture(self.model, self.prompts[start:stop], batch_size=FORWARD_BATCH, length=self.length, resid_layers=resid_layers,
                       kv=kv, writers="mlp" in self.plan.writers, firing=self.plan.threshold)

    def evidence(self, acts: Activations, start: int, stop: int) -> RootEvidence:
        return evidence_of(self.model, acts, self.prompts[start:stop], self.plan.threshold, self.geometry)

    def trace(self, acts: Activations, start: int, stop: int, roots: Sequence[Root]) -> ChunkTrace:
        return trace_chunk(acts, self.geometry, self.prompts[start:stop], start, roots, self.plan, self.model.n_layers,
                           self.model.n_heads)

    def intervene(self, ids: np.ndarray, job: InterventionJob, acts: Activations | None = None,
                  tick: Callable[[int], None] | None = None) -> dict[str, list]:
        """The intervention rows of the prompts `ids`; acts: theirs, else a pass keeping the residual where the passes start
        and the keys and values they resume after."""
        if acts is None:
            subset = PromptSet(tuple(self.prompts[int(p)] for p in ids), self.prompts.role_names, self.prompts.description,
                               self.prompts.metric)
            acts = capture(self.model, subset, batch_size=FORWARD_BATCH, length=self.length, resid_layers=job.starts, kv=True,
                           firing=self.plan.threshold)
        return iv.intervene_chunk(self.model, self.geometry, acts, ids, job.plans, job.f_base, job.answers,
                                  centre=iv._norm_centres(self.model), tick=tick, metric=job.metric)


class LocalChunks:
    """The chunks one after another in this process. The last chunk's activations stay until the next forward
    pass: with one chunk, the trace and the interventions read the roots' pass instead of repeating it
    (keep: that pass also keeps what the interventions resume from, the residual entering every layer and
    the keys and values)."""

    def __init__(self, work: ChunkWork, progress: Progress | None, timings: dict[str, float], keep: bool = False,
                 forward_passes: int = 1):
        self.work, self.progress, self.timings, self.keep = work, progress, timings, keep
        self.tick_forward = _ticker(progress, "forward", len(work.prompts) * forward_passes)
        self.kept: tuple[tuple[int, int], Activations] | None = None

    def __enter__(self) -> LocalChunks:
        return self

    def __exit__(self, *exc) -> None:
        self.kept = None

    def _acts(self, start: int, stop: int) -> Activations:
        if self.kept is not None and self.kept[0] == (start, stop):
            return self.kept[1]
        self.kept = None  # freed before the next pass: peak memory follows one chunk
        t = time.perf_counter()
        acts = self.work.forward(start, stop, tuple(range(self.work.model.n_layers)) if self.keep else (), kv=self.keep)
        self._time("forward", t)
        self.tick_forward(stop - start)
        self.kept = ((start, stop), acts)
        return acts

    def _time(self, stage: str, t: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t

    def evidence(self, bounds: Sequence[tuple[int, int]]) -> list[RootEvidence]:
        parts = []
        for start, stop in bounds:
            acts = self._acts(start, stop)
            t = time.perf_counter()
            parts.append(self.work.evidence(acts, start, stop))
            self._time("roots", t)
        return parts

    def trace(self, bounds: Sequence[tuple[int, int]], roots: Sequence[Root]) -> list[ChunkTrace]:
        parts = []
        tick = _ticker(self.progress, "trace", len(self.work.prompts))
        for start, stop in bounds:
            acts = self._acts(start, stop)
            t = time.perf_counter()
            parts.append(self.work.trace(acts, start, stop, roots))
            self._time("trace", t)
            tick(stop - start)
        return parts

    def intervene(self, ids: Sequence[np.ndarray], job: InterventionJob, passes: int) -> list[dict[str, list]]:
        tick = _ticker(self.progress, "interventions", passes)
        (bounds, acts), self.kept = self.kept or (None, None), None
        if acts is not None and bounds == (0, len(self.work.prompts)) and self.keep:
            # Only the layers the passes start at stay (the rest would be held through every pass).
            acts = dataclasses.replace(acts, resid={layer: acts.resid[layer] for layer in job.starts} or None)
            return [self.work.intervene(np.arange(len(self.work.prompts)), job, acts, tick)]
        del acts  # the trace's activations go before the interventions' own passes capture theirs
        return [self.work.intervene(chunk, job, tick=tick) for chunk in ids]


def _chunks(work: ChunkWork, cluster: Cluster | None, device: str | None, progress: Progress | None,
            timings: dict[str, float], **local) -> contextlib.AbstractContextManager:
    """Where the chunks run: this process, or the workers of a Ray cluster."""
    if cluster is None:
        return LocalChunks(work, progress, timings, **local)
    from circuitlang.runner.distributed import RayChunks

    return RayChunks(cluster, work.plan, device, progress, timings)


def run_plan(plan: Plan, *, model: LoadedModel | None = None, device: str | None = None, progress: Progress | None = None,
             chunk: int | None = None, cluster: Cluster | None = None) -> RunResult:
    """Everything `circ run` computes, in order: model, prompts, roots, the trace by chunks, interventions.

    chunk: prompts per chunk (default: as many as `chunks.default_budget()` bytes of activations hold).
    cluster: run the chunks on Ray workers (circuitlang.runner.distributed.Cluster); the trace is the same.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if model is None:
        # With a cluster the workers run the passes on `device`; this process only needs the tokenizer and shapes.
        model = resolve_model(plan.model, "cpu" if cluster is not None else device, progress)
    check_against_model(plan, model.n_layers, model.n_heads)
    timings["load"] = time.perf_counter() - t0
    work = ChunkWork.of(plan, model)
    prompts = work.prompts
    size = chunk or chunk_size(model, prompts, writers="mlp" in plan.writers)
    # One chunk holds every prompt: keep its activations, with the residual entering every layer, for the
    # interventions (their partial passes start there), instead of a second forward pass.
    keep = bool(plan.interventions) and size >= len(prompts) and chunk_size(model, prompts, resid_layers=model.n_layers, kv=True) >= len(prompts)
    bounds = chunk_bounds(len(prompts), size)
    auto = isinstance(plan.roots, AutoRoots)
    with _chunks(work, cluster, device, progress, timings, keep=keep,
                 forward_passes=1 + (auto and len(bounds) > 1)) as chunks, omega_scratch():
        chosen: tuple[RootChoice, ...] = ()
        skipped: tuple[RootSkip, ...] = ()
        if auto:
            chosen, skipped = auto_roots(functools.reduce(RootEvidence.merge, chunks.evidence(bounds)), plan.roots.k)
            roots = [c.root for c in chosen]
        else:
            roots = list(plan.roots)
        firing, events, edges, diffs = merge_chunks(chunks.trace(bounds, roots))
        trace = build_trace(model, prompts, roots, plan.threshold, plan.mass, plan.slices, firing, events, edges, {},
                            readings=plan.readings, writers=plan.writers)
        timings["graph"] = trace.timings["graph"]
        result = RunResult(plan=plan, trace=trace, auto_roots=chosen, logit_diff=tuple(diffs.tolist()) if diffs is not None else (),
                           skipped_roots=skipped)
        if plan.interventions:
            t = time.perf_counter()
            result = dataclasses.replace(result, interventions=run_plan_interventions(plan, result, work=work, chunks=chunks,
                                                                                      progress=progress, chunk=chunk))
            timings["interventions"] = time.perf_counter() - t
    if plan.evaluate is not None:
        t = time.perf_counter()
        found = evaluate_plan(plan, model, prompts, trace, progress, result.logit_diff)
        result = dataclasses.replace(result, faithfulness=found)
        timings["faithfulness"] = time.perf_counter() - t
    return dataclasses.replace(result, trace=dataclasses.replace(trace, timings=timings))


def run_plan_interventions(plan: Plan, run: RunResult, *, work: ChunkWork | None = None, chunks=None, device: str | None = None,
                           progress: Progress | None = None, chunk: int | None = None,
                           cluster: Cluster | None = None) -> InterventionResults:
    """The plan's intervene blocks (section 5.4) on a traced run, chunk by chunk over the prompts they touch:
    each chunk's clean pass keeps the residual where the sets' partial passes start. chunks: where run_plan
    ran the trace (`LocalChunks` may still hold every prompt's activations: then no pass is repeated)."""
    t0 = time.perf_counter()
    if work is None:
        work = ChunkWork.of(plan, resolve_model(plan.model, "cpu" if cluster is not None else device, progress))
    model, prompts, geometry = work.model, work.prompts, work.geometry
    plans = iv.plan_sets(run.trace, prompts, plan.interventions, run.roots, plan.seed, geometry.W_Q.shape[-1], geometry.rotary)
    touched = np.unique(np.concatenate([sp.prompts for sp in plans] + [np.zeros(0, dtype=np.int64)])).astype(np.int64)
    f_base = np.array(run.logit_diff, dtype=np.float64) if run.logit_diff else np.full(len(prompts), np.nan)
    answers = answer_ids(prompts) if run.logit_diff else None
    job = InterventionJob(tuple(plans), f_base, answers, tuple(sorted(iv.start_layers(plans))), prompts.metric)
    size = chunk or chunk_size(model, prompts, resid_layers=len(job.starts), kv=True)
    ids = [touched[begin : begin + size] for begin in range(0, len(touched), size)]
    passes = sum(iv.passes_needed(plans, chunk) for chunk in ids)  # a chunk's batches end with it
    with contextlib.nullcontext(chunks) if chunks is not None else _chunks(work, cluster, device, progress, {}) as running:
        columns = running.intervene(ids, job, passes)
    return iv.finish_interventions(model.name, plan.seed, iv._norm_centres(model), False, plans, columns, passes, time.perf_counter() - t0)


def cached_run(plan: Plan, *, device: str | None = None, progress: Progress | None = None, use_cache: bool = True,
               chunk: int | None = None, interventions: bool = True, cluster: Cluster | None = None) -> tuple[RunResult, str | None]:
    """`run_plan` through the caches. Returns (RunResult, the run key reused, or None if it was computed).

    With `use_cache` False (`--no-cache`) no cache is read or written. A run whose model cannot be
    identified (a hub model not yet downloaded) is computed and not stored. A cached trace whose
    intervene blocks are new loads the model for them alone, and stores their results beside the trace.
    interventions=False leaves the intervene blocks and the evaluation out (`circ diff` compares traces only).
    cluster: what is computed runs on Ray (the same trace, so the same cache entries).
    """
    if not interventions:
        plan = dataclasses.replace(plan, interventions=(), evaluate=None)
    if not use_cache:
        return run_plan(plan, device=device, progress=progress, chunk=chunk, cluster=cluster), None
    keyed = plan if device is None else dataclasses.replace(plan, model=dataclasses.replace(plan.model, device=device))
    stage = (lambda what: progress(f"model: {what}", 0, 1)) if progress else None
    identity = rc.model_identity(plan.model.name, stage)
    try:
        key = rc.run_key(keyed, identity) if identity else None
    except OSError:  # the prompts file went missing: the run reports it
        key = None
    ikey, fkey = rc.interventions_key(keyed), rc.faithfulness_key(keyed)
    hit = rc.load_run(key) if key else None
    if hit is not None:
        result = RunResult(plan, hit.trace, hit.auto_roots, hit.logit_diff, skipped_roots=hit.skipped_roots, reused=("trace",))
        if not plan.interventions:
            return _cached_faithfulness(plan, result, key, fkey, device, progress), key
        results = rc.load_interventions(key, ikey)
        if results is not None:
            result = dataclasses.replace(result, interventions=results, reused=("trace", "interventions"))
            return _cached_faithfulness(plan, result, key, fkey, device, progress), key
        with use_caches():
            results = run_plan_interventions(plan, result, device=device, progress=progress, chunk=chunk, cluster=cluster)
        with storing():
            rc.store_interventions(key, ikey, results)
        return _cached_faithfulness(plan, dataclasses.replace(result, interventions=results), key, fkey, device, progress), key
    with use_caches():
        result = run_plan(plan, device=device, progress=progress, chunk=chunk, cluster=cluster)
    if key:
        with storing():
            rc.store_run(key, rc.CachedRun(result.trace, result.auto_roots, result.skipped_roots, result.logit_diff),
                         {"model": identity, "plan": rc.trace_plan_text(keyed)})
            if result.interventions is not None:
                rc.store_interventions(key, ikey, result.interventions)
            if result.faithfulness is not None:
                rc.store_faithfulness(key, fkey, result.faithfulness)
    return result, None


def _cached_faithfulness(plan: Plan, result: RunResult, key: str, fkey: str, device: str | None, progress: Progress | None) -> RunResult:
    """A reused trace with the plan's `evaluate faithfulness` results: from the cache, else computed and stored."""
    if plan.evaluate is None:
        return result
    found = rc.load_faithfulness(key, fkey)
    if found is not None:
        return dataclasses.replace(result, faithfulness=found, reused=(*result.reused, "faithfulness"))
    with use_caches():  # the caches of a cached run: the processed weights load memory-mapped
        model = resolve_model(plan.model, device, progress)
        found = evaluate_plan(plan, model, build_prompts(plan, model), result.trace, progress, result.logit_diff)
    with storing():
        rc.store_faithfulness(key, fkey, found)
    return dataclasses.replace(result, faithfulness=found)


def _ticker(progress: Progress | None, stage: str, total: int) -> Callable[[int], None]:
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress(stage, done[0], total)

    return tick
