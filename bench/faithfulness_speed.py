"""How fast is `evaluate faithfulness`? The evaluation against one plain forward pass of the same prompts.

In one process, on the embedded model (Gemma 3 270M, already converted): the spec's trace is run once
(untimed; the run's clean F comes with it, as in `circ run`), then, interleaved and repeated:
  forward   the model's plain forward pass over the N prompts (`bridge(tokens)`, full logits, batches of
            64): the unit, as in bench/run_speed.py.
  default   the statement proposed for the default spec (DEFAULT below: the influence ranking's top 5, 10
            and 20 heads against the ABC run, no random draws) on those prompts.
  full      the `evaluate` statement of specs/ioi-faithfulness.circ (every ranking, MIB's grid plus every
            size up to 20 heads, 5 random rankings; `--skip full` leaves it out, it takes minutes).
Each evaluation is the whole of it: the counterfactual capture (and the clean one where a ranking needs
it), the rankings and one patched pass per circuit size. Medians and minimums are printed, with the
ratios to the forward pass side by side, and the evaluation's own phases.

    python bench/faithfulness_speed.py --prompts 64 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What specs/ioi.circ would say if its evaluation fits the run-speed promises (issue 21); it has none yet.
DEFAULT = "evaluate faithfulness against abc sizes 5, 10, 20 rank influence random 0"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--skip", nargs="*", default=[], help="contenders to leave out (forward default full)")
    args = ap.parse_args(argv)

    import torch

    from circuitlang.cachefiles import use_caches
    from circuitlang.engine.evaluate import evaluate_plan
    from circuitlang.engine.forward import batch_tokens
    from circuitlang.lang import parse_spec
    from circuitlang.lang.compiler import parse_text
    from circuitlang.lang.plan import IOIPrompts
    from circuitlang.runner.execute import build_prompts, resolve_model, run_plan

    torch.set_num_threads(args.threads)
    default = parse_text(f'extends "{REPO / "specs" / "ioi.circ"}"\n{DEFAULT}\n', "<bench>")
    full = parse_spec(REPO / "specs" / "ioi-faithfulness.circ")
    plan = dataclasses.replace(default, prompts=IOIPrompts(args.prompts, "mixed", 0), interventions=(), evaluate=None)
    with use_caches():
        model = resolve_model(plan.model)
    run = run_plan(plan, model=model)
    prompts = build_prompts(plan, model)
    tokens, _ = batch_tokens(prompts, model.tokenizer.pad_token_id or 0)
    print(f"{model.name}: {len(prompts)} prompts, {tokens.shape[1]} positions; trace {sum(run.trace.timings.values()):.1f} s "
          f"(untimed); default: evaluate {default.evaluate}; full: evaluate {full.evaluate}", flush=True)

    def forward() -> tuple[float, dict]:
        t = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(tokens), 64):
                model.bridge(tokens[start : start + 64])
        return time.perf_counter() - t, {}

    def evaluation(spec):
        def go() -> tuple[float, dict]:
            t = time.perf_counter()
            res = evaluate_plan(dataclasses.replace(plan, evaluate=spec.evaluate), model, prompts, run.trace,
                                logit_diff=run.logit_diff)
            return time.perf_counter() - t, res.timings
        return go

    contenders = [("forward", forward), ("default", evaluation(default)), ("full", evaluation(full))]
    contenders = [c for c in contenders if c[0] not in args.skip]
    results: dict[str, list[tuple[float, dict]]] = {}
    for repeat in range(args.repeats):
        order = contenders if repeat % 2 == 0 else contenders[1:] + contenders[:1]  # the forward pass last on odd rounds
        for name, go in order:
            seconds, phases = go()
            results.setdefault(name, []).append((seconds, phases))
            print(f"repeat {repeat} {name:8s} {seconds:7.1f} s  " + " ".join(f"{k} {v:.1f}" for k, v in phases.items()), flush=True)
    print()
    fwd = [s for s, _ in results.get("forward", [])] or [float("nan")]
    print(f"{'run':8s} {'median s':>9} {'min s':>7} {'x fwd (med)':>11} {'x fwd (min)':>11}  phases (median s)")
    for name, rows in results.items():
        work = [s for s, _ in rows]
        keys = dict.fromkeys(k for _, p in rows for k in p)
        phases = " ".join(f"{k} {statistics.median(p.get(k, 0.0) for _, p in rows):.1f}" for k in keys)
        print(f"{name:8s} {statistics.median(work):9.1f} {min(work):7.1f} {statistics.median(work) / statistics.median(fwd):11.2f} "
              f"{min(work) / min(fwd):11.2f}  {phases}")


if __name__ == "__main__":
    main()
