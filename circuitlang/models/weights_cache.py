"""The processed-weights cache, `models/processed-<key>.pt` under the cache root: a local model's weights after
TransformerLens's compatibility-mode processing (fold the norms, centre the writing weights and the unembedding).

Processing Gemma 3 270M makes several float32 copies of its 262,144-row embedding at once (a 6.2 GB peak
for a 1.1 GB model). With the entry, a load boots the bridge unprocessed and installs the processed weights
memory-mapped from the file: no processing, and the pages of the embedding and the unembedding that a run
never reads (rows of tokens it never sees) are never in memory.

The key hashes the model directory (`directory_digest`), the dtype and the versions of TransformerLens,
transformers and torch, so it changes whenever the processing could. An entry is read only inside
`use_caches()` (the runner), on the CPU, for local directories; its digest is checked block by block
before it is mapped, and it is loaded with `torch.load(weights_only=True)` and used only when it holds a
tensor of the right shape and dtype for every weight of the bridge; anything else is discarded with a
`CacheWarning` and the weights are processed again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from circuitlang.cachefiles import cache_root, caches_on, discard, storing, verify_checked, write_checked_file

_FORMAT = "1"  # bump when what an entry holds changes


def directory_digest(directory: Path) -> str:
    """sha256 over every file's (path, size, mtime_ns) plus config.json's bytes, so rewriting or touching a
    weight file or the tokenizer changes it."""
    h = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.relative_to(directory).as_posix().startswith("."))
    for f in files:
        stat = f.stat()
        h.update(f"{f.relative_to(directory).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    config = directory / "config.json"
    if config.is_file():  # content too: a copy that keeps mtimes (cp -p) of an edited config
        h.update(config.read_bytes())
    return h.hexdigest()


def processed_path(name: str, dtype: torch.dtype, device: str) -> Path | None:
    """Where the processed weights of model `name` are cached; None when they are not (outside `use_caches()`,
    off the CPU, or a model that is not a local directory)."""
    directory = Path(name).expanduser()
    if not caches_on() or device != "cpu" or not directory.is_dir():
        return None
    from importlib.metadata import version

    parts = [_FORMAT, str(dtype), *(version(p) for p in ("transformer-lens", "transformers", "torch")), directory_digest(directory)]
    return cache_root() / "models" / f"processed-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:32]}.pt"


def process_weights(bridge: Any, path: Path | None, saved: dict[str, torch.Tensor] | None) -> None:
    """`bridge.enable_compatibility_mode()` on a freshly booted bridge, with the processed weights `saved`
    (`read(path, bridge)`) when there are some, else computing them and storing them at `path` (if not None)."""
    if saved is None:
        bridge.enable_compatibility_mode()
        if path is not None:
            with storing():
                write_checked_file(path, lambda tmp: torch.save(bridge.state_dict(), tmp))
        return
    from transformer_lens.weight_processing import ProcessWeights

    # What enable_compatibility_mode() does, with the weights its processing would compute.
    bridge.enable_compatibility_mode(no_processing=True)
    ProcessWeights.distribute_weights_to_components(state_dict=saved, component_mapping=bridge.real_components)
    bridge._weights_processed = True
    installed = bridge.state_dict()
    if any(installed[k].data_ptr() != t.data_ptr() for k, t in saved.items()):
        discard(path, "the processed weights", "TransformerLens did not install every one")
        raise ValueError("the cached processed weights could not be installed (the entry was removed; load it again)")


def read(path: Path | None, bridge: Any) -> dict[str, torch.Tensor] | None:
    """The entry's tensors, memory-mapped, if there is one at `path` and it checks out against the
    unprocessed `bridge`'s weights; a bad entry is discarded with a CacheWarning."""
    if path is None:
        return None
    try:
        if not verify_checked(path):
            return None
        saved = torch.load(path, mmap=True, weights_only=True)
        want = bridge.state_dict()
        if not isinstance(saved, dict) or saved.keys() != want.keys():
            raise ValueError("it does not hold this model's weights")
        for key, t in want.items():
            if not isinstance(saved[key], torch.Tensor) or saved[key].shape != t.shape or saved[key].dtype != t.dtype:
                raise ValueError(f"{key} is not a {t.dtype} tensor of shape {tuple(t.shape)}")
        return saved
    except Exception as err:  # noqa: BLE001 - any unreadable entry (torch raises many kinds) is processed afresh
        discard(path, "the processed weights", f"{type(err).__name__}: {err}".splitlines()[0][:160])
        return None
