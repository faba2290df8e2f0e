"""Aggregate traced edges over prompts into the trace graph of Fig. 5."""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
import numpy as np

from circuitlang.engine.results import TracedEdges, TracedEvents


def aggregate(events: TracedEvents, edges: TracedEdges, labels: tuple[tuple[str, ...], ...], firing_counts: np.ndarray) -> nx.DiGraph:
    """Head nodes (layer, head), token nodes (layer, head, role); communication and attention edges.

    A token node names the token an upstream head writes into by its role label in that prompt, so
    prompts of different templates aggregate. An edge counts once per prompt however many events or
    roots reach it (as the paper's graph does); its per-prompt contribution is the sum over that
    prompt's events, `total` sums prompts and `mean` = total / count. `type` is the side ("s"/"d") the
    edge was traced through in more prompts ("s" on a tie), whatever the order of the rows.
    """
    per_prompt: dict[tuple, float] = defaultdict(float)
    sides: dict[tuple, dict[str, set[int]]] = defaultdict(lambda: {"s": set(), "d": set()})
    for p, ul, uh, l, h, i, j, side, c in zip(
        edges.prompt.tolist(), edges.up_layer.tolist(), edges.up_head.tolist(), edges.layer.tolist(),
        edges.head.tolist(), edges.dest.tolist(), edges.src.tolist(), edges.side.tolist(), edges.contribution.tolist(),
    ):
        role = labels[p][i if side == "d" else j]
        key = ((ul, uh), (l, h, role))
        sides[key][side].add(p)
        per_prompt[key, p] += c

    graph = nx.DiGraph()
    comm: dict[tuple, list[float]] = defaultdict(list)
    for (key, _), c in per_prompt.items():
        comm[key].append(c)
    attention: dict[tuple, set[int]] = defaultdict(set)
    for (key, p) in per_prompt:
        attention[key[1]].add(p)

    for (up, token), values in sorted(comm.items()):
        side = "s" if len(sides[up, token]["s"]) >= len(sides[up, token]["d"]) else "d"
        total = float(sum(values))
        graph.add_edge(up, token, kind="communication", type=side, count=len(values), total=total, mean=total / len(values))
    for token, prompts in sorted(attention.items()):
        graph.add_edge(token, token[:2], kind="attention", count=len(prompts))

    traced = defaultdict(int)
    for l, h in zip(events.layer.tolist(), events.head.tolist()):
        traced[l, h] += 1
    graph.add_nodes_from(traced)
    for node in graph.nodes:
        if len(node) == 2:
            graph.nodes[node].update(kind="head", firing=int(firing_counts[node]), traced=traced[node])
        else:
            graph.nodes[node].update(kind="token")
    return graph
