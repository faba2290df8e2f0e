"""The trace graph drawn as in the paper's Fig. 5: heads are ovals, tokens are boxes, blue edges run into
source tokens and red ones into destination tokens, width is the accumulated contribution, darker heads
fired more often in the trace, known circuit heads have green borders, rare edges are left out."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import graphviz

from circuitlang.engine.results import BIAS, EMBED, MLP, Trace, writer_label
from circuitlang.atomic import atomic_write
from circuitlang.report.export import Head, counted, edge_filter, roots_summary

DRAWING_FORMATS = ("dot", "svg", "png")
SIDE_COLOURS = {"s": "#1f5fbf", "d": "#c8102e"}  # Fig. 5: blue into a source token, red into a destination
ATTENTION_COLOUR = "#8a8a8a"
KNOWN_BORDER = "green"
KNOWN_TEXT = "forestgreen"  # the legend's words in a green that reads on white
PENWIDTH = (0.5, 6.0)
LIGHT, DARK = (0xEE, 0xF2, 0xF8), (0x12, 0x2F, 0x5C)  # head fill from few to many traced events
NO_DOT = ("Graphviz's `dot` program was not found, so only {dot} was written. Install Graphviz "
          "(`apt-get install graphviz`, `brew install graphviz`) to draw {images}.")


class Drawing(NamedTuple):
    paths: list[Path]
    message: str | None  # why an asked-for image was not drawn, if one was not


def shade(fraction: float) -> tuple[str, str]:
    """Fill colour shaded by `fraction` in [0, 1] and a font colour readable on it."""
    rgb = [round(a + (b - a) * fraction) for a, b in zip(LIGHT, DARK)]
    return "#{:02x}{:02x}{:02x}".format(*rgb), "white" if fraction > 0.5 else "black"


def _title(trace: Trace, min_count: int, known: bool = False) -> str:
    """An HTML-like label: model, prompts, roots, filter, and the legend of Fig. 5's encoding (the green
    border only when known heads are marked)."""
    c, e = trace.config, html.escape
    s, d = SIDE_COLOURS["s"], SIDE_COLOURS["d"]
    rows = [
        f"<b>{e(trace.model)}</b>  ·  {e(trace.prompts)}",
        f"roots: {e(roots_summary(trace).splitlines()[0])}",
        f"edges of count ≥ {min_count} ({e(counted(trace))})  ·  threshold {c.threshold}  ·  mass {c.mass}  ·  slices {e(c.slices)}",
        f'<font color="{s}">━ into a source token (s)</font>   <font color="{d}">━ into a destination token (d)</font>'
        f'   <font color="{ATTENTION_COLOUR}">━ attention</font>',
        'width: accumulated contribution  ·  darker: more events traced'
        + (f'  ·  <font color="{KNOWN_TEXT}">green border: known head</font>' if known else ""),
    ]
    return "<" + '<table border="0" cellspacing="1">' + "".join(f'<tr><td align="left">{r}</td></tr>' for r in rows) + "</table>>"


def digraph(name: str, title: str) -> graphviz.Digraph:
    """An empty top-to-bottom DOT graph in the drawing's style, titled by the HTML-like label `title`."""
    return graphviz.Digraph(name, graph_attr={
        "rankdir": "TB", "label": title, "labelloc": "t", "labeljust": "l", "fontname": "Helvetica",
        "fontsize": "12", "nodesep": "0.25", "ranksep": "0.4", "bgcolor": "white", "pad": "0.3",
    }, node_attr={"fontname": "Helvetica", "fontsize": "11"}, edge_attr={"arrowsize": "0.6"})


def head_label(n: tuple) -> str:
    """A head as the paper writes it, `layer.head` (`9.6`), as token boxes (`9.6 end`) and the tables do;
    a writer node of `sources` as `mlp 5`, `bias 3`, `embed`."""
    return writer_label(n)


# Writer nodes of `sources` (not heads): a shape of their own each, unfilled, so they never read as heads.
WRITER_SHAPES = {MLP: "box3d", BIAS: "diamond", EMBED: "invhouse"}


def writer_attrs(n: tuple) -> dict:
    return {"label": writer_label(n), "shape": WRITER_SHAPES[n[1]], "color": "#7a5c00", "fontcolor": "#7a5c00",
            "tooltip": {MLP: f"the MLP of layer {n[0]}", BIAS: f"the attention output bias b_O of layer {n[0]}",
                        EMBED: "the embeddings"}[n[1]]}


def token_attrs(n: tuple) -> dict:
    """DOT attributes of the box of token node (layer, head, role)."""
    return {"label": graphviz.escape(f"{n[0]}.{n[1]} {n[2]}"), "shape": "box", "style": "rounded", "fontsize": "10",
            "height": "0.3", "color": "#555555", "tooltip": graphviz.escape(f"token {n[2]} of head {n[0]}.{n[1]}")}


def layered_nodes(dot: graphviz.Digraph, nodes: Iterable[tuple], style: Callable[[tuple], dict]) -> dict[tuple, str]:
    """Add head and token `nodes` to `dot`, each with the attributes `style(node)`; return their DOT ids.

    Layers top to bottom (layer 0 at the top): per layer a row of token boxes above a row of head ovals,
    each row rank=same with an axis node, the axis chained so rows keep their order even without edges.
    """
    nodes = sorted(nodes)
    # DOT ids: a role may hold any character (a ':' would name a port), so token boxes are numbered.
    ids = {n: (f"h{n[0]}_{n[1]}" if n[1] >= 0 else f"w{k}") if len(n) == 2 else f"t{n[0]}_{n[1]}_{k}" for k, n in enumerate(nodes)}
    axis = []
    for layer in sorted({n[0] for n in nodes}):
        for row, members in (("tokens", [n for n in nodes if n[0] == layer and len(n) == 3]),
                             ("heads", [n for n in nodes if n[0] == layer and len(n) == 2])):
            if not members:
                continue
            with dot.subgraph(name=f"layer{layer}_{row}") as s:
                s.attr(rank="same")
                axis.append(f"axis{layer}_{row}")
                s.node(axis[-1], label=("embeddings" if layer < 0 else f"layer {layer}") if row == "heads" else "", shape="plaintext",
                       fontcolor="#666666", width="0", height="0")
                for n in members:
                    s.node(ids[n], **style(n))
    for upper, lower in zip(axis, axis[1:]):
        dot.edge(upper, lower, style="invis", weight="100")
    return ids


def build_dot(trace: Trace, min_count: int = 1, known: Iterable[Head] = ()) -> graphviz.Digraph:
    """The DOT graph of the trace's edges seen in >= min_count prompts; nodes and edges in sorted order."""
    g = edge_filter(trace.graph, min_count)
    known = set(known)
    dot = digraph("trace", _title(trace, min_count, bool(known)))
    traced = [g.nodes[n]["traced"] for n in g.nodes if len(n) == 2 and n[1] >= 0]
    most = math.log1p(max(traced, default=1))

    def style(n: tuple) -> dict:
        if len(n) == 3:
            return token_attrs(n)
        if n[1] < 0:
            return writer_attrs(n)
        fill, font = shade(math.log1p(g.nodes[n]["traced"]) / most if most else 0.0)
        border = {"color": KNOWN_BORDER, "penwidth": "3"} if n[:2] in known else {"color": "#444444", "penwidth": "1"}
        return {"label": head_label(n), "shape": "ellipse", "style": "filled", "fillcolor": fill, "fontcolor": font,
                "tooltip": f"head {n[0]}.{n[1]}: {g.nodes[n]['traced']} events traced, {g.nodes[n]['firing']} firings", **border}

    ids = layered_nodes(dot, g.nodes, style)

    comm = [(u, v, d) for u, v, d in g.edges(data=True) if d["kind"] == "communication"]
    heaviest = max((max(d["total"], 0.0) for _, _, d in comm), default=0.0) or 1.0
    lo, hi = PENWIDTH
    for u, v, d in sorted(g.edges(data=True), key=lambda e: e[:2]):
        if d["kind"] == "attention":
            dot.edge(ids[u], ids[v], color=ATTENTION_COLOUR, penwidth="0.8", arrowsize="0.5",
                     tooltip=f"attention, {d['count']} prompts")
            continue
        width = lo + (hi - lo) * max(d["total"], 0.0) / heaviest
        dot.edge(ids[u], ids[v], color=SIDE_COLOURS[d["type"]], penwidth=f"{width:.2f}",
                 tooltip=graphviz.escape(f"{writer_label(u)} -> {v[0]}.{v[1]} {v[2]} ({d['type']}): {d['count']} prompts, "
                                         f"total {d['total']:.3g}, mean {d['mean']:.3g}"))
    return dot


def write_drawing(trace: Trace, directory: str | os.PathLike, stem: str, formats: Iterable[str],
                  min_count: int = 1, known: Iterable[Head] = ()) -> Drawing:
    """Write `stem`.dot whenever a drawing format is asked, and .svg / .png rendered by Graphviz's `dot`.

    Without the `dot` program the .dot file is still written and `message` says how to install Graphviz.
    """
    formats = set(formats)
    if not formats & set(DRAWING_FORMATS):
        return Drawing([], None)
    return render_dot(build_dot(trace, min_count, known), directory, stem, formats)


def render_dot(dot: graphviz.Digraph, directory: str | os.PathLike, stem: str, formats: Iterable[str]) -> Drawing:
    """Write `stem`.dot and the images among `formats` (svg, png), atomically; see `write_drawing`."""
    source = dot.source
    directory = Path(directory)
    paths = [atomic_write(directory / f"{stem}.dot", source)]
    images = [f for f in DRAWING_FORMATS[1:] if f in formats]
    try:
        for fmt in images:
            paths.append(atomic_write(directory / f"{stem}.{fmt}", graphviz.Source(source).pipe(format=fmt)))
    except graphviz.ExecutableNotFound:
        return Drawing(paths, NO_DOT.format(dot=paths[0].name, images=" and ".join(f".{f}" for f in images)))
    return Drawing(paths, None)
