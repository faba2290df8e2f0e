"""The Omega cache, `omega/<key>.pt` under the cache root: one layer's `OmegaSlices` (float64), so a run that
changes the spec but not the model skips the QR and SVDs (for rotary models one core SVD per head and
offset, about 1 s a layer for Gemma 3 270M on one core). The key hashes the layer's exact inputs, so no
model identity is needed and a dtype or device change cannot alias.

An entry is the tensor file and `<key>.sha256`, the digest of its bytes. It is mapped into memory only with
`torch.load(weights_only=True)` (plain tensors, never pickled objects), only when the digest matches,
and only when the tensors have the shapes the layer needs; anything else is discarded with a
`CacheWarning` and recomputed. Files are written beside their place and moved there in one step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import tempfile
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from circuitlang.cachefiles import caches_on, cache_root, discard, storing, verify_checked, write_checked
from circuitlang.engine.omega import OmegaSlices, layer_slices
from circuitlang.models.geometry import AttentionGeometry

ENGINE_VERSION = "3"  # bump whenever an engine change alters traces or Omega: every cached entry goes stale


def omega_dir() -> Path:
    return cache_root() / "omega"


# Outside `use_caches()` (--no-cache, the Python API) a run of several chunks keeps each layer's slices here,
# a temporary directory of its own, so that they are computed once per run, not once per chunk.
_scratch: ContextVar[Path | None] = ContextVar("circuitlang_omega_scratch", default=None)


@contextlib.contextmanager
def omega_scratch() -> Iterator[None]:
    """Inside the block, `cached_layer_slices` computes each layer once even with the caches off, keeping it
    in a temporary directory removed afterwards (the user's cache is neither read nor written)."""
    if caches_on() or _scratch.get() is not None:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="circuitlang-omega-") as directory:
        token = _scratch.set(Path(directory))
        try:
            yield
        finally:
            _scratch.reset(token)


def _layer_digest(geometry: AttentionGeometry, layer: int) -> str:
    g = geometry
    h = hashlib.sha256(f"{ENGINE_VERSION}\0{g.rotary}{chr(0) + 'interleaved' if g.interleaved else ''}".encode())
    for t in (g.W_Q[layer], g.b_Q[layer], g.W_K[layer], g.b_K[layer], g.q_gain[layer], g.k_gain[layer]):
        t = t.contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cached_layer_slices(geometry: AttentionGeometry, layer: int, cos: Tensor | None = None, sin: Tensor | None = None) -> OmegaSlices:
    """`layer_slices` through the Omega cache inside `use_caches()`, or a run's scratch copy (`omega_scratch`);
    computed otherwise.

    Rotary models: the cores for offsets 0..M-1 depend only on the first M rows of the rotary tables, so
    an entry keeps the most offsets computed so far with the tables it used, and a run with shorter prompts
    takes the first M cores when its tables equal those rows (longer prompts recompute and replace it).
    """
    directory = omega_dir() if caches_on() else _scratch.get()
    if directory is None:
        return layer_slices(geometry, layer, cos, sin)
    path = directory / f"{_layer_digest(geometry, layer)}.pt"
    offsets = len(cos) if geometry.rotary else 1
    try:
        if verify_checked(path):  # then mapped, not read: only the pages the trace touches come into memory
            saved = _validated(torch.load(path, mmap=True, weights_only=True), geometry, layer)
            tables_match = not geometry.rotary or (
                len(saved["cos"]) >= offsets and torch.equal(saved["cos"][:offsets], cos) and torch.equal(saved["sin"][:offsets], sin))
            if tables_match:
                return OmegaSlices(Q_a=saved["Q_a"], Q_b=saved["Q_b"], **{k: saved[k][:, :offsets] for k in ("U", "S", "V")})
    except Exception as err:  # noqa: BLE001 - any unreadable entry (torch raises many kinds) is recomputed
        discard(path, f"the Omega cache entry of layer {layer}", f"{type(err).__name__}: {err}".splitlines()[0][:160])
    slices = layer_slices(geometry, layer, cos, sin)
    buffer = io.BytesIO()
    torch.save({**{f.name: getattr(slices, f.name) for f in dataclasses.fields(slices)}, "cos": cos, "sin": sin}, buffer)
    with storing():
        write_checked(path, buffer.getvalue())
    return slices


def _validated(saved: object, geometry: AttentionGeometry, layer: int) -> dict:
    """The loaded dict if it holds float64 tensors of this layer's shapes; ValueError otherwise."""
    H, d, r = geometry.W_Q.shape[1:]
    if not isinstance(saved, dict):
        raise ValueError(f"expected a dict of tensors, found {type(saved).__name__}")
    want = {"Q_a": (H, d + 1, r), "Q_b": (H, d + 1, r), "U": (H, None, r, r), "S": (H, None, r), "V": (H, None, r, r)}
    for key, shape in want.items():
        t = saved.get(key)
        if not isinstance(t, Tensor) or t.dtype != torch.float64 or t.dim() != len(shape) or any(
                s is not None and s != t.shape[k] for k, s in enumerate(shape)):
            raise ValueError(f"{key} is not a float64 tensor of shape {shape}")
    if geometry.rotary and not all(isinstance(saved.get(k), Tensor) for k in ("cos", "sin")):
        raise ValueError("the rotary tables are missing")
    return saved
