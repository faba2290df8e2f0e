"""The rotary family (beyond the paper's GPT-2): per-offset Omega, GQA, RMSNorm, q/k norms, post-norms."""

from __future__ import annotations

import pytest
import torch

from circuitlang.data.ioi import ioi_prompts
from circuitlang.engine.forward import capture
from circuitlang.models.geometry import attention_geometry
from circuitlang.models.model import load_model
from circuitlang.engine.trace import decompose_layer, slices_for, trace
from circuitlang.lang.plan import SliceRule
from checks import assert_writers_complete, busiest_roots
from tiny_models import build_rotary

FAMILIES = ("llama", "neox", "gemma3")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory, gpt2_tokenizer):
    return load_model(str(build_rotary(tmp_path_factory.mktemp(request.param), gpt2_tokenizer, request.param)))


@pytest.fixture(scope="module")
def prompts(model, gpt2_tokenizer):
    return ioi_prompts(gpt2_tokenizer, n=8, seed=5, prepend_bos=model.prepend_bos)


@pytest.fixture(scope="module")
def acts(model, prompts):
    return capture(model, prompts, writers=True)


def test_geometry_reads_the_family(model):
    g = attention_geometry(model)
    family = model.bridge.original_model.config.model_type
    assert g.rotary
    assert g.has_qk_norm == g.has_post_norm == (family == "gemma3_text")
    if g.has_qk_norm:  # randomised gains, read through the norm itself: Gemma's are 1 + weight
        assert not torch.allclose(g.q_gain, torch.ones_like(g.q_gain))


def test_slice_terms_sum_to_the_models_score_for_every_pair(model, acts):
    geometry = attention_geometry(model)
    n = acts.tokens.shape[1]
    inside = torch.arange(n)[None, :] < acts.lengths[:, None]
    pairs = inside[:, None, :, None] & inside[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(model.n_layers):
        everything = pairs.expand(-1, model.n_heads, -1, -1)
        dec = decompose_layer(acts, slices_for(geometry, acts, layer), everything, layer, SliceRule("all"))
        raw = acts.scores[layer, dec.prompt, dec.head, dec.dest, dec.src] * model.attn_scale
        seen = raw.isfinite()  # Gemma's sliding-window layers mask pairs further apart than the window
        assert seen.float().mean() > 0.5
        terms, raw = dec.terms[seen].sum(-1), raw[seen]
        assert torch.allclose(terms, raw, rtol=1e-4, atol=1e-4 * raw.abs().max())


def test_omega_depends_on_the_offset(model, acts):
    s = slices_for(attention_geometry(model), acts, 1)
    assert s.offsets == acts.tokens.shape[1]
    assert not torch.allclose(s.S[:, 0], s.S[:, 3])


def test_all_writers_sum_to_the_signal_projection(model, acts, prompts):
    roots = busiest_roots(acts, prompts, model.n_layers - 1, distinct=False)
    t = trace(model, prompts, roots, activations=acts)
    assert len(t.edges) > 0
    assert_writers_complete(model, acts, t.events)
