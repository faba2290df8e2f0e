"""The processed-weights cache: a later load installs the weights compatibility mode computed (the same
model, number for number), and an entry that does not check out is discarded and processed afresh."""

from __future__ import annotations

import hashlib
import pickle
import zipfile

import pytest
import torch

from circuitlang.models.model import load_model
from circuitlang.cachefiles import CacheWarning, use_caches
from circuitlang.runner.cache import cache_usage
from circuitlang.models import conformance, weights_cache
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from circuitlang.models.model import _quiet
from tiny_models import build_gpt2, build_rotary


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


FAMILIES = ("gemma3", "llama", "neox", "gpt2")
PER_PART = {"gemma3", "llama"}  # RMSNorm models; the LayerNorm ones are processed whole
FAMILIES_ALL = conformance.FAMILIES


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("families")
    models = {f: build_rotary(root / f, gpt2_tokenizer, f, seed=5) for f in FAMILIES if f != "gpt2"}
    models["gpt2"] = build_gpt2(root / "gpt2", gpt2_tokenizer, n_layer=2, n_head=4, n_embd=64, seed=5, value_bias=0.3)
    return models


def boot(directory):
    from transformer_lens.model_bridge import TransformerBridge

    with _quiet():
        return TransformerBridge.boot_transformers(str(directory), device="cpu", dtype=torch.float32)


def whole(directory):
    bridge = boot(directory)
    with _quiet():
        bridge.enable_compatibility_mode()
    return bridge


def in_file_mapping(tensor, path):
    """Whether `tensor`'s memory lies in a mapping of the file `path` (Linux's /proc/self/maps)."""
    ptr = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def assert_same_bridge(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    tokens = torch.tensor([[464, 3290, 3332, 319, 262, 2603, 13, 1375]])
    with torch.inference_mode():
        assert torch.equal(a(tokens), b(tokens))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("columns", [24, 64])  # 24: slices of 24, 24 and 16 model dimensions
def test_processing_by_part_equals_whole_model_processing_bit_for_bit(family_models, family, columns, monkeypatch):
    monkeypatch.setattr(weights_cache, "COLUMNS", columns)
    bridge = boot(family_models[family])
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    with _quiet():
        used = weights_cache.process_by_part(bridge)
    assert used == (family in PER_PART)
    if not used:  # refused before touching anything
        after = bridge.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before) and not bridge.compatibility_mode
        with _quiet():
            bridge.enable_compatibility_mode()
    reference = whole(family_models[family])
    assert_same_bridge(bridge, reference)
    changed = [k for k in before if not torch.equal(before[k], bridge.state_dict()[k])]
    assert any(k.startswith("unembed.") for k in changed) and any(k.startswith("blocks.") for k in changed)


def records(path):
    """Each record of a file torch.save wrote: its name (less the archive's folder, named after the file), its
    CRC-32 and its bytes, read through zipfile, which checks every CRC; not torch's random serialization id."""
    with zipfile.ZipFile(path) as archive:
        return [(r.filename.split("/", 1)[1], r.CRC, archive.read(r)) for r in archive.infolist()
                if not r.filename.endswith("/.data/serialization_id")]


def assert_stored_by_part_as_saved(directory, processed, tmp_path):
    """An entry stored by part, from a fresh bridge, is the file torch.save writes of `processed` (the bridge
    processed by part), record for record, and the fresh bridge is left as booted. Where processing adds
    weights (Qwen 2's folded value biases), which no load could install, nothing is stored and the bridge is
    processed in place."""
    bridge = boot(directory)
    booted = {k: v.clone() for k, v in bridge.state_dict().items()}
    with _quiet():
        stored = weights_cache.process_weights(bridge, tmp_path / "by-part.pt")
    if processed.state_dict().keys() != booted.keys():
        assert not stored and not list(tmp_path.glob("*by-part.pt*")) and bridge.compatibility_mode
        assert_same_bridge(bridge, processed)
        return
    assert stored and not bridge.compatibility_mode
    assert all(torch.equal(booted[k], t) for k, t in bridge.state_dict().items())
    torch.save(processed.state_dict(), tmp_path / "saved.pt")
    assert records(tmp_path / "by-part.pt") == records(tmp_path / "saved.pt")


@pytest.mark.parametrize("family", sorted(PER_PART))
def test_an_entry_is_stored_by_part_as_torch_save_writes_the_processed_weights(family_models, family, tmp_path, monkeypatch):
    monkeypatch.setattr(weights_cache, "COLUMNS", 24)
    processed = boot(family_models[family])
    with _quiet():
        assert weights_cache.process_by_part(processed)
    assert_stored_by_part_as_saved(family_models[family], processed, tmp_path)


def test_an_entry_that_cannot_be_stored_by_part_leaves_the_weights_processed_in_place(family_models, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights_cache, "_set_crcs", full)  # the disk fills up once the weights are written
    with pytest.warns(CacheWarning, match="no space left on device"):  # said, though the load is kept quiet
        first = cached_load(family_models["gemma3"])
    assert not list((tmp_path / "cache" / "models").glob("*processed-*"))  # no entry, no temporary file
    assert first.bridge.compatibility_mode
    assert_same_bridge(first.bridge, whole(family_models["gemma3"]))


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_the_first_load_stores_and_runs_on_what_whole_model_processing_computes(family_models, family, tmp_path, processings):
    first = cached_load(family_models[family])
    assert len(processings) == (0 if family in PER_PART else 1)
    stored = torch.load(entry(tmp_path), weights_only=True)
    reference = whole(family_models[family]).state_dict()
    assert stored.keys() == reference.keys() and all(torch.equal(stored[k], reference[k]) for k in stored)
    # the first load already runs on the entry's mapped pages, as a later one does
    assert all(in_file_mapping(t, entry(tmp_path)) for t in first.bridge.state_dict().values())
    assert_same_bridge(first.bridge, whole(family_models[family]))
    again = cached_load(family_models[family])
    assert_same_bridge(again.bridge, first.bridge)


@pytest.mark.parametrize("family", FAMILIES_ALL)
def test_every_family_is_processed_as_transformer_lens_processes_it_whole(tmp_path, gpt2_tokenizer, family, monkeypatch):
    from circuitlang.models.conformance import build_family

    monkeypatch.setattr(weights_cache, "COLUMNS", 40)  # 40 and 24 columns of 64
    directory = build_family(tmp_path / family, gpt2_tokenizer, family, seed=2)
    bridge = boot(directory)
    with _quiet():
        used = weights_cache.process_by_part(bridge)
        if not used:
            bridge.enable_compatibility_mode()
    assert used == (bridge.cfg.normalization_type in ("RMS", "RMSPre") and not getattr(bridge.cfg, "num_experts", None)
                    and getattr(bridge.adapter, "supports_fold_ln", True)
                    and type(bridge.adapter).preprocess_weights is ArchitectureAdapter.preprocess_weights)
    assert used or family not in {"llama", "llama2", "mistral", "qwen2", "gemma3"}  # RMSNorm: by part
    assert_same_bridge(bridge, whole(directory))
    if used:
        assert_stored_by_part_as_saved(directory, bridge, tmp_path)
