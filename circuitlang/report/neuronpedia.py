"""Per-prompt attribution graphs for Neuronpedia's graph viewer and circuit-tracer's local server.

One file per prompt in circuit-tracer's graph JSON (`circuit_tracer.frontend.graph_models.Model`: metadata,
qParams, nodes, links; Neuronpedia's `graph-schema.json`) and the `graph-metadata.json` index the local server
lists. Every number comes from the trace; docs/export.md says which fields are ours and what each one means.

A node is a head at a destination position (an attention node, Neuronpedia's "lorsa" type), a writer of
`sources` at a position (MLP, attention output bias), a token (embedding) or the target logit. A link is a
traced edge: the eq. (8) contribution c of the upstream writer at the token it writes into to the firing of
the downstream head, summed over the node's traced firings when a head fires on several sources from the
same destination (so a link is one row of TracedEdges in most prompts, never a new number).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from circuitlang.atomic import atomic_write
from circuitlang.engine.results import BIAS, EMBED, MLP, Trace
from circuitlang.lang.plan import parse_root
from circuitlang.report.export import dumps, plain, root_firings, roots_summary

DEFAULT_PROMPTS = 8  # `output ... neuronpedia` and `circ export neuronpedia` without --prompt: the first few traced
DIRECTORY = "neuronpedia"
INDEX = "graph-metadata.json"
# The viewers show nodes whose influence is at most this (their pruning slider); 1 shows the whole trace,
# which the mass rule of `keep mass` has already pruned.
NODE_THRESHOLD = 1.0
GENERATOR = {"name": "circuitlang: Singular Vector Tracing (Franco & Crovella, 2024)"}

Node = tuple  # ("head", layer, head, pos) | ("mlp", layer, pos) | ("bias", layer, pos) | ("token", pos) | ("logit", pos)


def cantor(layer: int, index: int) -> int:
    """The feature number of schema version 1: both viewers decode layer and index from it."""
    return (layer + index) * (layer + index + 1) // 2 + index


def _upstream(up_layer: int, up_head: int, token: int) -> Node:
    if up_head == MLP:
        return ("mlp", up_layer, token)
    if up_head == BIAS:
        return ("bias", up_layer, token)
    if up_head == EMBED:
        return ("token", token)
    return ("head", up_layer, up_head, token)


def _node_id(node: Node) -> str:
    kind = node[0]
    if kind == "head":
        return f"{node[1]}_head_{node[2]}_{node[3]}"
    if kind == "mlp":
        return f"{node[1]}_mlp_{node[2]}"
    if kind == "bias":
        return f"{node[1]}_bias_attn_bO_{node[2]}"
    if kind == "token":
        return f"E_{node[1]}"
    return f"logit_{node[1]}"


def cumulative_influence(ids: list[str], links: list[dict], seeds: dict[str, float]) -> dict[str, float]:
    """Each node's influence as the viewers read it: the fraction of the total influence held by the nodes
    at least as influential as it (low = important; the slider keeps nodes with influence <= threshold).

    The raw influence is circuit-tracer's (graph.compute_influence): |link weights| normalised over each
    target's inputs, propagated from the seeds through every path, s + sA + sA^2 + ...; the seeds are the
    trace's root firings (Algorithm 1 starts there), with equal weight. Nodes no seed reaches get 1.
    """
    index = {node: k for k, node in enumerate(ids)}
    adjacency = np.zeros((len(ids), len(ids)))
    for link in links:
        adjacency[index[link["target"]], index[link["source"]]] += abs(link["weight"])
    adjacency /= np.maximum(adjacency.sum(axis=1, keepdims=True), 1e-30)
    current = np.zeros(len(ids))
    for node, weight in seeds.items():
        current[index[node]] = weight
    raw = current.copy()
    for _ in range(len(ids)):  # a DAG: every path is shorter than the node count
        current = current @ adjacency
        raw += current
    order = np.argsort(-raw, kind="stable")
    total = raw.sum()
    cumulative = np.minimum(np.cumsum(raw[order]) / total, 1.0) if total > 0 else np.ones(len(ids))
    out = np.empty(len(ids))
    out[order] = cumulative
    return dict(zip(ids, out.tolist()))


def prompt_graph(trace: Trace, prompt: int, slug: str, scan: str | None = None) -> dict:
    """The attribution graph of one prompt of the trace, as circuit-tracer's and Neuronpedia's viewers read it;
    `scan` names the model as Neuronpedia does (default: the trace's model name)."""
    tokens = list(trace.token_text[prompt]) if trace.token_text else [""] * len(trace.labels[prompt])
    roles = trace.labels[prompt]
    last = len(roles) - 1
    ev, ed = trace.events, trace.edges
    here = np.flatnonzero(ev.prompt == prompt)
    is_root = np.zeros(len(here), dtype=bool)  # explicit roots and root sets alike
    for root in map(parse_root, trace.config.roots):
        is_root |= root_firings(trace, root, here)

    firings: dict[Node, list[dict]] = defaultdict(list)
    for k, e in enumerate(here):
        layer, head, dest, src = int(ev.layer[e]), int(ev.head[e]), int(ev.dest[e]), int(ev.src[e])
        firings[("head", layer, head, dest)].append({
            "src": src, "src_role": roles[src], "score": ev.score[e], "attention": ev.attention[e],
            "n_slices": ev.n_slices[e], "slices": ev.slices[e], "signal_dest": ev.signal_dest[e],
            "signal_src": ev.signal_src[e], "root": bool(is_root[k]),
        })

    # Per target node and source node, the summed contribution through each side (d: query, s: key).
    sides: dict[Node, dict[Node, dict[str, float]]] = defaultdict(lambda: defaultdict(lambda: {"d": 0.0, "s": 0.0}))
    for r in np.flatnonzero(ed.prompt == prompt):
        token = int(ed.dest[r] if ed.side[r] == "d" else ed.src[r])
        target = ("head", int(ed.layer[r]), int(ed.head[r]), int(ed.dest[r]))
        sides[target][_upstream(int(ed.up_layer[r]), int(ed.up_head[r]), token)][str(ed.side[r])] += float(ed.contribution[r])

    nodes: dict[Node, dict] = {("token", p): _token_node(p, tokens[p], roles[p]) for p in range(len(roles))}
    for node in {n for target, sources in sides.items() for n in (target, *sources)} | set(firings):
        if node not in nodes:  # token nodes are there already
            nodes[node] = _writer_node(node, roles)
    nodes[("logit", last)] = _logit_node(last, trace.n_layers)

    links = [{"source": _node_id(s), "target": _node_id(t), "weight": by["d"] + by["s"]}
             for t, sources in sorted(sides.items()) for s, by in sorted(sources.items())]
    for node, fired in firings.items():
        record = nodes[node]
        record["clerp"] = f"{node[1]}.{node[2]} {roles[node[3]]}->{','.join(f['src_role'] for f in fired)}"
        record["activation"] = sum(float(f["attention"]) for f in fired)
        record["svt_firings"] = fired
        qk = {side: sorted(((_node_id(s), by[side]) for s, by in sides[node].items() if by[side] != 0.0),
                           key=lambda pair: (-abs(pair[1]), pair[0])) for side in ("d", "s")}
        # SVT attributes each side's signal on its own (eq. 8); a query x key pair's share is not in the trace.
        record["qk_tracing_results"] = {"pair_wise_contributors": [], "top_q_marginal_contributors": qk["d"],
                                        "top_k_marginal_contributors": qk["s"]}

    ids = [_node_id(n) for n in sorted(nodes, key=_order)]
    seeds = [_node_id(n) for n, fired in firings.items() if any(f["root"] for f in fired)]
    influence = cumulative_influence(ids, links, {node: 1.0 / len(seeds) for node in seeds})
    records = {_node_id(n): nodes[n] for n in nodes}
    for node_id in ids:
        records[node_id]["influence"] = influence[node_id]

    c = trace.config
    return plain({
        "metadata": {
            "slug": slug, "scan": scan or trace.model, "transcoder_list": [], "prompt_tokens": tokens,
            "prompt": "".join(t for t, role in zip(tokens, roles) if role != "BOS"),
            "node_threshold": NODE_THRESHOLD, "schema_version": 1,
            "info": {"description": f"Singular Vector Tracing of prompt {prompt} ({trace.prompts}) from "
                                    f"{roots_summary(trace).splitlines()[0]}", "generator": GENERATOR},
            "generation_settings": {"firing_threshold": c.threshold, "keep_mass": c.mass, "slices": c.slices,
                                    "roots": list(c.roots), "sources": c.sources, "readings": c.readings},
            "pruning_settings": {"node_threshold": NODE_THRESHOLD},
            "svt_prompt": prompt, "svt_roles": list(roles),
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": [records[node_id] for node_id in ids],
        "links": links,
    })


def _order(node: Node) -> tuple:
    """Tokens first, then by layer, writers of a layer after its heads, the logit last."""
    kind = node[0]
    if kind == "token":
        return (-1, 0, 0, node[1])
    if kind == "logit":
        return (10**9, 0, 0, node[1])
    if kind == "head":
        return (node[1], 0, node[2], node[3])
    return (node[1], 1 if kind == "bias" else 2, 0, node[2])


def _base(node: Node, feature: int, layer: str, ctx: int, feature_type: str, clerp: str) -> dict:
    node_id = _node_id(node)
    return {"node_id": node_id, "jsNodeId": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx,
            "feature_type": feature_type, "clerp": clerp, "token_prob": 0.0, "is_target_logit": False,
            "run_idx": 0, "reverse_ctx_idx": 0, "influence": None, "activation": None}


def _token_node(pos: int, token: str, role: str) -> dict:
    return _base(("token", pos), pos, "E", pos, "embedding", f"Emb: {json.dumps(token, ensure_ascii=False)} ({role})")


def _writer_node(node: Node, roles: Sequence[str]) -> dict:
    kind = node[0]
    if kind == "head":  # a head that writes into a traced firing without firing itself there
        _, layer, head, pos = node
        return _base(node, cantor(layer, head), str(layer), pos, "lorsa", f"{layer}.{head} at {roles[pos]}")
    _, layer, pos = node
    if kind == "mlp":  # the whole MLP: what a transcoder graph with no features calls its error node
        return _base(node, -1, str(layer), pos, "mlp reconstruction error", f"mlp {layer} at {roles[pos]}")
    return _base(node, -2, str(layer), pos, "bias", f"bias {layer} at {roles[pos]}")


def _logit_node(pos: int, n_layers: int) -> dict:
    # The viewers parse "(p=...)" out of a logit's clerp; the trace holds no probability.
    record = _base(("logit", pos), -1, str(n_layers), pos, "logit", 'Output "F(X)" (p=n/a)')
    record["is_target_logit"] = True
    return record


def slug_for(trace: Trace, prompt: int) -> str:
    width = len(str(max(len(trace.labels) - 1, 0)))
    model = re.sub(r"[^a-z0-9]+", "-", trace.model.lower()).strip("-") or "model"
    return f"{model}-svt-prompt-{prompt:0{width}d}"


def select_prompts(trace: Trace, prompt: int | str | None) -> list[int]:
    """None: the first DEFAULT_PROMPTS prompts in which the trace reached a firing (a graph of tokens alone shows
    nothing, and Neuronpedia's viewer refuses one: "No layer found"); "all": every prompt; N: prompt N (0-based),
    ValueError if out of range."""
    n = len(trace.labels)
    if prompt is None:
        return sorted(set(trace.events.prompt.tolist()))[:DEFAULT_PROMPTS]
    if prompt == "all":
        return list(range(n))
    if not 0 <= int(prompt) < n:
        raise ValueError(f"prompt {prompt} is out of range: the trace has prompts 0 to {n - 1}")
    return [int(prompt)]


def write_neuronpedia(trace: Trace, directory: str | os.PathLike, prompt: int | str | None = None,
                      scan: str | None = None) -> list[Path]:
    """`directory`/neuronpedia: one graph file per chosen prompt and graph-metadata.json, which keeps the
    entries of earlier exports whose files are still there (as circuit-tracer's add_graph_metadata does).
    Each file is written atomically, the index last."""
    out = Path(directory) / DIRECTORY
    written, entries = [], {}
    index = out / INDEX
    if index.is_file():
        try:
            old = json.loads(index.read_text(encoding="utf-8"))["graphs"]
            entries = {g["slug"]: g for g in old if (out / f"{g['slug']}.json").is_file()}
        except (OSError, ValueError, KeyError, TypeError):
            entries = {}  # an unreadable index is rebuilt from this export
    for p in select_prompts(trace, prompt):
        slug = slug_for(trace, p)
        graph = prompt_graph(trace, p, slug, scan)
        written.append(atomic_write(out / f"{slug}.json", dumps(graph)))
        m = graph["metadata"]
        entries[slug] = {"slug": slug, "scan": m["scan"], "prompt_tokens": m["prompt_tokens"], "prompt": m["prompt"],
                         "node_threshold": m["node_threshold"], "title_prefix": "SVT"}
    written.append(atomic_write(index, dumps({"graphs": [entries[s] for s in sorted(entries)]})))
    return written
