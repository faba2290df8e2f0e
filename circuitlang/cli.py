"""`circ`: run, check and print `.circ` specs. A thin layer: spec -> plan -> engine -> report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from circuitlang.environment import fix_mmap_threshold
from circuitlang.lang import SpecError, format_plan, parse_spec
from circuitlang.lang.plan import Plan, TaskPrompts

EXIT_SPEC = 2  # a bad spec or bad arguments
EXIT_RUN = 1  # a run that could not finish (model, prompts, roots)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circ",
        description="circuitlang: Singular Vector Tracing of attention circuits, from declarative .circ specs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="trace a spec, print the report, write the outputs",
                              description="Trace SPEC: load the model, run the prompts, trace from the roots, "
                              "print the report and write the outputs the spec names.")
    run.add_argument("spec", metavar="SPEC", help="a .circ file")
    run.add_argument("--out", metavar="DIR", help="write results here instead of the spec's `output` directory")
    run.add_argument("--device", metavar="DEVICE", help="override the spec's device (cpu, cuda, cuda:0, mps)")
    run.add_argument("--quiet", action="store_true", help="no progress bars and no report; outputs only")
    run.add_argument("--no-cache", action="store_true", help="recompute the trace; read and write no cache")
    run.add_argument("--chunk", type=_at_least_one, metavar="N",
                     help="prompts per chunk (default: as many as fit in an eighth of the machine's memory, at most 1.5 GiB "
                     "of activations; $CIRCUITLANG_CHUNK_MB sets that budget)")
    run.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="run the chunks on Ray workers: a local Ray instance, or the cluster at ADDRESS "
                     "(needs pip install \"circuitlang[ray]\"); the same trace as one process")
    run.add_argument("--force", action="store_true",
                     help="replace the outputs of another run in the output directory (by default a run replaces only its own spec's)")
    check = commands.add_parser("check", help="parse and validate a spec (no model)",
                                description="Parse and validate SPEC without loading the model.")
    check.add_argument("spec", metavar="SPEC")
    plan = commands.add_parser("plan", help="print the compiled plan as one flat spec",
                               description="Print SPEC's compiled plan: defaults written out, `extends` resolved.")
    plan.add_argument("spec", metavar="SPEC")
    diff = commands.add_parser("diff", help="compare the traces of two specs or trace.json files",
                               description="Compare the traces of A and B (.circ specs, traced or reused from the cache, "
                               "or trace.json files): nodes and edges only in one, Jaccard overlaps, the largest changes. "
                               "Writes diff.json, a drawing of both graphs and diff.html (the interactive viewer).")
    diff.add_argument("a", metavar="A", help="a .circ spec or a trace.json")
    diff.add_argument("b", metavar="B", help="a .circ spec or a trace.json")
    diff.add_argument("--min-count", type=_at_least_one, metavar="N",
                      help="compare edges seen in >= N prompts (default: the larger of the two specs' `show` filters)")
    diff.add_argument("--out", metavar="DIR", default="runs/diff", help="write diff.json and the drawing here (default: runs/diff)")
    diff.add_argument("--device", metavar="DEVICE", help="override the specs' device (cpu, cuda, cuda:0, mps)")
    diff.add_argument("--no-cache", action="store_true", help="recompute both traces; read and write no cache")
    diff.add_argument("--force", action="store_true", help="replace the outputs of a run in --out (an earlier diff is always replaced)")
    view = commands.add_parser("view", help="open a run in the interactive viewer (trace.html)",
                               description="Open the interactive viewer of a run in the browser. TARGET is a run directory "
                               "(holding trace.json), a trace.json, or a .circ spec (its output directory, traced first as "
                               "`circ run` would when that holds no trace.json). trace.html is written beside trace.json "
                               "when it is missing or older than trace.json or interventions.json; its path is printed.")
    view.add_argument("target", metavar="TARGET", help="a run directory, a trace.json or a .circ spec")
    view.add_argument("--no-open", action="store_true", help="write and print the path only; open no browser")
    view.add_argument("--device", metavar="DEVICE", help="a spec's device if it must be traced (cpu, cuda, cuda:0, mps)")
    export = commands.add_parser("export", help="export a run's trace for other tools (neuronpedia)",
                                 description="Export the trace of a run directory (its trace.json) for another tool. "
                                 "neuronpedia: one attribution graph per prompt in circuit-tracer's graph JSON, which "
                                 "Neuronpedia's graph viewer and circuit-tracer's local server load, and graph-metadata.json, "
                                 "written to RUN_DIR/neuronpedia (docs/export.md).")
    export.add_argument("format", choices=("neuronpedia",), metavar="FORMAT", help="neuronpedia")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding trace.json, or a trace.json")
    export.add_argument("--prompt", type=_prompt_choice, metavar="N|all",
                        help="export prompt N (0-based) or all prompts (default: the first 8 in which the trace reached a firing)")
    export.add_argument("--out", metavar="DIR", help="write DIR/neuronpedia instead of RUN_DIR/neuronpedia")
    export.add_argument("--scan", metavar="MODEL_ID", help="the model's id on Neuronpedia, which an upload needs "
                        "(default: the trace's model name; GPT-2 small is gpt2-small there)")
    cache = commands.add_parser("cache", help="show or clear the caches (runs, Omega slices, embedded models)",
                                description="Show where the caches are and how much they hold, or clear them. The run cache "
                                "holds traces and intervention results, the Omega cache the SVDs of each layer, the models "
                                "cache the embedded model's float32 copy and each local model's weights as TransformerLens "
                                "processes them (processed-<key>.pt, read memory-mapped by later loads).")
    cache.add_argument("--clear", nargs="*", choices=("runs", "omega", "models"), metavar="KIND",
                       help="remove these kinds of entries (runs, omega, models); with no KIND, runs and omega")
    return parser


def _at_least_one(text: str) -> int:
    """argparse type of a count: a whole number >= 1 (argparse turns the ValueError into a usage error)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _prompt_choice(text: str) -> int | str:
    """argparse type of --prompt: "all" or a prompt number (0-based)."""
    if text == "all":
        return text
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a prompt number (0, 1, ...) or all, got {text!r}")
    return int(text)


def _writable(directory: str, errors: Console, owner=None, force: bool = False) -> bool:
    """Whether results can go to `directory` (and, given their `owner`, whether it holds another run's outputs),
    checked before any model loads; if not, says why in one line."""
    from circuitlang.report.outdir import OutputDirError, check_writable, claim

    try:
        check_writable(directory)
        if owner is not None:
            claim(directory, owner, force)
    except OutputDirError as err:
        errors.print(f"[red]error[/red]: {err}", highlight=False, soft_wrap=True)
        return False
    return True


def _write_failed(err: OSError, directory: str, rerun: str, errors: Console) -> int:
    """Writing failed after the work was done (a full disk, say): one line, and how to get the results."""
    reason = (err.strerror or str(err)) + (f" ({err.filename})" if getattr(err, "filename", None) else "")
    errors.print(f"[red]error[/red]: could not write the results to {directory}: {reason}; {rerun}",
                 highlight=False, soft_wrap=True, markup=True)
    return EXIT_RUN


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fix_mmap_threshold()
    try:
        return _command(args)
    except KeyboardInterrupt:  # every command: one line, never a traceback (outputs are written atomically)
        Console(stderr=True).print("interrupted; no output was left half-written")
        return 130


def _command(args) -> int:
    from circuitlang.environment import EnvironmentVariableError, check_environment

    console = Console(stderr=False)
    errors = Console(stderr=True)
    if args.command in ("run", "diff", "view", "cache"):  # the commands that read them, before any model loads
        try:
            check_environment()
        except EnvironmentVariableError as err:
            errors.print(f"[red]error[/red]: {escape(str(err))}", highlight=False, soft_wrap=True)
            return EXIT_SPEC
    if args.command == "view":
        return _view(args, console)
    if args.command == "cache":
        return _cache(args, console)
    if args.command == "export":
        return _export(args, console)
    if args.command == "diff":
        return _diff(args, console)
    try:
        plan = parse_spec(args.spec)
    except SpecError as err:
        errors.print(f"[red]error[/red] {err}", highlight=False, soft_wrap=True)
        return EXIT_SPEC
    if args.command == "check":
        from circuitlang.models.families import describe_model

        console.print(f"{args.spec}: ok", highlight=False)
        console.print(describe_model(plan.model.name), highlight=False, markup=False, soft_wrap=True)
        return 0
    if args.command == "plan":
        console.print(format_plan(plan), highlight=False, markup=False, soft_wrap=True)
        return 0
    if args.out:
        plan = dataclasses.replace(plan, output=dataclasses.replace(plan.output, directory=args.out))
    return _run(plan, args, console)


def _run(plan: Plan, args, console: Console) -> int:
    from circuitlang.data.prompts import DataError, PromptFileError
    from circuitlang.engine.evaluate import EvaluationError
    from circuitlang.models.model import ModelLoadError
    from circuitlang.engine.intervene import InterventionError
    from circuitlang.engine.roots import RootError
    from circuitlang.engine.trace import TraceError
    from circuitlang.runner.cache import REUSED
    from circuitlang.report.outdir import run_owner
    from circuitlang.runner.distributed import Cluster, DistributedError
    from circuitlang.runner.execute import cached_run

    errors = Console(stderr=True)
    owner = run_owner(args.spec, format_plan(plan))
    if not _writable(plan.output.directory, errors, owner, args.force):  # before the model loads, not after the trace
        return EXIT_SPEC
    with _progress(args.quiet) as bars, _one_line_warnings(errors):
        try:
            cluster = None if getattr(args, "ray", None) is None else Cluster(args.ray or None)
            result, reused = cached_run(plan, device=args.device, progress=bars, use_cache=not args.no_cache,
                                        chunk=getattr(args, "chunk", None), cluster=cluster)
        except (SpecError, PromptFileError) as err:  # a head out of range or a prompt's tokens, known once the model is loaded
            errors.print(f"[red]error[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
            return EXIT_SPEC
        except (ModelLoadError, DataError, RootError, TraceError, InterventionError, EvaluationError, DistributedError) as err:
            errors.print(f"[red]error[/red] {args.spec}: {escape(str(err))}", highlight=False, soft_wrap=True)
            return EXIT_RUN
    if reused:
        errors.print(REUSED.format(what=" and ".join(result.reused), key=reused), highlight=False, soft_wrap=True)
    try:
        written, notes = _write_outputs(plan, result, owner, args.force)
    except OSError as err:
        kept = ("this run used --no-cache, so a rerun computes the trace again" if args.no_cache else
                f"the trace is in the run cache, so `circ run {args.spec} --out DIR` with a writable DIR reuses it at once")
        return _write_failed(err, plan.output.directory, kept, errors)
    if not args.quiet:
        _report(plan, result, console)
        for path in written:
            console.print(f"wrote {path}", highlight=False)
    for note in notes:
        errors.print(note, highlight=False, soft_wrap=True)
    return 0


def _diff(args, console: Console) -> int:
    from circuitlang.data.prompts import DataError
    from circuitlang.models.model import ModelLoadError
    from circuitlang.engine.roots import RootError
    from circuitlang.engine.trace import TraceError
    from circuitlang.report.diff import diff_inputs, render_diff, write_diff
    from circuitlang.report.viewer import write_diff_viewer
    from circuitlang.report.outdir import NotThisRun, Owner, publish, staged
    from circuitlang.runner.cache import REUSED
    from circuitlang.runner.execute import cached_run

    errors = Console(stderr=True)
    if not _writable(args.out, errors, Owner("diff"), args.force):  # before any spec is traced
        return EXIT_SPEC
    notes: list[str] = []  # printed once the progress bars are done

    def load(path: str):
        result, reused = cached_run(parse_spec(path), device=args.device, progress=bars, use_cache=not args.no_cache,
                                    interventions=False)
        if reused:
            notes.append(f"{path}: " + REUSED.format(what="trace", key=reused))
        return result.trace

    with _progress(False) as bars, _one_line_warnings(errors):
        try:
            diff = diff_inputs(args.a, args.b, load, args.min_count)
        except (SpecError, NotThisRun) as err:
            errors.print(f"[red]error[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
            return EXIT_SPEC
        except (ModelLoadError, DataError, RootError, TraceError, OSError, ValueError) as err:
            errors.print(f"[red]error[/red] {err}", highlight=False, soft_wrap=True)
            return EXIT_RUN
    for note in notes:
        errors.print(note, highlight=False, soft_wrap=True)
    render_diff(diff, console)
    try:
        with staged(args.out) as stage:
            drawing = write_diff(diff, stage)
            write_diff_viewer(diff, stage / "diff.html")
            paths = publish(stage, args.out, Owner("diff"), args.force)
    except OSError as err:
        kept = ("this diff used --no-cache, so a rerun traces the specs again" if args.no_cache else
                "the specs' traces are in the run cache, so a rerun with a writable --out takes seconds")
        return _write_failed(err, args.out, kept, errors)
    for path in paths:
        console.print(f"wrote {path}", highlight=False)
    if drawing.message:
        errors.print(drawing.message, highlight=False, soft_wrap=True)
    return 0


def _view(args, console: Console) -> int:
    """`circ view TARGET`: trace.html of a run directory, a trace.json or a spec's output directory, opened."""
    import webbrowser

    from circuitlang.report.outdir import NotThisRun, read_manifest, run_owner
    from circuitlang.report.viewer import viewer_for_run

    errors = Console(stderr=True)
    target = Path(args.target)
    if target.suffix == ".circ":
        try:
            plan = parse_spec(target)
        except SpecError as err:
            errors.print(f"[red]error[/red] {err}", highlight=False, soft_wrap=True)
            return EXIT_SPEC
        target = Path(plan.output.directory)
        owner = run_owner(args.target, format_plan(plan))
        try:
            manifest = read_manifest(target)
        except ValueError:
            manifest = None
        if manifest is not None and not owner.same(manifest):  # another spec's run: not this spec's to show
            errors.print(f"[red]error[/red] {escape(args.target)}: {target} holds the outputs of `circ run {escape(str(manifest.get('spec')))}`, "
                         "not of this spec; `circ run` it with another --out, then `circ view` that directory",
                         highlight=False, soft_wrap=True)
            return EXIT_SPEC
        if not (target / "trace.json").exists():  # trace it as `circ run` would, writing at least json and html
            formats = tuple(dict.fromkeys(plan.output.formats + ("json", "html")))
            plan = dataclasses.replace(plan, output=dataclasses.replace(plan.output, formats=formats))
            run_args = argparse.Namespace(spec=args.target, device=args.device, quiet=True, no_cache=False, force=False)
            code = _run(plan, run_args, console)
            if code:
                return code
    trace_json = target / "trace.json" if target.is_dir() else target
    if not trace_json.is_file():
        errors.print(f"[red]error[/red] {args.target}: no trace.json there (give a run directory, a trace.json or a .circ spec)",
                     highlight=False, soft_wrap=True)
        return EXIT_SPEC
    try:
        path, written, note = viewer_for_run(trace_json)
    except NotThisRun as err:
        errors.print(f"[red]error[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return EXIT_SPEC
    except (OSError, ValueError, KeyError) as err:  # unreadable JSON, not a trace
        errors.print(f"[red]error[/red] {trace_json}: {err}", highlight=False, soft_wrap=True)
        return EXIT_RUN
    if note:
        errors.print(note, highlight=False, soft_wrap=True, markup=False)
    console.print(f"{'wrote' if written else 'viewer'} {path}", highlight=False, soft_wrap=True)
    if not args.no_open and not webbrowser.open(path.resolve().as_uri()):
        errors.print(f"no browser to open it with; open {path} in one", highlight=False, soft_wrap=True)
    return 0


def _export(args, console: Console) -> int:
    """`circ export neuronpedia RUN_DIR [--prompt N|all] [--out DIR] [--scan MODEL_ID]`."""
    from circuitlang.report.export import read_trace_json
    from circuitlang.report.neuronpedia import select_prompts, write_neuronpedia
    from circuitlang.report.outdir import NotThisRun, require_listed

    errors = Console(stderr=True)
    target = Path(args.run_dir)
    trace_json = target / "trace.json" if target.is_dir() else target
    if not trace_json.is_file():
        errors.print(f"[red]error[/red] {args.run_dir}: no trace.json there (give a run directory or a trace.json)",
                     highlight=False, soft_wrap=True)
        return EXIT_SPEC
    try:  # as `circ view` and `circ diff`: only the trace.json its run wrote
        require_listed(trace_json)
    except NotThisRun as err:
        errors.print(f"[red]error[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return EXIT_SPEC
    out = args.out or str(trace_json.parent)
    if not _writable(out, errors):
        return EXIT_SPEC
    try:
        trace = read_trace_json(trace_json)
    except (OSError, ValueError, KeyError) as err:  # unreadable JSON, not a trace
        errors.print(f"[red]error[/red] {trace_json}: {err}", highlight=False, soft_wrap=True)
        return EXIT_RUN
    try:
        select_prompts(trace, args.prompt)
    except ValueError as err:
        errors.print(f"[red]error[/red] --prompt: {err}", highlight=False, soft_wrap=True)
        return EXIT_SPEC
    try:
        written = write_neuronpedia(trace, out, args.prompt, args.scan)
    except OSError as err:
        return _write_failed(err, out, "nothing else was changed; rerun with a writable --out", errors)
    for path in written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    return 0


@contextlib.contextmanager
def _one_line_warnings(errors: Console) -> Iterator[None]:
    """A cache entry discarded as corrupt, a cache that could not be written, or Ray workers at a lower priority
    is one line on stderr (once, however many entries said it), not a traceback or a Python warning dump."""
    from circuitlang.cachefiles import CacheWarning
    from circuitlang.runner.distributed import RayWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        warnings.simplefilter("always", RayWarning)
        try:
            yield
        finally:
            said = set()
            for w in caught:
                if issubclass(w.category, (CacheWarning, RayWarning)):
                    if str(w.message) not in said:
                        errors.print(f"[yellow]warning[/yellow] {escape(str(w.message))}", highlight=False, soft_wrap=True)
                    said.add(str(w.message))
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _cache(args, console: Console) -> int:
    """`circ cache [--clear [KIND ...]]`."""
    from circuitlang.cachefiles import cache_root
    from circuitlang.runner.cache import cache_usage, clear_cache

    if args.clear is not None:
        kinds = ", ".join(args.clear) or "runs, omega"
        done = clear_cache(tuple(args.clear) or ("runs", "omega"))
        if done.error:
            Console(stderr=True).print(f"[red]error[/red]: could not clear {kinds}: {done.left / 2**20:,.1f} MB left, "
                                       f"{done.freed / 2**20:,.1f} MB freed; {escape(done.error)}", highlight=False, soft_wrap=True)
            return EXIT_RUN
        console.print(f"cleared {kinds}: {done.freed / 2**20:,.1f} MB freed", highlight=False)
        return 0
    console.print(f"cache: {cache_root()}", highlight=False, markup=False, soft_wrap=True)
    table = Table()
    for column in ("kind", "entries", "size"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, (entries, size) in cache_usage().items():
        table.add_row(kind, str(entries), f"{size / 2**20:,.1f} MB")
    console.print(table)
    console.print("clear with `circ cache --clear [runs] [omega] [models]`; $CIRCUITLANG_CACHE moves it", highlight=False, markup=False)
    return 0


class _Bars:
    """Rich progress bars for the engine's progress callback (stage, done, total).

    The model build reports its steps ("model: assembling", ...) only as they start, at 0 of 1: each is
    shown done (and its clock stopped) when the next stage starts.
    """

    STEPS = "model: "

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.progress is None:
            return
        if stage not in self.tasks:
            for name, task in self.tasks.items():
                if name.startswith(self.STEPS):
                    self.progress.update(task, completed=1, total=1)
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()


def _progress(quiet: bool) -> _Bars:
    if quiet:
        return _Bars(None)
    columns = (SpinnerColumn(), TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return _Bars(Progress(*columns, console=Console(stderr=True), transient=False))


def _write_outputs(plan: Plan, result, owner, force: bool) -> tuple[list[Path], list[str]]:
    """Every output the plan names, written beside each other and then published into the output directory
    with their manifest (report/outdir.py): the directory holds this run's files and no other's."""
    from circuitlang.report.outdir import publish, staged

    with staged(plan.output.directory) as stage:
        notes = _write_files(plan, result, stage)
        return publish(stage, plan.output.directory, owner, force), notes


def _write_files(plan: Plan, result, out: Path) -> list[str]:
    """Write the outputs into `out`; returns the notes to print (no Graphviz, say)."""
    from circuitlang.report import known_head_set, write_drawing, write_graphml, write_trace_json

    formats = set(plan.output.formats)
    if "json" in formats:
        write_trace_json(result.trace, out / "trace.json", plan_text=format_plan(plan), metric=result.metric)
    if "graphml" in formats:
        write_graphml(result.trace, out / "trace.graphml")
    drawing = write_drawing(result.trace, out, "trace", formats, plan.show_min_count, known_head_set(plan.compare))
    if "neuronpedia" in formats:
        from circuitlang.report.neuronpedia import write_neuronpedia

        write_neuronpedia(result.trace, out)
    if "html" in formats:
        from circuitlang.report.viewer import write_trace_viewer

        write_trace_viewer(result.trace, out / "trace.html", min_count=plan.show_min_count, compare=plan.compare,
                           interventions=result.interventions, plan=plan)
    if result.interventions is not None:
        from circuitlang.report.interventions import write_intervention_plots, write_interventions_json

        if "json" in formats:
            write_interventions_json(result.interventions, out / "interventions.json")
        if "png" in formats:
            write_intervention_plots(result.interventions, out)
    if getattr(result, "faithfulness", None) is not None:
        from circuitlang.report.faithfulness import write_faithfulness_json, write_faithfulness_plot

        if "json" in formats:
            write_faithfulness_json(result.faithfulness, out / "faithfulness.json")
        if "png" in formats:
            write_faithfulness_plot(result.faithfulness, out / "faithfulness.png")
    return [drawing.message] if drawing.message else []


def _report(plan: Plan, result, console: Console) -> None:
    from circuitlang.report import known_head_set, render_report

    if result.auto_roots:
        table = Table(title="Roots chosen by direct effect on the logit difference (trace from auto)")
        for column in ("root", "mean direct effect", "pair fires in"):
            table.add_column(column, justify="right" if column != "root" else "left")
        for choice in result.auto_roots:
            table.add_row(str(choice.root), f"{choice.direct_effect:.3f}", f"{choice.fired} prompts")
        console.print(table)
        for choice in result.auto_roots:
            if not choice.from_end:
                console.print(f"{choice.root.layer}.{choice.root.head} never fires from the last token, where its effect is read; "
                              f"traced on {choice.root.dest}->{choice.root.src}, the pair it fires on most", highlight=False)
        for skip in result.skipped_roots:
            console.print(f"skipped {skip.layer}.{skip.head} (mean direct effect {skip.direct_effect:.3f}): {skip.reason}",
                          highlight=False)
    known = known_head_set(plan.compare) if plan.compare else None
    render_report(result.trace, console, min_count=plan.show_min_count, known=known)
    if result.interventions is not None:
        from circuitlang.report.interventions import render_interventions

        render_interventions(result.interventions, console)
    if getattr(result, "faithfulness", None) is not None:
        from circuitlang.report.faithfulness import render_faithfulness

        render_faithfulness(result.faithfulness, console)
    if result.logit_diff:
        diffs = sorted(result.logit_diff)
        mean = sum(diffs) / len(diffs)
        positive = sum(d > 0 for d in diffs)
        what = ("logit(target) - logit(distractor)" if result.metric["kind"] == "logit difference" and
                not isinstance(plan.prompts, TaskPrompts) else f"the {result.metric['kind']} of the targets and distractors")
        console.print(f"F(X) = {what}: mean {mean:.3f}, median {diffs[len(diffs) // 2]:.3f}, "
                      f"positive in {positive}/{len(diffs)} prompts", highlight=False)
    if "dropped" in result.trace.prompts:
        console.print(f"prompts: {result.trace.prompts}", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
