"""Run a compiled Plan: load the model, build the prompts, choose the roots, trace. The CLI's engine call."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from circuitlang.data.ioi import ioi_prompts
from circuitlang.data.prompts import PromptSet, load_prompt_file
from circuitlang.engine.forward import Activations, capture
from circuitlang.engine.geometry import AttentionGeometry, attention_geometry
from circuitlang.engine.intervene import InterventionResults, run_interventions
from circuitlang.engine.model import LoadedModel, load_model
from circuitlang.engine.roots import RootChoice, auto_roots, direct_effects, last_token_writes
from circuitlang.engine.trace import trace
from circuitlang.engine.results import Trace
from circuitlang.lang.compiler import check_against_model
from circuitlang.lang.plan import AutoRoots, FilePrompts, ModelSpec, Plan, Root

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RunResult:
    """A traced plan: the trace, the roots chosen automatically (if any), and F(X) over the prompts."""

    plan: Plan
    trace: Trace
    auto_roots: tuple[RootChoice, ...] = ()
    logit_diff: tuple[float, ...] = ()
    interventions: InterventionResults | None = None

    @property
    def roots(self) -> list[Root]:
        """The roots traced, strongest first for `trace from auto`."""
        return [c.root for c in self.auto_roots] if isinstance(self.plan.roots, AutoRoots) else list(self.plan.roots)


def resolve_model(spec: ModelSpec, device: str | None = None, progress: Progress | None = None) -> LoadedModel:
    """Built-in aliases (the embedded model) first, then a hub name or local directory."""
    from circuitlang.engine.embedded import resolve_embedded

    stage = (lambda what: progress(f"model: {what}", 0, 1)) if progress else None
    path = resolve_embedded(spec.name, progress=stage) or spec.name
    model = load_model(path, device or spec.device, spec.dtype)
    return dataclasses.replace(model, name=spec.name)


def build_prompts(plan: Plan, model: LoadedModel) -> PromptSet:
    if isinstance(plan.prompts, FilePrompts):
        return load_prompt_file(plan.prompts.path, model.tokenizer, prepend_bos=model.prepend_bos)
    p = plan.prompts
    return ioi_prompts(model.tokenizer, p.n, p.kind, p.seed, prepend_bos=model.prepend_bos)


def run_plan(plan: Plan, *, model: LoadedModel | None = None, device: str | None = None, progress: Progress | None = None) -> RunResult:
    """Everything `circ run` computes, in order: model, prompts, forward pass, roots, trace."""
    t0 = time.perf_counter()
    if model is None:
        model = resolve_model(plan.model, device, progress)
    check_against_model(plan, model.n_layers, model.n_heads)
    load_time = time.perf_counter() - t0
    prompts = build_prompts(plan, model)

    t0 = time.perf_counter()
    tick = (lambda done, total: progress("forward", done, total)) if progress else None
    acts = capture(model, prompts, progress=tick)
    forward_time = time.perf_counter() - t0

    chosen: tuple[RootChoice, ...] = ()
    t0 = time.perf_counter()
    geometry = attention_geometry(model)
    if isinstance(plan.roots, AutoRoots):
        chosen = choose_roots(model, acts, prompts, plan.roots.k, plan.threshold, geometry)
        roots = [c.root for c in chosen]
    else:
        roots = list(plan.roots)
    roots_time = time.perf_counter() - t0

    result = trace(model, prompts, roots, plan.threshold, plan.mass, plan.slices, activations=acts, geometry=geometry,
                   progress=progress)
    timings = {"load": load_time, "forward": forward_time, "roots": roots_time, **{k: v for k, v in result.timings.items() if k != "forward"}}
    diffs = tuple(acts.logit_diff.tolist()) if acts.logit_diff is not None else ()
    run = RunResult(plan=plan, trace=result, auto_roots=chosen, logit_diff=diffs)
    if plan.interventions:
        t0 = time.perf_counter()
        run = run_plan_interventions(plan, run, model=model, prompts=prompts, acts=acts, progress=progress)
        timings["interventions"] = time.perf_counter() - t0
    return dataclasses.replace(run, trace=dataclasses.replace(result, timings=timings))


def run_plan_interventions(plan: Plan, run: RunResult, *, model: LoadedModel | None = None, prompts: PromptSet | None = None,
                           acts: Activations | None = None, device: str | None = None, progress: Progress | None = None) -> RunResult:
    """The plan's intervene blocks (section 5.4) on a traced result, e.g. one reused from the run cache."""
    if not plan.interventions:
        return run
    if model is None:
        model = resolve_model(plan.model, device, progress)
    if prompts is None:
        prompts = build_prompts(plan, model)
    results = run_interventions(model, prompts, run.trace, plan.interventions, run.roots, plan.seed, acts=acts, progress=progress)
    return dataclasses.replace(run, interventions=results)


def choose_roots(model: LoadedModel, acts: Activations, prompts: PromptSet, k: int, threshold: float,
                 geometry: AttentionGeometry | None = None) -> tuple[RootChoice, ...]:
    """`trace from auto k` (see circuitlang.engine.roots)."""
    from circuitlang.engine.roots import RootError

    if any(p.target is None or p.distractor is None for p in prompts):
        raise RootError("`trace from auto` needs prompts with a target and a distractor answer")
    W_O = (geometry or attention_geometry(model)).W_O
    W_U = model.bridge.W_U.detach().to("cpu", torch.float32)
    targets = torch.tensor([p.target for p in prompts])
    distractors = torch.tensor([p.distractor for p in prompts])
    effects = direct_effects(acts, last_token_writes(acts, W_O), W_U, targets, distractors)
    return auto_roots(acts, effects, prompts, k, threshold)
