"""What each decoder family is, in the terms an exact decomposition needs: everything family-specific is here.

Most of a family is read off the loaded model itself (grouped key heads from W_K's shape, q/k norms and
post-norms from the bridge's modules, the norm widths from their gains, sliding windows and soft caps from
the config). What cannot be read generically is in FAMILIES, keyed by the Hugging Face `model_type`:

- rotary kind: "half" (rotate_half: dimension t pairs with t + rotary_dim/2; Llama and most others) or
  "interleaved" (rotate-every-two: 2t pairs with 2t+1; GPT-J), and where the rotary tables come from when the
  bridge has no `hook_cos`/`hook_sin`;
- scores: whether the bridge's `hook_attn_scores` holds the pre-softmax score, or (GPT-Neo, OPT, GPT-J: the
  bridge wraps the Hugging Face attention and hooks its softmaxed weights there) the score must be formed
  from the model's own queries and keys;
- score scale: the divisor between q.k and the score where the attention module does not name it;
- position term: ALiBi (BLOOM) adds slope_h * j to every score, outside the bilinear form of eq. (3);
- whether the bridge can start a pass at a layer (BLOOM's cannot).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

ROTARY_KINDS = ("none", "half", "interleaved")


@dataclass(frozen=True)
class Family:
    """The facts about a family that are not read off the model.

    scores_from_qk: the bridge's `hook_attn_scores` is not the score; form it as q.k / scale from `hook_q`,
    `hook_k`, rotated as the model rotates them. score_scale: 1/scale where the attention module has no `scaling`
    (None: read it, or d_head**0.5). alibi: a per-head linear position term in the key position.
    interleaved: rotate-every-two pairs. tables: "hooks" (the bridge's `hook_cos`/`hook_sin`) or
    "rotary_emb" (the Hugging Face model's own rotary module, called once per capture). resumable: the
    bridge can start a pass at a layer from a given residual (BLOOM's cannot: its intervention passes run
    from the tokens).
    """

    scores_from_qk: bool = False
    score_scale: float | None = None
    alibi: bool = False
    interleaved: bool = False
    tables: str = "hooks"
    resumable: bool = True


FAMILIES: dict[str, Family] = {
    "gpt_neo": Family(scores_from_qk=True, score_scale=1.0),  # GPT-Neo does not scale q.k at all
    "opt": Family(scores_from_qk=True),
    "gptj": Family(scores_from_qk=True, interleaved=True, tables="rotary_emb"),
    "bloom": Family(alibi=True, resumable=False),
}
GENERIC = Family()


def family_of(model_type: str) -> Family:
    return FAMILIES.get(model_type, GENERIC)


def score_scale(family: Family, hf_config: Any, hf_attention: Any, d_head: int) -> float:
    """The divisor s with score_hook = A' / s: 1/`scaling` of the attention module where it has one (Gemma's
    query_pre_attn_scalar**-0.5 included), BLOOM and Falcon's inv_norm_factor, else sqrt(d_head)."""
    if family.score_scale is not None:
        return family.score_scale
    for name in ("scaling", "inv_norm_factor"):
        value = getattr(hf_attention, name, None)
        if isinstance(value, (int, float)) and value > 0:
            return 1.0 / float(value)
    return float(getattr(hf_config, "query_pre_attn_scalar", None) or d_head) ** 0.5


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al.; transformers' `build_alibi_tensor`): a geometric sequence from
    2^(-8/h) for the nearest power of two h, interleaved with the next one's for the heads past it."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** k for k in range(1, closest + 1)]
    if closest != n_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** k for k in range(1, 2 * (n_heads - closest) + 1, 2)]
    return slopes


def features(hf_config: Any) -> dict[str, str]:
    """A family's features as docs/models.md lists them, read from its config."""
    c = hf_config
    model_type = c.model_type
    fam = family_of(model_type)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or getattr(c, "num_heads", None)
    kv = getattr(c, "num_key_value_heads", None) or getattr(c, "num_kv_heads", None)
    if getattr(c, "multi_query", False):
        kv = 1
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    partial = (getattr(c, "partial_rotary_factor", None) or getattr(c, "rotary_pct", None)
               or (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None))
    if model_type == "gptj":
        partial = c.rotary_dim / (c.n_embd // c.n_head)
    if fam.alibi:
        rotary = "none (ALiBi)"
    elif model_type in ("gpt2", "gpt_neo", "opt"):
        rotary = "none (learned positions)"
    else:
        rotary = ("interleaved" if fam.interleaved else "half") + (f", {partial:g} of d_head" if partial and partial < 1 else "") + (
            f", {rope_type}" if rope_type != "default" else "")
    window = getattr(c, "sliding_window", None) or getattr(c, "window_size", None)
    parallel = bool(getattr(c, "use_parallel_residual", False) or getattr(c, "parallel_attn", False) or model_type in ("gptj", "phi"))
    return {
        "rotary": rotary,
        "heads": "MQA" if kv == 1 else "GQA" if kv and heads and kv < heads else "MHA",
        "parallel": "yes" if parallel else "no",
        "window": f"{window}" if window else "no",
        "soft cap": f"{c.attn_logit_softcapping:g}" if getattr(c, "attn_logit_softcapping", None) else "no",
        "position term": "ALiBi" if fam.alibi else "no",
    }


_STATUS = "status.json"
EMBEDDED_TYPES = {"gemma-3-270m": "gemma3_text"}  # the model_type of each embedded model (models/embedded.py)


def status_path() -> Path:
    return Path(str(resources.files("circuitlang.models").joinpath(_STATUS)))


def status_of(model_type: str) -> dict | None:
    """The conformance suite's verdict for a family (docs/models.md; written by `python -m circuitlang.models.conformance`)."""
    return json.loads(status_path().read_text(encoding="utf-8")).get(model_type)


def describe_model(name: str) -> str:
    """One line for `circ check`: the family of model `name` and its status, read without loading it (a local
    directory's config.json, an embedded model's known type); a hub name is known only once it loads."""
    model_type = EMBEDDED_TYPES.get(name)
    config = Path(name).expanduser() / "config.json"
    if model_type is None and config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            return f"model {name}: its config.json is not readable JSON"
    if model_type is None:
        return f"model {name}: family known once it loads (every run's trace.json reports its exactness)"
    status = status_of(model_type)
    if status is None:
        return (f"model {name}: family {model_type}, not in the conformance suite (docs/models.md); it runs through "
                "the generic reading, and its trace.json's exactness says whether the decomposition held")
    return f"model {name}: family {model_type}, {status['status']} (docs/models.md)"
