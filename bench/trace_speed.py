"""How fast is the trace? (a) the forward pass, (b) the engine's trace, (c) a per-pair reference.

On one model and one IOI prompt set, for each N: (a) `capture`, the one forward pass with the cache a
trace needs; (b) `trace(..., activations=acts)`, everything after the forward pass (Omega slices, the
decomposition and firing statistics of every firing event, the walk of Algorithm 1, the graph); (c)
`bench/reference.py`, a straightforward per-pair implementation computing the same outputs (dense Omega
SVD per head; loops over prompts, layers, heads, dest and src tokens for the firing statistics; a
depth-first walk looping over events and upstream heads). Contenders are interleaved (their order
rotates every repeat) and repeated; medians and minimums are reported, and ratios from both. (b) and
(c) must give the same firing statistics (exactly) and the same graph.

The default model is GPT-2-small-sized (12 layers, 12 heads, d 768) with GPT-2's real tokenizer and
RANDOM weights, built offline (tests/tiny_models.py, query/key weights scaled by --qk-scale so heads
fire) and cached under --cache-dir.

    python bench/trace_speed.py                        # N = 32 128 256, repeats 3
    python bench/trace_speed.py --prompts 256 --reference-prompts 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (HERE, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from reference import compare, decompose, first_prompts, omega_svd, reference_trace  # noqa: E402

from circuitlang.data.ioi import ioi_prompts  # noqa: E402
from circuitlang.engine import decompose as dc  # noqa: E402
from circuitlang.engine.forward import capture  # noqa: E402
from circuitlang.models.geometry import attention_geometry  # noqa: E402
from circuitlang.models.model import load_model  # noqa: E402
from circuitlang.engine.trace import decompose_layer, parse_root, slices_for, trace  # noqa: E402
from circuitlang.lang.plan import Root, SliceRule  # noqa: E402

TOKENIZER = REPO / "tests" / "data" / "gpt2-tokenizer"  # vendored: GPT-2's vocab.json + merges.txt
PAPER_ROOTS = ("9.6 end->IO", "9.9 end->IO", "10.0 end->IO")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[32, 128, 256], help="prompt counts N (default 32 128 256)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each contender (default 3)")
    ap.add_argument("--reference-prompts", type=int, default=None, metavar="K",
                    help="time the reference (c) on the first K prompts only (default: all N)")
    ap.add_argument("--device", default="cpu", help="device of the forward pass (the trace runs on the CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "circuitlang-bench"),
                    help="where the built random model is kept between runs")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--qk-scale", type=float, default=8.0, help="query/key weight scale of the random model")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--roots", nargs="+", default=None,
                    help="roots 'l.h dest->src' (default: 9.6, 9.9, 10.0 end->IO if they fire on half of the "
                         "prompts, else the three busiest role pairs of layers 9-10)")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--mass", type=float, default=0.7)
    ap.add_argument("--tokenizer", default=str(TOKENIZER), help="GPT-2 tokenizer folder (vocab.json, merges.txt)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time (b0), the engine's trace from no root: Omega slices, the decomposition and "
                         "statistics of every firing event, no walk")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


def cached_model(args, tokenizer) -> Path:
    """Build the random GPT-2 once per configuration; reruns load it from --cache-dir."""
    from tiny_models import build_gpt2

    name = f"gpt2-random-{args.layers}x{args.heads}x{args.width}-qk{args.qk_scale:g}-seed{args.seed}"
    target = Path(args.cache_dir) / name
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=target.parent))
        t0 = time.perf_counter()
        build_gpt2(tmp, tokenizer, n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                   qk_scale=args.qk_scale, seed=args.seed)
        try:
            tmp.rename(target)
        except OSError:  # built concurrently by another run
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"built {target} in {time.perf_counter() - t0:.1f} s")
    return target


def fire_rate(fires, prompts, root: Root) -> float:
    dest = torch.tensor([p.role(root.dest) for p in prompts])
    src = torch.tensor([p.role(root.src) for p in prompts])
    return fires[root.layer, torch.arange(len(prompts)), root.head, dest, src].float().mean().item()


def choose_roots(args, acts, prompts, n_layers: int) -> tuple[list[Root], str]:
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, args.threshold)
    if args.roots:
        roots = [parse_root(r) for r in args.roots]
        return roots, "given"
    paper = [parse_root(r) for r in PAPER_ROOTS]
    if all(r.layer < n_layers for r in paper):
        rates = [fire_rate(fires, prompts, r) for r in paper]
        if min(rates) >= 0.5:
            return paper, "the paper's (9.6, 9.9, 10.0 end->IO)"
        why = "the paper's roots fire on " + ", ".join(f"{100 * x:.0f}%" for x in rates) + " of the prompts"
    else:
        why = "the paper's roots are outside this model"
    layers = [l for l in (9, 10) if l < n_layers] or [n_layers - 1]
    counts: dict[tuple, int] = {}
    for layer in layers:
        for p, h, i, j in fires[layer].nonzero().tolist():
            dest, src = prompts[p].labels[i], prompts[p].labels[j]
            if dest in prompts.role_names and src in prompts.role_names and dest != src:
                counts[layer, h, dest, src] = counts.get((layer, h, dest, src), 0) + 1
    ranked = sorted(counts, key=lambda k: (-counts[k], k))[:3]
    if not ranked:
        raise SystemExit("no head of layers " + ", ".join(map(str, layers)) + " fires between named roles; pass --roots")
    return [Root(*k) for k in ranked], f"busiest role pairs of layer(s) {'/'.join(map(str, layers))} ({why})"


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "all": values}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(args.tokenizer)
    path = cached_model(args, tokenizer)
    model = load_model(str(path), device=args.device)
    prompts_all = ioi_prompts(tokenizer, n=max(args.prompts))
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.device != "cpu" and torch.cuda.is_available():
        machine += f", forward pass on {torch.cuda.get_device_name()}"
    print(f"model: GPT-2 architecture {args.layers} layers x {args.heads} heads, d {args.width}, GPT-2 tokenizer, "
          f"RANDOM weights (qk scale {args.qk_scale:g}, seed {args.seed}) -- not GPT-2's trained weights")
    print(f"machine: {machine}; forward on {args.device}, trace and reference on cpu")

    acts_all = capture(model, prompts_all)  # untimed: roots, and a warm-up of the forward pass
    roots, root_why = choose_roots(args, acts_all, prompts_all, model.n_layers)
    print(f"roots: {', '.join(map(str, roots))} -- {root_why}; "
          + ", ".join(f"{r} fires on {100 * fire_rate(dc.firing_mask(acts_all.pattern, acts_all.scores, acts_all.lengths, args.threshold), prompts_all, r):.0f}%"
                      for r in roots))
    trace(model, prompts_all[:2], roots, args.threshold, args.mass, activations=first_prompts(acts_all, 2))  # warm-up
    del acts_all

    results = {"model": str(path), "random_weights": True, "qk_scale": args.qk_scale, "layers": args.layers,
               "heads": args.heads, "width": args.width, "machine": machine, "device": args.device,
               "roots": [str(r) for r in roots], "roots_why": root_why, "repeats": args.repeats, "sizes": []}
    for N in args.prompts:
        prompts = prompts_all[:N]
        K = min(N, args.reference_prompts or N)
        prompts_k = prompts[:K]
        acts = capture(model, prompts)
        acts_k = first_prompts(acts, K) if K < N else acts
        times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "c_svd": [], "c_stats": [], "c_walk": [], "c_rest": [],
                                         "bK": [], "b0": [],
                                         "b_geometry": [], "b_trace": [], "b_graph": []}
        engine = engine_k = ref = None
        contenders = ["a", "b", "c"] + (["bK"] if K < N else []) + (["b0"] if args.breakdown else [])
        for rep in range(args.repeats):
            order = contenders[rep % len(contenders):] + contenders[: rep % len(contenders)]
            for who in order:
                if who == "a":
                    t0 = time.perf_counter()
                    acts = capture(model, prompts)
                    times["a"].append(time.perf_counter() - t0)
                elif who == "b":
                    t0 = time.perf_counter()
                    engine = trace(model, prompts, roots, args.threshold, args.mass, activations=acts)
                    times["b"].append(time.perf_counter() - t0)
                    for part in ("geometry", "trace", "graph"):
                        times[f"b_{part}"].append(engine.timings[part])
                elif who == "b0":
                    t0 = time.perf_counter()
                    trace(model, prompts, [], args.threshold, args.mass, activations=acts)
                    times["b0"].append(time.perf_counter() - t0)
                elif who == "bK":
                    t0 = time.perf_counter()
                    engine_k = trace(model, prompts_k, roots, args.threshold, args.mass, activations=acts_k)
                    times["bK"].append(time.perf_counter() - t0)
                else:
                    t0 = time.perf_counter()
                    ref = reference_trace(model, prompts_k, roots, acts_k, args.threshold, args.mass)
                    total = time.perf_counter() - t0
                    times["c"].append(total)
                    times["c_svd"].append(ref.timings["svd"])
                    times["c_stats"].append(ref.timings["stats"])
                    times["c_walk"].append(total - ref.timings["svd"] - ref.timings["stats"])  # walk and graph
                    times["c_rest"].append(total - ref.timings["svd"])  # everything per prompt
            shown = ("a", "b", "c", "c_svd", "c_stats", "c_walk", "bK", "b0")
            print(f"  N={N} repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in shown if times[k]), flush=True)
        check = compare(engine if K == N else engine_k, ref)
        if check["firing_heads"]:  # which events differ, and whether each is a tie within float32 rounding
            check["firing_differences"] = explain_firing(model, acts_k, check["firing_heads"], args.threshold)
        # Untimed: the same engine code in float64 (activations and weights upcast, as the reference reads them).
        acts64, geometry64 = as_float64(acts_k, attention_geometry(model))
        engine64 = trace(model, prompts_k, roots, args.threshold, args.mass, activations=acts64, geometry=geometry64)
        check["float64"] = {k: v for k, v in compare(engine64, ref).items()
                            if k in ("equal", "firing_equal", "graph_equal", "problems", "max_rel_total_diff")}
        del engine64, acts64
        row = summarise(N, K, times, engine, check)
        results["sizes"].append(row)
        print_row(row)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return results


def as_float64(acts, geometry):
    """The activations (x, scales, z) and the weights in float64, for the engine's untimed float64 check."""
    acts64 = dataclasses.replace(acts, x=acts.x.double(), scale=acts.scale.double(), z=acts.z.double())
    geometry64 = dataclasses.replace(geometry, **{f.name: getattr(geometry, f.name).double() for f in dataclasses.fields(geometry)
                                                  if isinstance(getattr(geometry, f.name), torch.Tensor)})
    return acts64, geometry64


def explain_firing(model, acts, heads: list[tuple[int, int]], threshold: float) -> list[dict]:
    """The firing events of `heads` whose S_ij differs between the engine (float32) and the reference (float64).

    Each is decomposed by both (the engine's `decompose_layer`, the reference's `decompose`). `explained`:
    the engine's S_ij satisfies the definition on the reference's float64 terms t up to `err`, the sum of
    |t32 - t| over the event's terms (the float32 rounding of the engine's own terms): every kept term >=
    every dropped one - err, the dropped terms sum to <= err, and with the smallest kept term they sum to
    > -err. A difference that is not explained is a disagreement about the definition, not about rounding.
    """
    svd = omega_svd(model, heads)
    geometry = attention_geometry(model)
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, threshold)
    out = []
    for layer in sorted({l for l, _ in heads}):
        dec = decompose_layer(acts, slices_for(geometry, acts, layer), fires[layer], layer, SliceRule("paper"))
        for head in sorted(h for l, h in heads if l == layer):
            U, S, V = svd[layer, head]
            for e in (dec.head == head).nonzero().flatten().tolist():
                p, i, j = int(dec.prompt[e]), int(dec.dest[e]), int(dec.src[e])
                xi = np.append(acts.x[layer, p, i].double().numpy(), 1.0)
                xj = np.append(acts.x[layer, p, j].double().numpy(), 1.0)
                t, chosen, _, _ = decompose(xi, xj, U, S, V)
                kept = dec.mask[e].numpy()
                if set(np.flatnonzero(kept).tolist()) == set(chosen):
                    continue
                t32 = dec.terms[e].double().numpy()
                err = float(np.abs(t32 - t).sum())
                inside, outside = t[kept], t[~kept]
                explained = bool((inside.size == 0 or outside.size == 0 or inside.min() >= outside.max() - err)
                                 and outside.sum() <= err and (inside.size == 0 or inside.min() + outside.sum() > -err))
                ref_only = sorted(set(chosen) - set(np.flatnonzero(kept).tolist()))
                eng_only = sorted(set(np.flatnonzero(kept).tolist()) - set(chosen))
                out.append({"event": (p, layer, head, i, j), "reference_only": ref_only, "engine_only": eng_only,
                            "terms64": {k: float(t[k]) for k in ref_only + eng_only},
                            "terms32": {k: float(t32[k]) for k in ref_only + eng_only},
                            "err": err, "explained": explained})
    return out


def row_ok(row: dict) -> bool:
    """Same graph; firing statistics the same, or the same counts and |S_ij| or slices differing only on events
    found to be float32 ties; the float64 engine's statistics and graph exactly the reference's."""
    c = row["check"]
    ties_only = (c["counts_equal"] and bool(c.get("firing_differences"))
                 and all(d["explained"] for d in c["firing_differences"]))
    return c["graph_equal"] and (c["firing_equal"] or ties_only) and c["float64"]["equal"]


def summarise(N: int, K: int, times: dict, engine, check: dict) -> dict:
    s = {k: stats(v) for k, v in times.items() if v}
    row = {"N": N, "reference_prompts": K, "firing_events": int(engine.firing.counts.sum()),
           "traced_events": len(engine.events), "edges": len(engine.edges), "times": s, "check": check,
           "prompts_with_events": len(set(engine.events.prompt.tolist()))}
    for m in ("median", "min"):
        a, b = s["a"][m], s["b"][m]
        if K == N:
            c = s["c"][m]
        else:  # the per-head SVD once, the per-prompt statistics and walk scaled from K to N prompts
            c = s["c_svd"][m] + s["c_rest"][m] * N / K
            row[f"c_over_bK_{m}"] = s["c"][m] / s["bK"][m]
        row[f"c_{m}"] = c
        row[f"b_over_a_{m}"] = b / a
        row[f"c_over_b_{m}"] = c / b
    return row


def print_row(row: dict) -> None:
    c = row["check"]
    K, N = row["reference_prompts"], row["N"]
    scope = f"on all {N} prompts" if K == N else f"on the first {K} prompts (engine re-traced on the same {K})"
    verdict = ("SAME FIRING STATISTICS" if c["firing_equal"] else "FIRING STATISTICS DIFFER") + ", " + \
              ("SAME GRAPH" if c["graph_equal"] else "GRAPHS DIFFER")
    print(f"  check {scope}: {verdict} -- {c['firing_events']} firing events (reference {c['reference_firing_events']}); "
          f"{c['communication_edges']} communication edges, {c['attention_edges']} attention "
          f"edges, {c['events']} events, {c['edges']} edges; worst relative total difference {c['max_rel_total_diff']:.1e}")
    for problem in c["problems"][:20]:
        print("    " + problem)
    for d in c.get("firing_differences", [])[:20]:
        terms = ", ".join(f"t{k} = {d['terms64'][k]:.9g} (engine {d['terms32'][k]:.9g})" for k in d["terms64"])
        print(f"    event {d['event']} (prompt, layer, head, dest, src): S_ij reference-only {d['reference_only']}, "
              f"engine-only {d['engine_only']}; float64 {terms}; engine's float32 rounding on this event's terms "
              f"{d['err']:.2g}: {'a tie within float32 rounding' if d['explained'] else 'NOT a float32 tie'}")
    c64 = c["float64"]
    print("  check of the engine in float64 (untimed) against the reference: "
          + ("SAME FIRING STATISTICS" if c64["firing_equal"] else "FIRING STATISTICS DIFFER") + ", "
          + ("SAME GRAPH" if c64["graph_equal"] else "GRAPHS DIFFER")
          + f"; worst relative total difference {c64['max_rel_total_diff']:.1e}")
    for problem in c64["problems"][:20]:
        print("    " + problem)


def fmt(seconds: float) -> str:
    return f"{seconds:.3g}" if seconds < 100 else f"{seconds:.0f}"


def ratio(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def print_table(results: dict) -> None:
    print()
    print(f"Model: {results['layers']} layers x {results['heads']} heads, d {results['width']}, RANDOM weights "
          f"(qk scale {results['qk_scale']:g}); roots {', '.join(results['roots'])}; {results['repeats']} repeats")
    print(f"Machine: {results['machine']}")
    head = (f"{'N':>4} {'firing':>7} {'traced':>7} {'(a) fwd med/min':>16} {'(b) trace med/min':>18} "
            f"{'(c) ref med/min':>17} {'b/a med/min':>12} {'c/b med/min':>14}  stats+graph")
    print(head)
    for row in results["sizes"]:
        t = row["times"]
        note = "" if row["reference_prompts"] == row["N"] else "*"
        cells = [f"{row['N']:>4}", f"{row['firing_events']:>7}", f"{row['traced_events']:>7}",
                 f"{fmt(t['a']['median']) + '/' + fmt(t['a']['min']):>16}", f"{fmt(t['b']['median']) + '/' + fmt(t['b']['min']):>18}",
                 f"{fmt(row['c_median']) + '/' + fmt(row['c_min']) + note:>17}",
                 f"{ratio(row['b_over_a_median']) + '/' + ratio(row['b_over_a_min']):>12}",
                 f"{ratio(row['c_over_b_median']) + '/' + ratio(row['c_over_b_min']):>14}",
                 " same" if row["check"]["equal"] and row_ok(row) else
                 f" same graph; S_ij differs on {len(row['check']['firing_differences'])} float32 tie(s) (float64: same)"
                 if row_ok(row) else
                 f" DIFFERENT (firing {'same' if row['check']['firing_equal'] else 'differ'}, "
                 f"graph {'same' if row['check']['graph_equal'] else 'differs'}, "
                 f"float64 {'same' if row['check']['float64']['equal'] else 'differs'})"]
        print(" ".join(cells))
    for row in results["sizes"]:
        t = row["times"]
        print(f"  N={row['N']}: {row['firing_events'] / row['N']:.0f} firing events per prompt; "
              f"{row['traced_events'] / row['N']:.0f} traced events per prompt, "
              f"{row['traced_events'] / max(1, row['prompts_with_events']):.0f} per prompt where a root fires "
              f"({row['prompts_with_events']} of {row['N']} prompts); {row['edges']} traced edges")
        print(f"  N={row['N']}: (b) = weights {fmt(t['b_geometry']['median'])} + Omega slices, decomposition and walk "
              f"{fmt(t['b_trace']['median'])} + graph {fmt(t['b_graph']['median'])} s (medians)"
              + (f"; (b0) the trace from no root {fmt(t['b0']['median'])}/{fmt(t['b0']['min'])} s" if "b0" in t else "")
              + f"; (c) = dense SVD of every head {fmt(t['c_svd']['median'])}/{fmt(t['c_svd']['min'])} s "
              f"+ firing statistics {fmt(t['c_stats']['median'])} s ({1000 * t['c_stats']['median'] / row['reference_prompts']:.0f} ms/prompt) "
              f"+ walk and graph {fmt(t['c_walk']['median'])} s ({1000 * t['c_walk']['median'] / row['reference_prompts']:.0f} ms/prompt)")
        if row["reference_prompts"] != row["N"]:
            K = row["reference_prompts"]
            print(f"  * N={row['N']}: reference timed on the first {K} prompts only: c is the SVD plus its statistics and walk scaled "
                  f"by N/K = {row['N'] / K:g} (measured c({K}) {fmt(t['c']['median'])}/{fmt(t['c']['min'])} s); "
                  f"direct c/b on the same {K} prompts: {ratio(row['c_over_bK_median'])}/{ratio(row['c_over_bK_min'])} "
                  f"(engine on {K}: {fmt(t['bK']['median'])}/{fmt(t['bK']['min'])} s); statistics and graph checked on those {K}")
    print("Times in seconds, median/min over repeats; ratios b/a and c/b from medians/from mins. "
          "Weights are random: event counts are not GPT-2's.")


if __name__ == "__main__":
    out = main()
    sys.exit(0 if all(row_ok(row) for row in out["sizes"]) else 1)
