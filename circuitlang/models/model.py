"""Model access: load a model through TransformerLens 4's `TransformerBridge` in the paper's coordinates.

`enable_compatibility_mode()` folds the LayerNorm gains and biases into the next weights, centres every
matrix that writes to the residual stream and centres the unembedding (paper, appendix "Layer Norm"):
what is left of each LayerNorm is the per-token scale, which the contributions divide by.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from circuitlang.cachefiles import CacheWarning
from circuitlang.models.families import GENERIC, Family, family_of, score_scale

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# GPT-2's IOI prompts carry no BOS token (paper, section 4.3 and its footnote 2).
_NO_BOS_MODEL_TYPES = {"gpt2"}

HUB_PROBE_TIMEOUT_S = 3.0
"""How long `load_model` waits to learn whether the Hugging Face hub answers, before loading a hub name that
is not in the local cache (without the probe, an unreachable hub costs over a minute of retries)."""


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
    model_type: str = ""  # the Hugging Face model_type: the family (models/families.py)
    family: Family = GENERIC
    soft_cap: float | None = None  # scores pass through cap * tanh(s / cap) before the softmax (Gemma 2)
    # [L, KV heads, r]: each head's value bias with the norm's bias folded in, which compatibility mode then
    # folds into the shared b_O (None where it is zero); `readings ... value head` gives it back to the head.
    value_bias: torch.Tensor | None = None


def _value_bias(bridge) -> torch.Tensor | None:
    """b_V + beta W_V per head, read before compatibility mode folds it into b_O (fold_ln puts the norm's
    bias beta there; centring leaves it), or None for a model without value or norm biases."""
    try:
        b_V, W_V = bridge.b_V, bridge.W_V
    except AttributeError:
        return None
    if b_V is None:
        return None
    beta = [getattr(getattr(block.ln1, "original_component", block.ln1), "bias", None) for block in bridge.blocks]
    value = b_V.detach().float().clone()
    if all(b is not None for b in beta):
        value += torch.einsum("ld,lhdr->lhr", torch.stack([b.detach().float() for b in beta]), W_V.detach().float())
    return value.cpu() if value.abs().max() > 0 else None


def _is_local(name: str) -> bool:
    """A path (existing, or written as one: ./x, ../x, /x, ~/x); `org/model` is a hub name."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def _offline_env() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to a true value, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    now = any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return now or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's endpoint (HF_ENDPOINT, proxies honoured) answers HTTP within `timeout` seconds. The
    request runs in a daemon thread, so a name lookup that hangs (which no socket timeout bounds) can't stall us."""
    import threading
    import urllib.error
    import urllib.request

    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(_endpoint(), method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:  # it answered, if not with 200
            pass
        except (OSError, ValueError):  # URLError, a timeout, a refused connection, a malformed endpoint
            return
        answered.append(True)

    thread = threading.Thread(target=probe, name="circuitlang-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)


def _in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds `name`'s config (under its TransformerLens alias, too)."""
    from huggingface_hub import try_to_load_from_cache

    names = [name]
    try:
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

        names.append(resolve_model_alias(name))
    except Exception:  # noqa: BLE001 - an optional refinement; the registry may move between versions
        pass
    for repo in filter(None, names):
        try:
            if isinstance(try_to_load_from_cache(repo, "config.json"), str):
                return True
        except ValueError:  # not a valid repo id; reported below
            continue
    return False


def _near_builtin(name: str) -> str:
    """'; did you mean "gemma-3-270m"?' when `name` looks like a built-in alias mistyped, else ''."""
    import difflib
    import unicodedata

    from circuitlang.models.embedded import EMBEDDED

    builtins = [*EMBEDDED, "gpt2", "openai-community/gpt2"]
    plain = unicodedata.normalize("NFKC", name).lower()
    close = [b for b in builtins if b == plain] or difflib.get_close_matches(plain, builtins, n=1, cutoff=0.8)
    return f'; did you mean "{close[0]}"?' if close and close[0] != name else ""


def _check_hub_name(name: str) -> bool:
    """Before booting hub name `name`: fail at once, with the sentence a user acts on, when it is not in the
    local cache and the hub can't be asked (offline mode set, or no answer within HUB_PROBE_TIMEOUT_S).
    Returns True when the cached copy must be loaded offline (the hub is unreachable)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelLoadError(f"model {name!r} is neither a local directory nor a valid Hugging Face hub name "
                             f"(org/name, ASCII letters, digits, - _ .){_near_builtin(name)}") from None
    cached = _in_hub_cache(name)
    if _offline_env():
        if cached:
            return True
        why = "offline mode is set (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
    elif _hub_reachable():
        return False
    elif cached:
        return True
    else:
        why = f"the hub ({_endpoint()}) cannot be reached"
    raise ModelLoadError(
        f"model {name!r} is not in the local Hugging Face cache and {why}; "
        f"download it where you have a network, or point `model` at a local directory in Hugging Face "
        f'format (e.g. model "/path/to/{name.split("/")[-1]}")' + _near_builtin(name)
    )


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Load from the local cache only (no retries against an unreachable hub) while `offline`."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved, env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


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
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", CacheWarning)  # ours (a cache entry not stored): said after
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            except ImportError:  # pragma: no cover - transformers is a dependency
                pass
            yield
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
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
    offline = False if _is_local(name) or hf_model is not None else _check_hub_name(name)
    from circuitlang.models import weights_cache  # here: it reads the cache root from embedded, which imports this module

    processed = weights_cache.processed_path(name, DTYPES[dtype], device) if hf_model is None else None

    def boot() -> tuple[Any, torch.Tensor | None]:
        with _quiet(), _hub_offline(offline):
            bridge = TransformerBridge.boot_transformers(name, device=device, dtype=DTYPES[dtype], hf_model=hf_model)
            return bridge, _value_bias(bridge)

    try:
        bridge, value_bias = boot()
        saved = weights_cache.read(processed, bridge)  # outside _quiet, which would hide a discarded entry's warning
        if saved is None:
            with _quiet():
                stored = weights_cache.process_weights(bridge, processed)
            if stored:  # load the entry as every later load will, giving back what processing held
                del bridge
                gc.collect()  # the bridge's modules refer to each other: free it before the next boot
                bridge, value_bias = boot()
                saved = weights_cache.read(processed, bridge)
                if saved is None:
                    with _quiet():
                        weights_cache.process_weights(bridge, None)
        if saved is not None:
            with _quiet():
                weights_cache.install(bridge, processed, saved)
    except (OSError, ValueError) as err:
        if _is_local(name):
            raise ModelLoadError(f"could not load the model in {name!r}: {err}") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"model {name!r} could not be loaded from the Hugging Face hub ({first}); check "
            f'the name, or point `model` at a local directory in Hugging Face format (e.g. model "/path/to/'
            f'{name.split("/")[-1]}")' + _near_builtin(name)
        ) from err
    cfg = bridge.cfg
    tokenizer = bridge.tokenizer
    if tokenizer is None:
        raise ModelLoadError(f"model {name!r} has no tokenizer next to its weights")
    hf_config = getattr(getattr(bridge, "original_model", None), "config", None)
    model_type = getattr(hf_config, "model_type", "")
    family = family_of(model_type)
    hf_attention = getattr(bridge.blocks[0].attn, "original_component", None)
    attn_scale = score_scale(family, hf_config, hf_attention, cfg.d_head)
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
        model_type=model_type,
        family=family,
        soft_cap=getattr(hf_config, "attn_logit_softcapping", None) or None,
        value_bias=value_bias,
    )
