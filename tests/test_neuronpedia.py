"""The attribution-graph export (`output ... neuronpedia`, `circ export neuronpedia`), read by its real
consumers: circuit-tracer's own pydantic models (`circuit_tracer.frontend.graph_models.Model`, from the pinned
wheel in a separate environment, since circuit-tracer pins transformers < 5) and Neuronpedia's graph JSON
schema (vendored in tests/data/neuronpedia), and checked against the trace it came from."""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from circuitlang.cli import main
from circuitlang.engine.results import BIAS, EMBED, MLP
from circuitlang.report.export import read_trace_json
from circuitlang.report.neuronpedia import DEFAULT_PROMPTS, cumulative_influence, slug_for
from tiny_models import build_gpt2

DATA = Path(__file__).resolve().parent / "data" / "neuronpedia"
# circuit-tracer's environment: .ci/run makes it and sets this (README, "Set-up").
CIRCUIT_TRACER = "CIRCUITLANG_CIRCUIT_TRACER_PYTHON"
# Neuronpedia's webapp types a node's qk_tracing_results so (apps/webapp/app/[modelId]/graph/graph-types.ts,
# CLTGraphNode); the vendored graph-schema.json leaves the field open, so its shape is checked here.
QK_SHAPE = {
    "type": "object",
    "required": ["pair_wise_contributors", "top_q_marginal_contributors", "top_k_marginal_contributors"],
    "properties": {
        "pair_wise_contributors": {"type": "array", "items": {
            "type": "array", "minItems": 3, "maxItems": 3,
            "items": [{"type": "string"}, {"type": "string"}, {"type": "number"}]}},
        **{key: {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                            "items": [{"type": "string"}, {"type": "number"}]}}
           for key in ("top_q_marginal_contributors", "top_k_marginal_contributors")},
    },
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, gpt2_tokenizer):
    """`circ run` of a 16-prompt IOI spec with every writer as a source, on a tiny model with biases."""
    root = tmp_path_factory.mktemp("neuronpedia")
    tiny = build_gpt2(root / "model", gpt2_tokenizer, n_layer=3, n_head=4, n_embd=64, seed=4, value_bias=0.05)
    spec = root / "tiny.circ"
    spec.write_text(f'model "{tiny}"\nprompts ioi 16 mixed seed 0\ntrace from auto 2\nfiring attention > 0.3\n'
                    f'sources heads mlp embed bias\nkeep mass 0.95\noutput "{root / "run"}" json neuronpedia\n')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIRCUITLANG_CACHE", str(root / "cache"))
        assert main(["run", str(spec), "--quiet", "--no-cache"]) == 0
    return root / "run"


def graphs(directory: Path) -> dict[str, dict]:
    index = json.loads((directory / "neuronpedia" / "graph-metadata.json").read_text())
    return {g["slug"]: json.loads((directory / "neuronpedia" / f"{g['slug']}.json").read_text()) for g in index["graphs"]}


def test_circ_run_writes_the_first_prompts_and_an_index(run_dir):
    trace = read_trace_json(run_dir / "trace.json")
    index = json.loads((run_dir / "neuronpedia" / "graph-metadata.json").read_text())
    traced = sorted(set(trace.events.prompt.tolist()))
    assert traced[0] > 0, "this tiny trace reaches no firing in prompt 0, which the default leaves out"
    assert [g["slug"] for g in index["graphs"]] == [slug_for(trace, p) for p in traced[:DEFAULT_PROMPTS]]
    for entry in index["graphs"]:  # what the local server's index page reads of each graph
        assert {"slug", "scan", "prompt", "prompt_tokens", "node_threshold"} <= set(entry)
        assert entry["scan"] == trace.model


# Run in circuit-tracer's environment: its local server serves the export directory, and every graph the index
# lists is fetched from it as the viewer fetches it and loaded with circuit-tracer's own Model.
SERVE_AND_LOAD = """
import gzip, json, sys, urllib.request
from circuit_tracer.frontend import serve
from circuit_tracer.frontend.graph_models import Model

server = serve(data_dir=sys.argv[1], port=0)
base = "http://127.0.0.1:%d" % server.httpd.server_address[1]
def get(path):
    with urllib.request.urlopen(base + path) as response:
        body = response.read()
        return gzip.decompress(body) if response.headers.get("Content-Encoding") == "gzip" else body
try:
    for entry in json.loads(get("/data/graph-metadata.json"))["graphs"]:
        m = Model.model_validate_json(get("/graph_data/%s.json" % entry["slug"]))
        print(json.dumps([m.metadata.slug, len(m.nodes), len(m.links), sum(l["weight"] for l in m.links)]))
finally:
    server.stop()
"""


def test_circuit_tracer_s_server_and_models_load_every_graph(run_dir):
    python = os.environ.get(CIRCUIT_TRACER)
    if not python:
        pytest.skip(f"set {CIRCUIT_TRACER} to a Python with circuit-tracer==0.5.0 (.ci/run makes one)")
    done = subprocess.run([python, "-c", SERVE_AND_LOAD, str(run_dir / "neuronpedia")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = {slug: (n, k, w) for slug, n, k, w in map(json.loads, done.stdout.splitlines())}
    exported = graphs(run_dir)
    assert list(loaded) == list(exported) and len(loaded) == DEFAULT_PROMPTS
    for slug, graph in exported.items():
        n, k, w = loaded[slug]
        assert (n, k) == (len(graph["nodes"]), len(graph["links"]))
        assert w == pytest.approx(sum(link["weight"] for link in graph["links"]))


def test_every_graph_meets_neuronpedia_s_schema(run_dir):
    schema = json.loads((DATA / "graph-schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    qk = jsonschema.Draft7Validator(QK_SHAPE)
    for graph in graphs(run_dir).values():
        assert not list(validator.iter_errors(graph))
        ids = {n["node_id"] for n in graph["nodes"]}
        assert len(ids) == len(graph["nodes"])
        assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
        for node in graph["nodes"]:
            if "qk_tracing_results" in node:
                assert not list(qk.iter_errors(node["qk_tracing_results"]))
                results = node["qk_tracing_results"]
                assert {i for i, _ in results["top_q_marginal_contributors"] + results["top_k_marginal_contributors"]} <= ids
    # a wrong graph is caught: the schema is not vacuous
    broken = next(iter(graphs(run_dir).values()))
    broken["nodes"][0].pop("ctx_idx")
    assert list(validator.iter_errors(broken))


def test_nodes_links_and_weights_are_the_trace_s(run_dir):
    trace = read_trace_json(run_dir / "trace.json")
    ev, ed = trace.events, trace.edges
    assert {MLP, EMBED, BIAS} <= set(ed.up_head.tolist()), "every kind of writer is in this trace"
    for graph in graphs(run_dir).values():
        nodes, p = graph["nodes"], graph["metadata"]["svt_prompt"]
        rows = np.flatnonzero(ed.prompt == p)
        token = np.where(ed.side == "d", ed.dest, ed.src)
        # One link per (upstream writer at the token it writes into, downstream head at its destination).
        pairs = defaultdict(list)
        for r in rows:
            up = (int(ed.up_layer[r]), int(ed.up_head[r]), int(token[r]))
            pairs[up, (int(ed.layer[r]), int(ed.head[r]), int(ed.dest[r]))].append(float(ed.contribution[r]))
        assert len(graph["links"]) == len(pairs)
        np.testing.assert_allclose(sorted(link["weight"] for link in graph["links"]),
                                   sorted(sum(c) for c in pairs.values()), rtol=1e-6, atol=1e-9)
        single = sorted(c[0] for c in pairs.values() if len(c) == 1)
        assert len(single) >= len(pairs) // 2
        # Nodes: a token per position, one logit, an attention node per head and destination that fired or wrote.
        mine = ev.prompt == p
        fired = set(zip(ev.layer[mine].tolist(), ev.head[mine].tolist(), ev.dest[mine].tolist()))
        writers = {(ul, uh, t) for (ul, uh, t), _ in pairs if uh >= 0}
        kinds = defaultdict(int)
        for node in nodes:
            kinds[node["feature_type"]] += 1
        assert kinds["embedding"] == len(trace.labels[p])
        assert kinds["logit"] == 1 and sum(n["is_target_logit"] for n in nodes) == 1
        assert kinds["lorsa"] == len(fired | writers)
        assert kinds["mlp reconstruction error"] == len({(ul, t) for (ul, uh, t), _ in pairs if uh == MLP})
        assert kinds["bias"] == len({(ul, t) for (ul, uh, t), _ in pairs if uh == BIAS})
        assert len(nodes) == sum(kinds.values())
        # Each attention node that fired: its firings, and its query/key contributions summing to its inputs.
        traced = [n for n in nodes if "svt_firings" in n]
        assert len(traced) == len(fired) and sum(len(n["svt_firings"]) for n in traced) == int(mine.sum())
        for node in traced:
            inputs = sum(link["weight"] for link in graph["links"] if link["target"] == node["node_id"])
            qk = node["qk_tracing_results"]
            marginal = sum(c for _, c in qk["top_q_marginal_contributors"] + qk["top_k_marginal_contributors"])
            assert marginal == pytest.approx(inputs, rel=1e-5, abs=1e-6)
            assert node["activation"] == pytest.approx(sum(f["attention"] for f in node["svt_firings"]))
            assert node["clerp"].startswith(f"{node['layer']}.")
        # influence: the links' weights propagated from the root firings (where the trace starts), as documented
        roots = [n["node_id"] for n in traced if any(f["root"] for f in n["svt_firings"])]
        expected = cumulative_influence([n["node_id"] for n in nodes], graph["links"], {r: 1 / len(roots) for r in roots})
        assert {n["node_id"]: n["influence"] for n in nodes} == pytest.approx(expected, rel=1e-6)
        assert all(0 < n["influence"] <= 1 for n in nodes)
        assert not roots or min(n["influence"] for n in nodes) < 1


def test_influence_is_the_cumulative_share_of_circuit_tracer_s_influence():
    # a <- b (2), a <- c (-2), b <- c (1); seed a. Raw: a 1, b 0.5, c 0.5 + 0.5 = 1.0, d 0 (unreached).
    links = [{"source": "b", "target": "a", "weight": 2.0}, {"source": "c", "target": "a", "weight": -2.0},
             {"source": "c", "target": "b", "weight": 1.0}]
    influence = cumulative_influence(["a", "b", "c", "d"], links, {"a": 1.0})
    assert influence == pytest.approx({"a": 0.4, "c": 0.8, "b": 1.0, "d": 1.0})


def test_circ_export_writes_any_prompt_and_keeps_the_index(run_dir, tmp_path, capsys):
    trace = read_trace_json(run_dir / "trace.json")
    out = tmp_path / "export"
    assert main(["export", "neuronpedia", str(run_dir), "--out", str(out), "--prompt", "11"]) == 0
    assert main(["export", "neuronpedia", str(run_dir / "trace.json"), "--out", str(out), "--prompt", "3"]) == 0
    assert list(graphs(out)) == [slug_for(trace, 3), slug_for(trace, 11)]
    assert main(["export", "neuronpedia", str(run_dir), "--out", str(out), "--prompt", "all", "--scan", "tiny-gpt2"]) == 0
    exported = graphs(out)
    assert len(exported) == len(trace.labels) == 16
    assert {g["metadata"]["scan"] for g in exported.values()} == {"tiny-gpt2"}
    # the same graph from the run and from its trace.json
    first = int(trace.events.prompt.min())
    from_run = graphs(run_dir)[slug_for(trace, first)]
    again = exported[slug_for(trace, first)]
    assert [n["node_id"] for n in again["nodes"]] == [n["node_id"] for n in from_run["nodes"]]
    np.testing.assert_allclose([link["weight"] for link in again["links"]], [link["weight"] for link in from_run["links"]],
                               rtol=1e-6)
    capsys.readouterr()
    assert main(["export", "neuronpedia", str(run_dir), "--out", str(out), "--prompt", "16"]) == 2
    assert "prompt 16 is out of range: the trace has prompts 0 to 15" in capsys.readouterr().err
    assert main(["export", "neuronpedia", str(tmp_path / "nothing")]) == 2
