"""The measurements of docs/tasks.md: each task of specs/tasks/ on its model, as `circ run` would run it.

For each spec: the trace on the spec's prompts (256) without the evaluation, written to the spec's output directory
(trace.json with the task metric, the drawing), then `evaluate faithfulness` on the first N prompts of the same task
(default 32, `random 3`: the evaluation runs one batched pass per circuit size and TransformerLens's attribution
patching per prompt, too slow for 256 prompts of seven tasks on 2 cores), written beside it in faithfulness/.
Prints one block per task for docs/tasks.md. Usage: python bench/tasks.py [--faithfulness N] [SPEC ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import time
from pathlib import Path

from rich.console import Console

from circuitlang.cli import _report, _write_outputs
from circuitlang.lang import parse_spec
from circuitlang.lang.plan import Evaluation, Output
from circuitlang.runner.execute import cached_run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="*")
    parser.add_argument("--faithfulness", type=int, default=32, help="prompts of the faithfulness run (0: none)")
    args = parser.parse_args()
    console = Console(width=160)
    for path in args.specs or sorted(glob.glob("specs/tasks/*.circ")):
        plan = parse_spec(path)
        traced = dataclasses.replace(plan, evaluate=None)
        t = time.perf_counter()
        result, _ = cached_run(traced)
        console.rule(f"{path}: trace {time.perf_counter() - t:.0f} s")
        console.print(f"prompts: {result.trace.prompts}")
        console.print(f"metric: {result.metric}")
        for c in result.auto_roots:
            console.print(f"root {c.root} direct effect {c.direct_effect:.3f} fired {c.fired} from_end {c.from_end}")
        _write_outputs(traced, result)
        _report(traced, result, console)
        if args.faithfulness and plan.evaluate is not None:
            small = dataclasses.replace(
                plan, prompts=dataclasses.replace(plan.prompts, n=args.faithfulness),
                show_min_count=max(1, plan.show_min_count * args.faithfulness // plan.prompts.n),
                evaluate=dataclasses.replace(plan.evaluate, random=3),
                output=Output(str(Path(plan.output.directory) / "faithfulness"), ("json", "png")))
            t = time.perf_counter()
            result, _ = cached_run(small)
            console.rule(f"{path}: faithfulness on {args.faithfulness} prompts, {time.perf_counter() - t:.0f} s")
            console.print(f"metric: {result.metric}")
            _write_outputs(small, result)
            from circuitlang.report.faithfulness import render_faithfulness

            render_faithfulness(result.faithfulness, console)


if __name__ == "__main__":
    main()
