"""How far does a run go in prompt length? `specs/induction.circ` at 128 to 2,048 tokens a prompt.

On the embedded model (Gemma 3 270M, already converted), for each length n, a few induction prompts
(circuitlang/data/induction.py, seed 0), every measurement in a fresh process:
  forward   the model's forward pass over the prompts up to the final norm (`run_to_final_norm`, one
            batch; the full-vocabulary logits of 2,048 positions alone would be 2 GB a prompt): the unit.
  run       the spec (trace from 5.1 end->next, interventions `edges into root 1 at end`) in a cache root
            of its own (the converted model linked in): no run cache to hit, and an Omega cache that starts
            empty (every core it needs is computed: the cold case); phases forward, trace, graph,
            interventions; the Omega cache it wrote.
Contenders are interleaved (the forward pass last on odd repeats); "run GB" is the peak RSS after the
model's load (reset at the load, Linux), "x fwd" the run (load excluded) over the forward pass, medians.

    python bench/long_prompts.py --tokens 128 512 1024 2048 --prompts 2 --repeats 1 --threads 1
    python bench/long_prompts.py --write-spec     # specs/induction/induction-2048.jsonl, the spec's prompts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from run_speed import _reset_peak  # noqa: E402

PHASES = ("forward", "trace", "graph", "interventions")
HEADER = ("Induction prompts for specs/induction.circ, written by bench/long_prompts.py --write-spec:\n"
          "{count} prompts of {n} tokens (BOS included), seed {seed}; roles match, next, end.")


def prompt_file(model, n: int, count: int, seed: int, path: Path) -> Path:
    from circuitlang.data.induction import induction_records, write_records

    write_records(induction_records(model.tokenizer, n, count, seed), path, HEADER.format(count=count, n=n, seed=seed))
    return path


def worker(args) -> None:
    """One measurement, printed as a JSON line."""
    import dataclasses

    import torch

    from circuitlang.cachefiles import use_caches
    from circuitlang.lang import parse_spec
    from circuitlang.lang.plan import FilePrompts
    from circuitlang.runner import execute

    torch.set_num_threads(args.threads)
    plan = parse_spec(REPO / "specs" / "induction.circ")
    with use_caches():
        model = execute.resolve_model(plan.model)
    _reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        path = prompt_file(model, args.n, args.count, args.seed, Path(tmp) / "prompts.jsonl")
        plan = dataclasses.replace(plan, prompts=FilePrompts(str(path)))
        if args.what == "forward":
            from circuitlang.engine.forward import batch_tokens, run_to_final_norm

            tokens, _ = batch_tokens(execute.build_prompts(plan, model), model.tokenizer.pad_token_id or 0)
            t0 = time.perf_counter()
            run_to_final_norm(model, tokens)
            phases = {"forward": time.perf_counter() - t0}
        else:
            execute.resolve_model = lambda spec, device=None, progress=None: model
            result, _ = execute.cached_run(plan)  # a cache root of its own: no run cache to hit, Omega's starts empty
            phases = dict(result.trace.timings)
            phases["events"], phases["edges"] = len(result.trace.events), len(result.trace.edges)
    peak = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({"phases": phases, "rss": peak}))


def measure(what: str, n: int, args, cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, "--n", str(n), "--count", str(args.prompts), "--seed", str(args.seed),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CIRCUITLANG_CACHE": str(cache)}, cwd=REPO)
    if out.returncode:
        sys.exit(f"{what} n={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--prompts", type=int, default=2, help="prompts per length")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-spec", action="store_true", help="write the spec's prompt file and stop")
    ap.add_argument("--worker", choices=("forward", "run"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.what = args.worker
        return worker(args)

    from circuitlang.cachefiles import cache_root, use_caches

    if args.write_spec:
        from circuitlang.models.embedded import resolve_embedded
        from circuitlang.models.model import load_model

        with use_caches():  # the spec's model; its prompt file is what is being written
            model = load_model(resolve_embedded("gemma-3-270m"))
        print(prompt_file(model, 2048, 2, 0, REPO / "specs" / "induction" / "induction-2048.jsonl"))
        return
    models = cache_root() / "models"  # the converted model and its processed weights, shared; Omega per run
    results: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for n in args.tokens:
            with tempfile.TemporaryDirectory(prefix="long-prompts-") as tmp:
                cache = Path(tmp)
                (cache / "models").symlink_to(models)
                contenders = ["forward", "run"] if repeat % 2 == 0 else ["run", "forward"]
                for what in contenders:
                    res = measure(what, n, args, cache)
                    if what == "run":
                        res["omega"] = _size(cache / "omega") if (cache / "omega").exists() else 0
                    results.setdefault((what, n), []).append(res)
                    print(f"repeat {repeat} n={n} {what:7s} run GB {res['rss'] / 2**30:5.2f} "
                          + " ".join(f"{k} {v:.1f}" for k, v in res["phases"].items())
                          + (f" omega GB {res['omega'] / 2**30:.2f}" if what == "run" else ""), flush=True)
    print()
    print(f"{'n':>5} {'fwd s':>7} {'run s':>7} {'x fwd':>6} {'run GB':>6} {'omega GB':>8} {'events':>6}  phases (median s)")
    for n in args.tokens:
        fwd = statistics.median(r["phases"]["forward"] for r in results[("forward", n)])
        runs = results[("run", n)]
        work = statistics.median(sum(r["phases"].get(k, 0.0) for k in PHASES) for r in runs)
        phases = {k: statistics.median(r["phases"].get(k, 0.0) for r in runs) for k in PHASES}
        print(f"{n:5d} {fwd:7.1f} {work:7.1f} {work / fwd:6.2f} {max(r['rss'] for r in runs) / 2**30:6.2f} "
              f"{max(r['omega'] for r in runs) / 2**30:8.2f} {int(statistics.median(r['phases']['events'] for r in runs)):6d}  "
              + " ".join(f"{k} {v:.1f}" for k, v in phases.items()))


if __name__ == "__main__":
    main()
