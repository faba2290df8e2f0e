"""The measurements of docs/tasks.md: each task of specs/tasks/ on its model, as `circ run` runs it.

First, for every spec, the trace on the spec's prompts (256) without the evaluation, written to the spec's output
directory (trace.json with the task metric, the drawing) and reported. Then, for every spec, its `evaluate
faithfulness` on the first N prompts of the same task (default 16) with R random rankings (default 2) and without
TransformerLens's per-prompt attribution patching (our batched gradient x difference, which the tests hold equal to
it, ranks the heads): the full evaluation of 256 prompts of seven tasks does not fit a shared 2-core machine. Written
beside the trace in faithfulness/. Usage: python bench/tasks.py [--faithfulness N] [--random R] [SPEC ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import time
from pathlib import Path

from rich.console import Console

from circuitlang.cli import _report, _write_outputs
from circuitlang.engine.evaluate import counterfactual_prompts, evaluate_faithfulness, traced_heads
from circuitlang.lang import parse_spec
from circuitlang.lang.plan import Output
from circuitlang.runner.execute import build_prompts, cached_run, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="*")
    parser.add_argument("--faithfulness", type=int, default=16, help="prompts of the faithfulness run (0: none)")
    parser.add_argument("--random", type=int, default=2, help="random rankings of the faithfulness run")
    parser.add_argument("--skip-traces", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print docs/tasks.md's tables from the written outputs")
    args = parser.parse_args()
    console = Console(width=160)
    specs = args.specs or sorted(glob.glob("specs/tasks/*.circ"))
    if args.markdown:
        return markdown(specs)
    for path in [] if args.skip_traces else specs:
        plan = dataclasses.replace(parse_spec(path), evaluate=None)
        t = time.perf_counter()
        result, _ = cached_run(plan)
        console.rule(f"{path}: trace {time.perf_counter() - t:.0f} s")
        console.print(f"metric: {result.metric}")
        _write_outputs(plan, result)
        _report(plan, result, console)
    if not args.faithfulness:
        return
    model = None
    for path in specs:
        plan = parse_spec(path)
        small = dataclasses.replace(
            plan, prompts=dataclasses.replace(plan.prompts, n=args.faithfulness), evaluate=None,
            show_min_count=max(1, plan.show_min_count * args.faithfulness // plan.prompts.n),
            output=Output(str(Path(plan.output.directory) / "faithfulness"), ("json", "png")))
        t = time.perf_counter()
        result, _ = cached_run(small)
        model = model or resolve_model(plan.model)
        prompts = counterfactual_prompts(build_prompts(small, model), model.tokenizer, "counterfactual")
        found = evaluate_faithfulness(model, prompts, result.trace, against="counterfactual", random_draws=args.random,
                                      seed=plan.seed, references={"trace": traced_heads(result.trace, small.show_min_count)},
                                      use_tl=False)
        result = dataclasses.replace(result, faithfulness=found)
        console.rule(f"{path}: faithfulness on {args.faithfulness} prompts, {time.perf_counter() - t:.0f} s")
        console.print(f"metric: {result.metric}")
        _write_outputs(small, result)
        from circuitlang.report.faithfulness import render_faithfulness

        render_faithfulness(found, console)


def markdown(specs: list[str]) -> None:
    """docs/tasks.md's rows, read back from each spec's trace.json and faithfulness/faithfulness.json."""
    import json

    from circuitlang.engine.evaluate import FaithfulnessResults

    print("| task | metric | mean F | F > 0 | roots (trace from auto 3) |\n|---|---|---|---|---|")
    for path in specs:
        out = Path(parse_spec(path).output.directory)
        if not (out / "trace.json").exists():
            continue
        data = json.loads((out / "trace.json").read_text())
        m = data["metric"]
        print(f"| {Path(path).stem} | {m['kind']} | {m['mean']:.3f} | {m['positive_fraction']:.2f} | "
              f"{', '.join(data['config']['roots'])} |")
    for path in specs:
        found = Path(parse_spec(path).output.directory) / "faithfulness" / "faithfulness.json"
        if not found.exists():
            continue
        data = json.loads(found.read_text())
        r = FaithfulnessResults.from_dict({k: v for k, v in data.items() if k != "format"})
        print(f"\n{Path(path).stem}: m(M) = {r.m_full:.3f}, m(empty) = {r.m_empty:.3f}, counterfactual {r.m_counterfactual:.3f}, "
              f"{r.n_prompts} prompts\n\n| ranking | CPR | CMD | f at 5 | f at 10 | f at 20 |\n|---|---|---|---|---|---|")
        for c in r.methods:
            def pm(x, sd):
                return f"{x:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")
            cells = [pm(float(c.f[r.sizes.index(k)]), None if c.f_std is None else float(c.f_std[r.sizes.index(k)]))
                     for k in (5, 10, 20)]
            print(f"| {c.method} | {pm(c.cpr, c.cpr_std)} | {pm(c.cmd, c.cmd_std)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
