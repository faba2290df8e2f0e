"""The processed-weights cache: a later load installs the weights compatibility mode computed (the same
model, number for number), and an entry that does not check out is discarded and processed afresh."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from circuitlang.models.model import load_model
from circuitlang.cachefiles import CacheWarning, use_caches
from circuitlang.runner.cache import cache_usage
from tiny_models import build_gpt2


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tokenizer):
    return build_gpt2(tmp_path_factory.mktemp("weights") / "tiny", gpt2_tokenizer, n_layer=2, n_head=4, n_embd=64, seed=3)


@pytest.fixture
def processings(monkeypatch):
    """How many times TransformerLens processed weights."""
    from transformer_lens.model_bridge.transformer_bridge import TransformerBridge

    calls, original = [], TransformerBridge.process_weights

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TransformerBridge, "process_weights", counted)
    return calls


def cached_load(directory):
    with use_caches():
        return load_model(str(directory))


def assert_same_model(a, b):
    sa, sb = a.bridge.state_dict(), b.bridge.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    tokens = torch.tensor([[464, 3290, 3332, 319, 262, 2603, 13, 1375]])
    with torch.inference_mode():
        assert torch.equal(a.bridge(tokens), b.bridge(tokens))


def entry(tmp_path):
    found = sorted((tmp_path / "cache" / "models").glob("processed-*.pt"))
    assert len(found) == 1
    return found[0]


def test_a_later_load_installs_the_cached_weights(tiny, tmp_path, processings):
    reference = load_model(str(tiny))  # outside use_caches(): processed, nothing written
    assert len(processings) == 1 and not (tmp_path / "cache").exists()
    first = cached_load(tiny)
    assert len(processings) == 2 and entry(tmp_path).with_name(entry(tmp_path).name + ".sha256").exists()
    assert cache_usage()["models"][0] == 1
    again = cached_load(tiny)
    assert len(processings) == 2, "the second load must not process the weights"
    assert_same_model(again, reference)
    assert_same_model(first, reference)


@pytest.mark.parametrize("damage", ["edit", "truncate", "pickle", "shape"])
def test_a_bad_entry_is_discarded_and_processed_afresh(tiny, tmp_path, processings, damage):
    reference = load_model(str(tiny))
    cached_load(tiny)
    path = entry(tmp_path)
    marker = tmp_path / "pwned"
    if damage == "edit":  # one byte changed: only the checksum notices
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:  # a matching checksum: what the file holds is checked too
        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        if damage == "pickle":
            data = pickle.dumps({"embed.weight": Evil()}, protocol=2)
        else:
            import io

            saved = torch.load(path, weights_only=True)
            saved[next(iter(saved))] = torch.zeros(3)
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            data = buffer.getvalue()
        path.write_bytes(data)
        path.with_name(path.name + ".sha256").write_text(hashlib.sha256(data).hexdigest())
    with pytest.warns(CacheWarning, match="discarded the processed weights"):
        again = cached_load(tiny)
    assert not marker.exists(), "torch.load must read plain tensors only"
    assert len(processings) == 3
    assert_same_model(again, reference)
    cached_load(tiny)  # stored afresh, and used
    assert len(processings) == 3
