"""The embedded real model, Gemma 3 270M, end to end on 16 IOI prompts (issue: a real model offline).

Builds the float32 copy on first use (about a minute and 1.8 GB of memory on 2 cores) under
$CIRCUITLANG_CACHE, or a temporary directory when that is not set.
"""

from __future__ import annotations

import pytest
import torch

from circuitlang.data.ioi import ioi_prompts
from circuitlang.engine import decompose as dc
from circuitlang.cachefiles import CACHE_ENV
from circuitlang.models.embedded import resolve_embedded
from circuitlang.engine.forward import capture
from circuitlang.models.geometry import attention_geometry
from circuitlang.models.model import load_model
from circuitlang.runner.execute import choose_roots
from circuitlang.engine.trace import decompose_layer, slices_for, trace
from circuitlang.lang.plan import SliceRule
from circuitlang.report.tables import exactness_line
from circuitlang.report import trace_to_dict
from circuitlang.report.export import dumps
from checks import assert_writers_complete, positions_run


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    import os

    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get(CACHE_ENV):
            patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        return load_model(resolve_embedded("gemma-3-270m"))


@pytest.fixture(scope="module")
def prompts(gemma):
    return ioi_prompts(gemma.tokenizer, n=16, prepend_bos=True)


@pytest.fixture(scope="module")
def acts(gemma, prompts):
    return capture(gemma, prompts, writers=True, batch_size=16)


def test_shape_and_task(gemma, acts):
    assert (gemma.n_layers, gemma.n_heads, gemma.d_model, gemma.d_head) == (18, 4, 640, 256)
    assert gemma.attn_scale == 16.0 and gemma.prepend_bos
    # Gemma 3 270M does IOI: the IO-minus-S logit difference is positive on (nearly) every prompt.
    assert (acts.logit_diff > 0).float().mean() >= 0.9 and acts.logit_diff.mean() > 2.0


def test_slice_terms_sum_to_the_score_for_every_firing_on_every_layer(gemma, acts):
    geometry = attention_geometry(gemma)
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, 0.5)
    for layer in range(gemma.n_layers):
        dec = decompose_layer(acts, slices_for(geometry, acts, layer), fires[layer], layer, SliceRule())
        raw = acts.scores[layer, dec.prompt, dec.head, dec.dest, dec.src] * gemma.attn_scale
        assert len(raw) > 0
        assert torch.allclose(dec.terms.sum(-1), raw, rtol=1e-4, atol=1e-4 * raw.abs().max())


def test_trace_is_complete_non_empty_and_byte_identical(gemma, prompts, acts):
    roots = [c.root for c in choose_roots(gemma, acts, prompts, k=3, threshold=0.5)]
    first = trace(gemma, prompts, roots, activations=acts)
    assert first.graph.number_of_edges() > 0 and len(first.events) > len(roots)
    assert_writers_complete(gemma, acts, first.events)
    exact = trace_to_dict(first)["exactness"]  # what every run's trace.json reports and the report prints
    assert exact["events"] == len(first.events) and exact["max_relative_residual"] <= 1e-4 and "unattributed_position_term" not in exact
    assert "of the largest score" in exactness_line(first)
    second = trace(gemma, prompts, roots, activations=capture(gemma, prompts, batch_size=16))
    assert dumps(trace_to_dict(first)) == dumps(trace_to_dict(second))


def test_f_is_the_models_logit_difference_and_partial_interventions_equal_whole_passes(gemma, prompts, acts, monkeypatch):
    """F(X) from two unembedding columns equals the full logits' difference; the interventions of
    specs/ioi.circ, run from each variant's first changed layer and, after the clean keys and values, from
    its first changed position (the last token: the edges are `at end`), equal passes through the whole model."""
    from circuitlang.engine.intervene import run_interventions
    from circuitlang.lang.plan import EdgeSelector, InterventionSet

    with torch.inference_mode():
        logits = gemma.bridge(acts.tokens)
    rows = torch.arange(len(prompts))
    last = logits[rows, acts.lengths - 1]
    answers = torch.tensor([(p.target, p.distractor) for p in prompts])
    full = last[rows, answers[:, 0]] - last[rows, answers[:, 1]]
    torch.testing.assert_close(acts.logit_diff, full, rtol=1e-4, atol=1e-4)

    roots = [c.root for c in choose_roots(gemma, acts, prompts, k=3, threshold=0.3)]
    t = trace(gemma, prompts, roots, threshold=0.3, activations=acts)
    sets = [InterventionSet("into the strongest root", (EdgeSelector("into", root=1, role="end"),), random_control=True)]
    calls = positions_run(monkeypatch)
    partial = run_interventions(gemma, prompts, t, sets, roots, seed=0)
    # calls[0]: the capture. Each pass resumes at its prompts' last token and runs to the capture's length.
    ends = {acts.tokens.shape[1] - (length - 1) for length in acts.lengths.tolist()}
    assert {resumed for *_, resumed in calls[1:]} == {True} and {positions for _, positions, _ in calls[1:]} <= ends
    whole = run_interventions(gemma, prompts, t, sets, roots, seed=0, partial=False)
    assert len(partial.rows) == 8 * partial.sets[0].n_prompts > 0
    for f in ("f_after", "score_before", "score_after", "cosine", "norm_ratio"):
        torch.testing.assert_close(torch.from_numpy(getattr(partial.rows, f)), torch.from_numpy(getattr(whole.rows, f)),
                                   rtol=1e-4, atol=1e-4, equal_nan=True)


def test_writers_beyond_heads_on_gemma(gemma, prompts, acts):
    """`sources heads mlp embed bias` on the real model: MLP writer nodes, every event's signal split by
    class and summing to the signal (MLPs checked against their own writes), the same numbers twice."""
    import numpy as np

    from circuitlang.engine.results import MLP, WRITER_CLASSES
    from circuitlang.engine.trace import writer_contributions

    roots = [c.root for c in choose_roots(gemma, acts, prompts, 2, 0.3)]
    runs = [trace(gemma, prompts, roots, 0.3, writers=("heads", "mlp", "embed", "bias"), activations=acts) for _ in range(2)]
    t = runs[0]
    assert (t.edges.up_head == MLP).any() and any(t.graph.nodes[n]["kind"] == "mlp" for n in t.graph.nodes)
    assert np.array_equal(t.edges.contribution, runs[1].edges.contribution)
    signal = t.events.signal_dest
    assert np.isfinite(t.events.split_dest).all()
    np.testing.assert_allclose(t.events.split_dest.sum(1), signal, rtol=1e-4, atol=1e-4 * np.abs(signal).max())
    mlp = sum(v for k, v in writer_contributions(acts, attention_geometry(gemma), t.events, "d").items() if k.startswith("mlp"))
    np.testing.assert_allclose(t.events.split_dest[:, WRITER_CLASSES.index("mlp")], mlp, atol=1e-3 * np.abs(signal).max())


def test_every_quantization_of_the_embedded_file_dequantizes_in_slices_as_whole(tmp_path, monkeypatch):
    """The conversion dequantizes each tensor a slice of rows at a time (models/embedded.py): exact for each
    kind the packaged file holds (Q4_K and Q6_K blocks are 256 values; quantizing them needs llama.cpp)."""
    import importlib

    import numpy as np
    from gguf import GGUFReader, dequantize

    from circuitlang.models import embedded

    package = importlib.import_module(embedded.EMBEDDED["gemma-3-270m"].module)
    reader = GGUFReader(package.assemble(tmp_path / package.MODEL_NAME))
    smallest = {}
    for tensor in reader.tensors:
        best = smallest.get(tensor.tensor_type)
        if tensor.data.ndim == 2 and (best is None or tensor.data.nbytes < best.data.nbytes):
            smallest[tensor.tensor_type] = tensor
    assert {kind.name for kind in smallest} >= {"Q4_K", "Q6_K", "Q8_0", "Q5_0"}
    monkeypatch.setattr(embedded, "ROWS", 7)
    for kind, tensor in smallest.items():
        sliced = embedded._dequantized(tensor)
        assert sliced.shape[0] > 7 and np.array_equal(sliced, dequantize(tensor.data, kind)), kind.name
