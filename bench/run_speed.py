"""How fast is a whole `circ run`? Each phase of a run against one plain forward pass of the same prompts.

On the embedded model (Gemma 3 270M, already converted), for each N, every measurement in a fresh
process; peak RSS is read twice, for the model's load and for the run after it (Linux):
  forward   the model's plain forward pass over the N prompts (`bridge(tokens)`, full logits, batches of
            64): the unit every ratio is in.
  edited    `circ run specs/ioi.circ` with a prompt seed no cache has seen: Omega and processed-weights
            caches warm, run cache cold (the researcher who edited the spec); phases load, forward, roots,
            trace, graph, interventions, faithfulness (its `evaluate` statement).
  no-cache  the same with --no-cache (Omega slices and the model's weight processing recomputed too).
  again     the unchanged spec a second time: trace and interventions from the run cache.
  validate  `specs/ioi-validate.circ` (4 sets, 26 variants) with the same new seed, run cache cold.
Contenders are interleaved and repeated; medians and minimums are printed, with the ratios of the run
(load excluded) to the forward pass; "peak GB" is the whole process's peak, the larger of the two.

    python bench/run_speed.py --prompts 64 256 --repeats 2 --threads 1
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("load", "forward", "roots", "trace", "graph", "interventions", "faithfulness")


def worker(args) -> None:
    """One measurement, printed as a JSON line: seconds per phase, wall time, peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.what == "forward":
        from circuitlang.data.ioi import ioi_prompts
        from circuitlang.models.embedded import resolve_embedded
        from circuitlang.engine.forward import batch_tokens
        from circuitlang.models.model import load_model

        model = load_model(resolve_embedded("gemma-3-270m"))
        load = time.perf_counter() - t0
        load_rss = _reset_peak()
        prompts = ioi_prompts(model.tokenizer, args.n, "mixed", args.seed, prepend_bos=model.prepend_bos)
        tokens, _ = batch_tokens(prompts, model.tokenizer.pad_token_id or 0)
        t1 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(tokens), 64):
                model.bridge(tokens[start : start + 64])
        phases = {"load": load, "forward": time.perf_counter() - t1}
    else:
        import contextlib
        import dataclasses

        from circuitlang.cachefiles import use_caches
        from circuitlang.lang import parse_spec
        from circuitlang.lang.plan import IOIPrompts
        from circuitlang.runner.execute import cached_run

        from circuitlang.runner import execute

        plan = parse_spec(args.spec)
        plan = dataclasses.replace(plan, prompts=IOIPrompts(args.n, "mixed", args.seed))
        load, load_rss = 0.0, None
        if args.preload:  # load first, so that the run's own peak memory can be read apart from the load's
            with contextlib.nullcontext() if args.no_cache else use_caches():  # as cached_run loads it
                model = execute.resolve_model(plan.model)
            load = time.perf_counter() - t0
            execute.resolve_model = lambda spec, device=None, progress=None: model
            load_rss = _reset_peak()
        result, _ = cached_run(plan, use_cache=not args.no_cache)
        phases = dict(result.trace.timings) | ({"load": load} if args.preload else {})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # since the reset, where there was one
    print(json.dumps({"phases": phases, "wall": time.perf_counter() - t0, "rss": peak, "load_rss": load_rss}))


def _reset_peak() -> int | None:
    """Linux: the peak RSS so far (the load's), then start the peak (VmHWM, ru_maxrss) afresh from the current RSS."""
    before = _peak()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return before


def _peak() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def measure(what: str, n: int, seed: int, threads: int, cache: str, spec: str | None = None, no_cache: bool = False,
            preload: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, "--n", str(n), "--seed", str(seed), "--threads", str(threads)]
    if preload:
        cmd.append("--preload")
    if spec:
        cmd += ["--spec", spec]
    if no_cache:
        cmd.append("--no-cache")
    env = {**os.environ, "CIRCUITLANG_CACHE": cache}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode:
        sys.exit(f"{what} N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--cache", default=None, help="cache root holding the converted model (default: the user cache)")
    ap.add_argument("--skip", nargs="*", default=[], help="contenders to leave out (forward edited no-cache again validate)")
    ap.add_argument("--worker", choices=("forward", "run"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preload", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.what = args.worker
        return worker(args)

    from circuitlang.cachefiles import cache_root

    cache = args.cache or str(cache_root())
    spec, validate = str(REPO / "specs" / "ioi.circ"), str(REPO / "specs" / "ioi-validate.circ")
    results: dict[tuple[str, int], list[dict]] = {}
    seed = 1000 + int(time.time()) % 100000  # prompt seeds no earlier run has cached
    for repeat in range(args.repeats):
        for n in args.prompts:
            seed += 1
            contenders = [("forward", lambda: measure("forward", n, seed, args.threads, cache))]
            contenders += [("edited", lambda: measure("run", n, seed, args.threads, cache, spec)),
                           ("again", lambda: measure("run", n, seed, args.threads, cache, spec, preload=False)),
                           ("no-cache", lambda: measure("run", n, seed, args.threads, cache, spec, no_cache=True)),
                           ("validate", lambda: measure("run", n, seed + 500, args.threads, cache, validate))]
            if repeat % 2:  # interleave: the forward pass last on odd repeats ("again" must follow "edited")
                contenders = contenders[1:] + contenders[:1]
            for name, run in contenders:
                if name in args.skip:
                    continue
                res = run()
                results.setdefault((name, n), []).append(res)
                load_rss = f"{res['load_rss'] / 2**30:5.2f}" if res.get("load_rss") else "  n/a"
                print(f"repeat {repeat} N={n} {name:9s} wall {res['wall']:7.1f} s  peak RSS: load {load_rss} GB, after it {res['rss'] / 2**30:5.2f} GB  "
                      + " ".join(f"{k} {v:.1f}" for k, v in res["phases"].items()), flush=True)
    print()
    print(f"{'N':>5} {'run':9s} {'median s':>9} {'min s':>7} {'x fwd (med)':>11} {'x fwd (min)':>11} {'load GB':>7} {'run GB':>6} {'peak GB':>7}  phases (median s)")
    for n in args.prompts:
        fwd = [r["phases"]["forward"] for r in results.get(("forward", n), [])] or [float("nan")]
        for name in ("forward", "edited", "no-cache", "again", "validate"):
            rows = results.get((name, n))
            if not rows:
                continue
            if name == "again":
                work = [r["wall"] for r in rows]  # process start, model identity, cache reads: everything
            elif name == "forward":
                work = fwd
            else:
                work = [sum(v for k, v in r["phases"].items() if k != "load") for r in rows]
            phases = {k: statistics.median(r["phases"].get(k, 0.0) for r in rows) for k in PHASES}
            print(f"{n:5d} {name:9s} {statistics.median(work):9.1f} {min(work):7.1f} {statistics.median(work) / statistics.median(fwd):11.2f} "
                  f"{min(work) / min(fwd):11.2f} {max(r.get('load_rss') or 0 for r in rows) / 2**30:7.2f} "
                  f"{max(r['rss'] for r in rows) / 2**30:6.2f} {max(max(r['rss'], r.get('load_rss') or 0) for r in rows) / 2**30:7.2f}  "
                  + " ".join(f"{k} {v:.1f}" for k, v in phases.items() if v))


if __name__ == "__main__":
    main()
