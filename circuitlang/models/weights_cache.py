"""The processed-weights cache, `models/processed-<key>.pt` under the cache root: a local model's weights after
TransformerLens's compatibility-mode processing (fold the norms, centre the writing weights and the unembedding).

TransformerLens processes a whole model at once with several float32 copies of its 262,144-row embedding
(a 6.7 GB peak for Gemma 3 270M, a 1.1 GB model); `process_by_part` computes the same weights a block or a
slice at a time. With the entry, a load boots the bridge unprocessed and installs the processed
weights memory-mapped from the file: no processing, and the pages of the embedding and the unembedding
that a run never reads (rows of tokens it never sees) are never in memory. The first load writes the entry
a part at a time as it processes it (`_write_by_part`: the processed weights are never all in memory), then
boots afresh and installs it the same way.

The key hashes the model directory (`directory_digest`), the dtype and the versions of TransformerLens,
transformers and torch, so it changes whenever the processing could. An entry is read only inside
`use_caches()` (the runner), on the CPU, for local directories; its digest is checked block by block
before it is mapped, and it is loaded with `torch.load(weights_only=True)` and used only when it holds a
tensor of the right shape and dtype for every weight of the bridge; anything else is discarded with a
`CacheWarning` and the weights are processed again.
"""

from __future__ import annotations

import copy
import hashlib
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

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


def process_weights(bridge: Any, path: Path | None) -> bool:
    """`bridge.enable_compatibility_mode()` on a freshly booted bridge (processed by part where that applies),
    the result stored at `path` (if not None). Returns whether the entry was stored: then the bridge is to be
    discarded (where processing by part applies, the weights were processed into the file and the bridge is
    left as booted) and a fresh one with the entry installed (`install(fresh, path, read(path, fresh))`) is
    the processed model, holding none of the memory this processing touched (Gemma 3 270M: a 0.96 GB load).
    When it returns False, `bridge` is the processed model."""
    if path is not None and by_part(bridge):
        try:
            if _stored(path, lambda tmp: _write_by_part(bridge, tmp)):
                return True
        except _NewWeights:
            pass  # an entry no load could install (`read` wants the booted bridge's weights)
        path = None  # or the cache can't be written: process in place
    if not process_by_part(bridge):
        bridge.enable_compatibility_mode()
    return path is not None and _stored(path, lambda tmp: torch.save(bridge.state_dict(), tmp))


def _stored(path: Path, write: Callable[[Path], None]) -> bool:
    with storing():
        write_checked_file(path, write)
    return path.is_file()


def install(bridge: Any, path: Path | None, saved: dict[str, torch.Tensor]) -> None:
    """`bridge.enable_compatibility_mode()` on a freshly booted bridge, with the processed weights `saved`
    (`read(path, bridge)`) that its processing would compute."""
    from transformer_lens.weight_processing import ProcessWeights

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


COLUMNS = 16
"""Width of the slices of the unembedding that `process_by_part` processes at a time (16 x 262,144 float32
is 17 MB for Gemma 3)."""


def by_part(bridge: Any) -> bool:
    """Whether the weights can be processed by part (`_processed_parts`). Not where the parts are not
    independent and the whole model must be processed at once: LayerNorm models (centring the writing weights reaches the embedding and every block),
    adapters that preprocess the whole state dict, batched-expert MoE layers, models without a final norm,
    and weights other than float32 (processing computes in float32 and rounds once at the end)."""
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    cfg, adapter = bridge.cfg, bridge.adapter
    return not (
        getattr(cfg, "normalization_type", "LN") not in ("RMS", "RMSPre")
        or getattr(cfg, "num_experts", None)
        or not getattr(adapter, "supports_fold_ln", True)
        or type(adapter).preprocess_weights is not ArchitectureAdapter.preprocess_weights
        or getattr(bridge, "_weights_processed", False)
        or not {"ln_final.weight", "unembed.weight"} <= bridge.state_dict().keys()
        or any(t.dtype != torch.float32 for t in bridge.state_dict().values())  # processing upcasts the rest
    )


def process_by_part(bridge: Any) -> bool:
    """`bridge.enable_compatibility_mode()`, computing the same weights bit for bit, one part at a time
    (`_processed_parts`), each part installed before the next is read. Whole-model processing holds several
    copies of the whole model at once (6.6 GB for Gemma 3 270M); this, the processed unembedding and one
    block or slice. Returns False, having done nothing, where that does not apply (`by_part`)."""
    from transformer_lens.weight_processing import ProcessWeights

    if not by_part(bridge):
        return False
    bridge.enable_compatibility_mode(no_processing=True)
    bridge._weights_processed = True
    for part in _processed_parts(bridge):
        ProcessWeights.distribute_weights_to_components(state_dict=part, component_mapping=bridge.real_components)
        del part  # the head, before the first block is processed
    if bridge.adapter is not None:
        bridge.adapter.postprocess_weights(bridge)
    return True


def _processed_parts(bridge: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The processed weights of a bridge that `by_part` accepts, the weights compatibility mode computes,
    one part at a time: TransformerLens's own `ProcessWeights.process_weights` applied to the final norm
    and the unembedding in slices of `COLUMNS` model dimensions (centring the unembedding, in place,
    last), then to each block alone (as a one-layer model). The weights no part holds (the embedding)
    are left as they are. Reads the bridge's weights, changes none of them."""
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.weight_processing import ProcessWeights

    cfg, adapter = bridge.cfg, bridge.adapter
    # As TransformerBridge.process_weights: softcapped logits are not translation invariant
    center_unembed = not softcap_enabled(getattr(cfg, "output_logits_soft_cap", None))

    def process(part: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
        one = copy.copy(cfg)
        one.n_layers = n_layers
        return ProcessWeights.process_weights(part, one, center_unembed=False, adapter=adapter)

    # The head first, while little else is in memory. The final norm folds into the unembedding one model
    # dimension (column) at a time: slices of columns.
    state = bridge.state_dict()
    norm, weight, bias = state.pop("ln_final.weight"), state.pop("unembed.weight"), state.pop("unembed.bias", None)
    head = {"unembed.weight": torch.empty_like(weight), "ln_final.weight": torch.empty_like(norm)}
    for start in range(0, weight.shape[1], COLUMNS):
        cols = slice(start, start + COLUMNS)
        done = process({"ln_final.weight": norm[cols], "unembed.weight": weight[:, cols]}, 0)
        head["unembed.weight"][:, cols] = done["unembed.weight"]
        head["ln_final.weight"][cols] = done["ln_final.weight"]
        del done
    del weight, norm
    if center_unembed:
        # ProcessWeights.center_unembed, in place: each model dimension's mean over the vocabulary is taken
        # over the whole unembedding in one reduction, as it takes it (how a sum is split changes its rounding).
        W_U = head["unembed.weight"].T
        W_U.sub_(W_U.mean(-1, keepdim=True))
        del W_U  # a view: it would keep the head alive after it is yielded
        if bias is not None:
            head["unembed.bias"] = bias - bias.mean()
    yield head
    del head
    for layer in range(cfg.n_layers):
        prefix = f"blocks.{layer}."
        # popped: each original is freed once its block is installed (where nothing else holds it)
        block = {"blocks.0." + k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        done = process(block, 1)
        del block
        yield {prefix + k[len("blocks.0."):]: v for k, v in done.items()}
        del done


class _NewWeights(Exception):
    """Processing adds weights the booted bridge does not have (Qwen 2's folded value biases, `attn.o.bias`)."""


def _write_by_part(bridge: Any, tmp: Path) -> None:
    """Write at `tmp` the file `torch.save(bridge.state_dict())` writes once `process_by_part(bridge)` has
    run (the same records, in the same order, with the same bytes and CRC-32s; only torch's random
    `serialization_id` differs), one processed part at a time, never installing one: the processed weights
    are never all in memory, and the bridge is left as booted.

    torch.save, under `skip_data`, lays the file out with every tensor's space left empty (processing by
    part computes one standalone contiguous tensor for each weight); each part is then written where
    torch.load reads it from (the storage's offset in the file, as a load to the meta device gives it)."""
    state = bridge.state_dict()
    with torch.serialization.skip_data():
        torch.save({key: torch.empty(t.shape, dtype=t.dtype) for key, t in state.items()}, tmp)  # never touched
    laid_out = torch.load(tmp, map_location="meta", weights_only=True)
    offsets = {key: t.untyped_storage()._checkpoint_offset for key, t in laid_out.items()}
    del laid_out
    crcs: dict[int, int] = {}
    with tmp.open("r+b") as fh:

        def write(part: dict[str, torch.Tensor]) -> None:
            for key, t in part.items():
                if key not in offsets:
                    raise _NewWeights(key)
                offset = offsets.pop(key)
                data = t.contiguous().view(-1).view(torch.uint8).numpy()
                fh.seek(offset)
                fh.write(data)
                crcs[offset] = zlib.crc32(data)

        for part in _processed_parts(bridge):
            write(part)
            del part  # the head, before the first block is processed
        write({key: state[key] for key in list(offsets)})  # the weights processing leaves as they are
    _set_crcs(tmp, crcs)


_DESCRIPTOR, _CENTRAL = b"PK\x07\x08", b"PK\x01\x02"  # zip signatures: data descriptor, central directory entry


def _set_crcs(path: Path, crcs: dict[int, int]) -> None:
    """Write into the zip file `path` the CRC-32s `crcs` of the records whose data start at the offsets
    given (torch.save leaves 0 where it skipped the data): in the data descriptor after the data and in the
    record's central directory entry, where torch.save's writer (miniz) puts them."""
    with zipfile.ZipFile(path) as archive:
        records, central = archive.infolist(), archive.start_dir
    with path.open("r+b") as fh:

        def read(offset: int, size: int) -> bytes:
            fh.seek(offset)
            return fh.read(size)

        for record in records:
            name_len, extra_len = struct.unpack("<HH", read(record.header_offset + 26, 4))
            data = record.header_offset + 30 + name_len + extra_len
            entry = read(central, 46)
            if entry[:4] != _CENTRAL:
                raise ValueError(f"{path.name}: not the zip layout torch.save writes")
            if data in crcs:
                if read(data + record.file_size, 4) != _DESCRIPTOR:
                    raise ValueError(f"{path.name}: {record.filename} has no data descriptor")
                crc = struct.pack("<I", crcs.pop(data))
                for at in (data + record.file_size + 4, central + 16):  # after the signature; in the entry
                    fh.seek(at)
                    fh.write(crc)
            central += 46 + sum(struct.unpack("<HHH", entry[28:34]))
    if crcs:
        raise ValueError(f"{path.name}: no record at offsets {sorted(crcs)[:3]}")
