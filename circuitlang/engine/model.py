"""Model access: load a model through TransformerLens 4's `TransformerBridge` in the paper's coordinates.

`enable_compatibility_mode()` folds the LayerNorm gains and biases into the next weights, centres every
matrix that writes to the residual stream and centres the unembedding (paper, appendix "Layer Norm"):
what is left of each LayerNorm is the per-token scale, which the contributions divide by.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# GPT-2's IOI prompts carry no BOS token (paper, section 4.3 and its footnote 2).
_NO_BOS_MODEL_TYPES = {"gpt2"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one sentence a user can act on."""


@dataclass(frozen=True)
class LoadedModel:
    """A bridge in compatibility mode, its tokenizer and the facts the engine needs about it."""

    name: str
    bridge: Any
    tokenizer: Any
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    prepend_bos: bool
    device: str
    dtype: torch.dtype
    attn_scale: float  # the divisor between the raw score A'_ij of eq. (3) and `hook_attn_scores`


def _is_local(name: str) -> bool:
    """A path (existing, or written as one: ./x, ../x, /x, ~/x); `org/model` is a hub name."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


@contextlib.contextmanager
def _quiet():
    """Keep Hugging Face's progress bars and warnings off the user's terminal: the engine never prints."""
    hf_loggers = [logging.getLogger(n) for n in ("transformers", "huggingface_hub", "transformer_lens")]
    levels = [lg.level for lg in hf_loggers]
    env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        for lg in hf_loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            except ImportError:  # pragma: no cover - transformers is a dependency
                pass
            yield
    finally:
        for lg, level in zip(hf_loggers, levels):
            lg.setLevel(level)
        if env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = env


def load_model(name: str, device: str = "cpu", dtype: str = "float32", *, hf_model: Any = None) -> LoadedModel:
    """Load `name` (a hub name such as `gpt2`, or a local directory in Hugging Face format).

    `hf_model` passes an already-built Hugging Face model (used for models that are not stored in
    Hugging Face format, such as the embedded GGUF model).
    """
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if _is_local(name) and not Path(name).expanduser().is_dir():
        raise ModelLoadError(f"model directory {name!r} does not exist")
    try:
        with _quiet():
            bridge = TransformerBridge.boot_transformers(
                name, device=device, dtype=DTYPES[dtype], hf_model=hf_model
            )
            bridge.enable_compatibility_mode()
    except (OSError, ValueError) as err:
        if _is_local(name):
            raise ModelLoadError(f"could not load the model in {name!r}: {err}") from err
        raise ModelLoadError(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached; "
            f"download it where you have a network, or point `model` at a local directory in Hugging Face "
            f'format (e.g. model "/path/to/{name.split("/")[-1]}")'
        ) from err
    cfg = bridge.cfg
    tokenizer = bridge.tokenizer
    if tokenizer is None:
        raise ModelLoadError(f"model {name!r} has no tokenizer next to its weights")
    hf_config = getattr(getattr(bridge, "original_model", None), "config", None)
    model_type = getattr(hf_config, "model_type", "")
    # Gemma scales scores by query_pre_attn_scalar**-0.5 rather than d_head**-0.5.
    attn_scale = float(getattr(hf_config, "query_pre_attn_scalar", None) or cfg.d_head) ** 0.5
    bridge.eval()
    return LoadedModel(
        name=name,
        bridge=bridge,
        tokenizer=tokenizer,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        prepend_bos=model_type not in _NO_BOS_MODEL_TYPES,
        device=device,
        dtype=DTYPES[dtype],
        attn_scale=attn_scale,
    )
