"""Aggregate traced edges over prompts into the trace graph of Fig. 5."""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
import numpy as np

from circuitlang.engine.results import WRITER_CODES, TracedEdges, TracedEvents


def aggregate(events: TracedEvents, edges: TracedEdges, labels: tuple[tuple[str, ...], ...], firing_counts: np.ndarray,
              root_rows: list[list[int]] | None = None) -> nx.DiGraph:
    """Head nodes (layer, head), writer nodes (layer, MLP / BIAS / EMBED) with `sources`, token nodes
    (layer, head, role); communication and attention edges.

    A token node names the token an upstream writer writes into by its role label in that prompt, so
    prompts of different templates aggregate. An edge counts once per prompt however many events or
    roots reach it (as the paper's graph does); its per-prompt contribution is the sum over that
    prompt's events, `total` sums prompts and `mean` = total / count. `type` is the side ("s"/"d") the
    edge was traced through in more prompts ("s" on a tie), whatever the order of the rows.

    root_rows (per prompt, the root events in the roots' order) counts as the authors' graph code does
    instead (`readings ... count events`, see `authors_counts`).
    """
    if root_rows is not None:
        return _with_nodes(authors_counts(events, edges, labels, root_rows), events, firing_counts)
    per_prompt: dict[tuple, float] = defaultdict(float)
    sides: dict[tuple, dict[str, set[int]]] = defaultdict(lambda: {"s": set(), "d": set()})
    for p, ul, uh, l, h, t, side, c in zip(
        edges.prompt.tolist(), edges.up_layer.tolist(), edges.up_head.tolist(), edges.layer.tolist(),
        edges.head.tolist(), edges.token.tolist(), edges.side.tolist(), edges.contribution.tolist(),
    ):
        key = ((ul, uh), (l, h, labels[p][t]))
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
    return _with_nodes(graph, events, firing_counts)


def _with_nodes(graph: nx.DiGraph, events: TracedEvents, firing_counts: np.ndarray) -> nx.DiGraph:
    """Every traced head as a node, with its firing and traced counts and its signal's split by writer class."""
    traced = defaultdict(int)
    for l, h in zip(events.layer.tolist(), events.head.tolist()):
        traced[l, h] += 1
    graph.add_nodes_from(traced)
    for node in graph.nodes:
        if len(node) == 3:
            graph.nodes[node].update(kind="token")
        elif node[1] < 0:
            graph.nodes[node].update(kind=WRITER_CODES[node[1]])
        else:
            graph.nodes[node].update(kind="head", firing=int(firing_counts[node]), traced=traced[node])
    return graph


def authors_counts(events: TracedEvents, edges: TracedEdges, labels: tuple[tuple[str, ...], ...],
                   root_rows: list[list[int]]) -> nx.DiGraph:
    """Communication and attention edges counted as the authors' graph code counts them (reading (d)).

    Their walk is not memoised, so an event is visited once per path from a root (`visits`), and their
    graph keeps the prompt an edge was first seen in without ever updating it: every visit in a later
    prompt adds one to `count` and its contribution to `total`, while the first prompt adds only its first
    visit in walk order (`_walk_order`), whose side is the edge's `type`. An attention edge counts the
    counts of the communication edges into its token node.
    """
    E = len(events)
    visits = np.zeros(E, dtype=np.int64)
    for rows in root_rows:
        for e in rows:
            visits[e] += 1
    token = edges.token
    children = defaultdict(list)  # (prompt, layer, head, dest) -> the event rows of those firings, src ascending
    for e in sorted(range(E), key=lambda e: events.src[e]):
        children[events.prompt[e], events.layer[e], events.head[e], events.dest[e]].append(e)
    # per event, its edge rows in the order their walk lists them: the s side, then d, each by (layer, head)
    walked = defaultdict(list)
    for k in np.lexsort((edges.up_head, edges.up_layer, edges.side != "s", edges.event)).tolist():
        walked[edges.event[k]].append(k)
    # each kept head's firings on the edge's token: where the walk goes from an edge row (none for a writer)
    below = {k: children[edges.prompt[k], edges.up_layer[k], edges.up_head[k], token[k]] if edges.up_head[k] >= 0 else []
             for k in range(len(edges))}
    for e in np.argsort(-events.layer, kind="stable"):  # parents before children: upstream is lower
        for k in walked[e]:
            for child in below[k]:
                visits[child] += visits[e]

    key_of = lambda k: ((int(edges.up_layer[k]), int(edges.up_head[k])),  # noqa: E731
                        (int(edges.layer[k]), int(edges.head[k]), labels[edges.prompt[k]][token[k]]))
    first: dict[tuple, tuple[int, float, str]] = {}  # edge -> (its first prompt, first contribution, side)
    for prompt, rows in enumerate(root_rows):
        for e in _walk_order(rows, walked, below):
            for k in walked[e]:
                first.setdefault(key_of(k), (prompt, float(edges.contribution[k]), str(edges.side[k])))
    count = {key: 1 for key in first}
    total = {key: c for key, (_, c, _) in first.items()}
    for k in range(len(edges)):
        key = key_of(k)
        if edges.prompt[k] != first[key][0]:
            count[key] += int(visits[edges.event[k]])
            total[key] += float(visits[edges.event[k]] * edges.contribution[k])
    graph = nx.DiGraph()
    attention: dict[tuple, int] = defaultdict(int)
    for key in sorted(first):
        graph.add_edge(*key, kind="communication", type=first[key][2], count=count[key], total=total[key],
                       mean=total[key] / count[key])
        attention[key[1]] += count[key]
    for token, n in sorted(attention.items()):
        graph.add_edge(token, token[:2], kind="attention", count=n)
    return graph


def _walk_order(roots: list[int], walked: dict[int, list[int]], below: dict[int, list[int]]) -> list[int]:
    """The events of one prompt in the order the authors' depth-first walk first reaches them: the roots in
    order; from an event, its edge rows as `walked` orders them (the s side's heads by layer and head, then
    the d side's), each one's firings on that token (`below`, by src)."""
    seen: set[int] = set()
    order: list[int] = []
    stack = list(reversed(roots))
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        order.append(e)
        stack += reversed([child for k in walked[e] for child in below[k]])
    return order
