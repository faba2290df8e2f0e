"""Prompts per second on Ray workers against one process: the trace of the embedded model's IOI prompts.

On the embedded model (Gemma 3 270M, already converted), `specs/ioi.circ` without its intervene block
(auto roots, so two passes over the chunks: the roots' evidence, then the trace), N prompts in chunks of
C, Omega cache warm; every measurement in a fresh process, one torch thread per process (the driver's
and each worker's):
  one       `run_plan` in one process.
  ray-1     `run_plan(..., cluster=Cluster(workers=1))`: a local Ray instance, one worker actor.
  ray-2     the same with two worker actors.
"run s" is the run after the model's load and the workers' start (each worker loads the model too);
prompts/s is N over it. "start s" is that load and start. For the projection in docs/scaling.md, `one`
also prints its per-chunk costs (forward pass, roots' evidence, trace, seconds per chunk) and its peak
RSS after the load (one worker holds the same: the model and one chunk). Contenders are interleaved
(the order reversed on odd repeats) and repeated; medians and minimums are printed.

    python bench/scale.py --prompts 128 --chunk 32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from run_speed import REPO, _reset_peak

CONTENDERS = {"one": 0, "ray-1": 1, "ray-2": 2}


def worker(args) -> None:
    """One measurement, printed as a JSON line."""
    import dataclasses
    import logging

    import torch

    torch.set_num_threads(1)
    from circuitlang.cachefiles import use_caches
    from circuitlang.lang import parse_spec
    from circuitlang.lang.plan import IOIPrompts
    from circuitlang.runner.distributed import Cluster
    from circuitlang.runner.execute import resolve_model, run_plan

    plan = parse_spec(str(REPO / "specs" / "ioi.circ"))
    plan = dataclasses.replace(plan, prompts=IOIPrompts(args.n, "mixed", args.seed), interventions=())
    if args.workers:
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    t0 = time.perf_counter()
    with use_caches():  # as `circ run` does: the Omega cache warm
        model = resolve_model(plan.model)
        load_rss = _reset_peak()
        result = run_plan(plan, model=model, chunk=args.chunk, cluster=Cluster(workers=args.workers) if args.workers else None)
    wall = time.perf_counter() - t0
    t = dict(result.trace.timings)
    trace = result.trace
    run = sum(v for k, v in t.items() if k not in ("load", "workers"))
    print(json.dumps({
        "wall": wall, "timings": t, "run": run, "start": wall - run, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_rss": load_rss, "events": len(trace.events), "edge_rows": len(trace.edges),
        "trace_bytes": sum(a.nbytes for table in (trace.events, trace.edges) for f in dataclasses.fields(table)
                           if f.name != "slices" for a in [getattr(table, f.name)]),
    }))


def measure(name: str, n: int, chunk: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(CONTENDERS[name]), "--n", str(n), "--chunk", str(chunk), "--seed", str(seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        sys.exit(f"{name} N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        args.workers = args.worker
        return worker(args)

    seed = 2000 + int(time.time()) % 100000  # prompts no earlier run has seen (the Omega cache depends only on the model)
    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        order = list(CONTENDERS)[:: -1 if repeat % 2 else 1]
        for name in order:
            res = measure(name, args.prompts, args.chunk, seed + repeat)
            results.setdefault(name, []).append(res)
            print(f"repeat {repeat} {name:6s} wall {res['wall']:6.1f} s  start {res['start']:5.1f}  run {res['run']:6.1f}  "
                  f"{args.prompts / res['run']:5.2f} prompts/s  peak RSS after load {res['rss'] / 2**30:5.2f} GB  "
                  + " ".join(f"{k} {v:.1f}" for k, v in res["timings"].items()), flush=True)
    print()
    print(f"N = {args.prompts}, chunks of {args.chunk}")
    print(f"{'run':6s} {'run s (med)':>11} {'run s (min)':>11} {'prompts/s (med)':>15} {'prompts/s (max)':>15} {'x one (med)':>11} {'start s (med)':>13}")
    base = statistics.median(r["run"] for r in results["one"])
    for name, rows in results.items():
        runs = [r["run"] for r in rows]
        print(f"{name:6s} {statistics.median(runs):11.1f} {min(runs):11.1f} {args.prompts / statistics.median(runs):15.2f} "
              f"{args.prompts / min(runs):15.2f} {base / statistics.median(runs):11.2f} {statistics.median(r['start'] for r in rows):13.1f}")
    one = results["one"]
    chunks = -(-args.prompts // args.chunk)
    per = {k: statistics.median(r["timings"].get(k, 0.0) for r in one) / chunks for k in ("forward", "roots", "trace")}
    print(f"one process, per chunk of {args.chunk} (median): forward {per['forward']:.2f} s (two passes: {per['forward'] / 2:.2f} s each), "
          f"roots {per['roots']:.2f} s, trace {per['trace']:.2f} s; peak RSS after the load {max(r['rss'] for r in one) / 2**30:.2f} GB, "
          f"the load's {max(r['load_rss'] or 0 for r in one) / 2**30:.2f} GB; trace {one[0]['events']} events, {one[0]['edge_rows']} edge rows, "
          f"{one[0]['trace_bytes'] / args.prompts / 1024:.1f} KiB a prompt")


if __name__ == "__main__":
    main()
