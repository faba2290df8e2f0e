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
from circuitlang.engine.omega import OmegaSlices, layer_qk, layer_slices, omega_bases, pair_cores, pair_key, rotation_matrices
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


PAIR_BATCH = 64  # (head, offset) cores per batch of SVDs and per cache shard (~67 MB of float64 for d_head 256)


def cached_pair_slices(geometry: AttentionGeometry, layer: int, heads: Tensor, offsets: Tensor, cos: Tensor, sin: Tensor,
                       dtype: torch.dtype = torch.float64) -> OmegaSlices:
    """Omega's slices of rotary `layer` with cores for the (head, offset) pairs of events heads, offsets [E] only
    (`OmegaSlices.pairs`), in `dtype`: computed in float64 in batches, through the cache inside `use_caches()`.

    The cache keeps a layer's bases once (`omega/<key>/bases.pt`) and its cores per (head, offset) in shards
    of at most PAIR_BATCH (`cores-*.pt`, each with the rotary table rows it used): any prompt reuses the cores
    any other computed for the same offsets, whatever their lengths.
    """
    keys = pair_key(heads, offsets).unique()
    h, m = keys >> 32, keys & 0xFFFFFFFF
    where = omega_dir() / _layer_digest(geometry, layer) if caches_on() else None
    Q_a, R_a, Q_b, R_b = _bases(geometry, layer, where)
    K, r = len(keys), R_a.shape[-1]
    U, V, S = torch.empty(1, K, r, r, dtype=dtype), torch.empty(1, K, r, r, dtype=dtype), torch.empty(1, K, r, dtype=dtype)
    found = torch.zeros(K, dtype=torch.bool)
    for shard in sorted(where.glob("cores-*.pt")) if where is not None and K else ():
        try:
            if not verify_checked(shard):
                continue
            saved = _validated_shard(torch.load(shard, mmap=True, weights_only=True), r, cos.shape[-1])
        except Exception as err:  # noqa: BLE001 - any unreadable shard (torch raises many kinds) is recomputed
            discard(shard, f"an Omega cache shard of layer {layer}", f"{type(err).__name__}: {err}".splitlines()[0][:160])
            continue
        at = torch.searchsorted(keys, saved["keys"]).clamp(max=K - 1)
        use = (keys[at] == saved["keys"]) & ~found[at]
        use &= (saved["cos"] == cos[m[at]]).all(-1) & (saved["sin"] == sin[m[at]]).all(-1)  # the same rotary tables
        rows, at = use.nonzero().flatten(), at[use]
        U[0, at], S[0, at], V[0, at] = saved["U"][rows].to(dtype), saved["S"][rows].to(dtype), saved["V"][rows].to(dtype)
        found[at] = True
    missing = (~found).nonzero().flatten()
    for batch in missing.split(PAIR_BATCH) if len(missing) else ():
        rotations = rotation_matrices(cos[m[batch]], sin[m[batch]], r, geometry.interleaved)
        u, s, v = pair_cores(R_a[h[batch]], R_b[h[batch]], rotations)
        U[0, batch], S[0, batch], V[0, batch] = u.to(dtype), s.to(dtype), v.to(dtype)
        if where is not None:
            shard = {"keys": keys[batch], "cos": cos[m[batch]], "sin": sin[m[batch]], "U": u, "S": s, "V": v}
            name = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in (keys[batch], shard["cos"], shard["sin"]))).hexdigest()[:32]
            _save(where / f"cores-{name}.pt", shard)
    return OmegaSlices(Q_a=Q_a.to(dtype), Q_b=Q_b.to(dtype), U=U, S=S, V=V, pairs=keys)


def _bases(geometry: AttentionGeometry, layer: int, where: Path | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The layer's Q_a, R_a, Q_b, R_b: cached once per layer (the cached cores were computed from them, so new
    bases drop the layer's shards)."""
    if where is not None:
        path = where / "bases.pt"
        try:
            if verify_checked(path):
                saved = torch.load(path, mmap=True, weights_only=True)
                H, d, r = geometry.W_Q.shape[1:]
                shapes = {"Q_a": (H, d + 1, r), "R_a": (H, r, r), "Q_b": (H, d + 1, r), "R_b": (H, r, r)}
                if not isinstance(saved, dict) or any(not isinstance(saved.get(k), Tensor) or saved[k].shape != s or saved[k].dtype != torch.float64
                                                      for k, s in shapes.items()):
                    raise ValueError("it does not hold float64 bases of this layer's shapes")
                return saved["Q_a"], saved["R_a"], saved["Q_b"], saved["R_b"]
        except Exception as err:  # noqa: BLE001 - as for the shards
            discard(path, f"the Omega bases of layer {layer}", f"{type(err).__name__}: {err}".splitlines()[0][:160])
    bases = omega_bases(*layer_qk(geometry, layer))
    if where is not None:
        for shard in where.glob("cores-*.pt"):
            discard(shard, f"an Omega cache shard of layer {layer}", "its bases were recomputed")
        _save(where / "bases.pt", dict(zip(("Q_a", "R_a", "Q_b", "R_b"), bases)))
    return bases


def _save(path: Path, tensors: dict[str, Tensor]) -> None:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    with contextlib.suppress(OSError):  # a cache that cannot be written costs only the reuse
        path.parent.mkdir(parents=True, exist_ok=True)
        write_checked(path, buffer.getvalue())


def _validated_shard(saved: object, r: int, rotary_dim: int) -> dict:
    """A loaded shard if it holds K keys, table rows and float64 cores of the right shapes; ValueError otherwise."""
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), Tensor) for k in ("keys", "cos", "sin", "U", "S", "V")):
        raise ValueError("expected a dict of tensors")
    K = len(saved["keys"])
    want = {"keys": ((K,), torch.long), "cos": ((K, rotary_dim), None), "sin": ((K, rotary_dim), None),
            "U": ((K, r, r), torch.float64), "S": ((K, r), torch.float64), "V": ((K, r, r), torch.float64)}
    for key, (shape, dtype) in want.items():
        if tuple(saved[key].shape) != shape or (dtype is not None and saved[key].dtype != dtype):
            raise ValueError(f"{key} is not a tensor of shape {shape}")
    return saved
