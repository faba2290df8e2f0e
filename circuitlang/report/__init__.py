"""The report layer: reads a Trace (never the model, never torch) and writes trace.json, GraphML, the
drawing of Fig. 5 and the Rich report. Every file goes through an atomic write."""

from circuitlang.atomic import atomic_path, atomic_write
from circuitlang.report.draw import DRAWING_FORMATS, Drawing, build_dot, write_drawing
from circuitlang.report.export import (
    edge_filter,
    graph_heads,
    known_head_set,
    precision_recall,
    read_trace_json,
    trace_to_dict,
    write_graphml,
    write_trace_json,
)
from circuitlang.report.tables import render_report

__all__ = [
    "DRAWING_FORMATS", "Drawing", "atomic_path", "atomic_write", "build_dot", "edge_filter", "graph_heads",
    "known_head_set", "precision_recall", "read_trace_json", "render_report", "trace_to_dict", "write_drawing",
    "write_graphml", "write_trace_json",
]
