"""The conformance suite: every decoder family traced exactly, checked on a tiny random model of each.

Each model is built offline from transformers' own config class and saved in Hugging Face format beside a
tokenizer, so it loads through the same path as a user's `model "local/dir"`. Widths are small (d = 64, 4
query heads of 16) but every feature that could break an exact decomposition is switched on: norm gains and
biases randomised, query/key weights scaled up so heads fire on single tokens, grouped or shared key heads,
partial and interleaved rotary, sliding windows, soft caps, parallel blocks, ALiBi.

`check_family` runs the checks of docs/models.md on one family; `python -m circuitlang.conformance TOKENIZER_DIR`
runs them all and writes docs/models.md and the status table `circ check` reads (models/status.json).
tests/test_families.py runs the same checks in CI and holds both files to them.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

D, HEADS, D_HEAD, LAYERS, FFN = 64, 4, 16, 3, 128


def _configs(vocab: int) -> dict:
    """family -> (config class name, model class name, config kwargs, names of the query/key weights)."""
    common = dict(vocab_size=vocab, max_position_embeddings=64)
    llama_like = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN, **common)
    return {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=LAYERS, n_head=HEADS, n_embd=D, n_positions=64, vocab_size=vocab), ("c_attn",)),
        "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(
            num_layers=LAYERS, num_heads=HEADS, hidden_size=D, intermediate_size=FFN, window_size=4,
            attention_types=[[["global", "local"], 1], [["global"], 1]], **common), ("q_proj", "k_proj")),
        "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=LAYERS, n_head=HEADS, n_embd=D, n_inner=FFN, rotary_dim=8,
                                                       n_positions=64, vocab_size=vocab), ("q_proj", "k_proj")),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.5, **llama_like), ("query_key_value",)),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
                                                   word_embed_proj_dim=D, **common), ("q_proj", "k_proj")),
        "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=D, n_layer=LAYERS, n_head=HEADS, vocab_size=vocab), ("query_key_value",)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
            num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **llama_like),
            ("q_proj", "k_proj")),
        "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=HEADS, **llama_like), ("q_proj", "k_proj")),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=6, **llama_like), ("q_proj", "k_proj")),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                                                               **llama_like), ("q_proj", "k_proj")),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, **llama_like), ("q_proj", "k_proj")),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=D_HEAD, **llama_like), ("q_proj", "k_proj")),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=D_HEAD, **llama_like), ("q_proj", "k_proj")),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
            num_key_value_heads=2, head_dim=D_HEAD, query_pre_attn_scalar=D_HEAD, sliding_window=6, attn_logit_softcapping=20.0,
            final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"], **llama_like),
            ("q_proj", "k_proj")),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
            num_key_value_heads=1, head_dim=D_HEAD, sliding_window=8, query_pre_attn_scalar=D_HEAD, rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"], **llama_like),
            ("q_proj", "k_proj")),
        "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5, **llama_like), ("q_proj", "k_proj")),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0, **llama_like), ("qkv_proj",)),
        "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(pad_token_id=0, **llama_like), ("q_proj", "k_proj")),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0, **llama_like), ("q_proj", "k_proj")),
        "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(num_key_value_heads=2, partial_rotary_factor=0.25, use_qkv_bias=True,
                                                                  **llama_like), ("q_proj", "k_proj")),
        "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                            multi_query=True, parallel_attn=True, bias=True, new_decoder_architecture=False,
                                                            vocab_size=vocab), ("query_key_value",)),
    }


FAMILIES = tuple(_configs(1))


def build_family(directory: Path, tokenizer, family: str, *, seed: int = 0) -> Path:
    """A tiny random model of `family` (see FAMILIES) saved in `directory`, with its norms' gains and biases and
    every attention bias randomised and its query/key weights scaled up (heads fire on single tokens)."""
    import transformers as tf

    config_name, model_name, kwargs, qk = _configs(len(tokenizer))[family]
    torch.manual_seed(seed)
    config = getattr(tf, config_name)(**kwargs)
    model = getattr(tf, model_name)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.split(".")
            if any(k in name for k in ("norm", "ln", "layer_norm")) and "proj" not in leaf[-2]:
                if name.endswith("bias"):
                    param.normal_(0, 0.1)
                else:
                    param.add_(torch.empty_like(param).uniform_(-0.4, 0.4))
            elif name.endswith("bias") and "attn" in name or "attention" in name and name.endswith("bias"):
                param.normal_(0, 0.3)
            if any(k in name for k in qk) and name.endswith("weight"):
                param.mul_(3.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


THRESHOLD = 0.3  # the firing threshold of the checks: tiny random models attend broadly
TOLERANCE = 1e-4  # largest relative residual that counts as exact in float32


@dataclass(frozen=True)
class FamilyResult:
    """What the suite measured on one family's tiny model (None where a check could not run).

    score_residual: the largest |score - sum of slice terms| over every traced event, over the largest score
    (trace.json's exactness); writer_residual: the same for eq. (8), every residual writer's contribution
    against the event's signal; pattern_error: the largest difference between the attention the engine
    captured and the Hugging Face model's own (eager attention); firings_equal: the firing events read from
    either are the same; partial_error: the largest difference between intervention passes resumed at the
    first changed layer and token and passes through the whole model; position_term: the largest
    unattributed position term (ALiBi) among traced events.
    """

    family: str
    model_type: str = ""
    features: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    events: int = 0
    edges: int = 0
    score_residual: float | None = None
    writer_residual: float | None = None
    pattern_error: float | None = None
    firings_equal: bool | None = None
    partial_error: float | None = None
    authors_edges: int | None = None
    sources_edges: int | None = None
    position_term: float | None = None

    @property
    def status(self) -> str:
        if self.error is not None:
            return "refused"
        exact = (self.score_residual is not None and self.score_residual <= TOLERANCE and self.writer_residual <= TOLERANCE
                 and self.pattern_error <= TOLERANCE and self.firings_equal and self.partial_error <= TOLERANCE
                 and self.authors_edges and self.sources_edges)
        if not exact:
            return "failed"
        return "exact, position term stated" if self.position_term else "exact"


def busiest_roots(acts, prompts, layer: int, k: int = 3, *, threshold: float = 0.5, distinct: bool = True):
    """The k (head, dest role, src role) pairs that fire most often at `layer`: roots that surely fire.

    distinct: leave out a token attending to itself (some tiny random models fire on nothing else)."""
    from circuitlang.engine import decompose as dc
    from circuitlang.lang.plan import Root

    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, threshold)[layer]
    counts: dict[tuple, int] = {}
    for p, h, i, j in fires.nonzero().tolist():
        dest, src = prompts[p].labels[i], prompts[p].labels[j]
        if dest in prompts.role_names and src in prompts.role_names and (dest != src or not distinct):
            counts[h, dest, src] = counts.get((h, dest, src), 0) + 1
    ranked = sorted(counts, key=lambda key: (-counts[key], key))[:k]
    return [Root(layer, h, dest, src) for h, dest, src in ranked]


def writer_residual(acts, geometry, events) -> float:
    """The largest |sum of every residual writer's eq. (8) contribution - the signal| over both sides of
    every event, over the largest signal (engine/trace.writer_contributions)."""
    from circuitlang.engine.trace import writer_contributions

    worst = 0.0
    for side, signal in (("d", events.signal_dest), ("s", events.signal_src)):
        total = np.sum(list(writer_contributions(acts, geometry, events, side).values()), axis=0)
        worst = max(worst, float(np.abs(total - signal).max() / np.abs(signal).max()))
    return worst


def model_attention(directory: Path, acts) -> torch.Tensor:
    """[L, P, H, n, n]: the Hugging Face model's own attention weights on the captured tokens (eager attention,
    loaded afresh: independent of the bridge and of compatibility mode)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()
    mask = (torch.arange(acts.tokens.shape[1])[None, :] < acts.lengths[:, None]).long()
    with torch.no_grad():
        out = hf(acts.tokens, attention_mask=mask, output_attentions=True)
    return torch.stack([a.float() for a in out.attentions])


def check_family(family: str, directory: Path, tokenizer) -> FamilyResult:
    """Build `family`'s tiny model in `directory` and run every check of docs/models.md on it."""
    from circuitlang.data.ioi import ioi_prompts
    from circuitlang.engine import decompose as dc
    from circuitlang.engine.forward import capture
    from circuitlang.engine.intervene import run_interventions
    from circuitlang.engine.results import exactness
    from circuitlang.engine.trace import trace
    from circuitlang.lang.plan import READING_SETS, EdgeSelector, InterventionSet
    from circuitlang.models.families import features
    from circuitlang.models.geometry import attention_geometry
    from circuitlang.models.model import load_model

    build_family(directory, tokenizer, family)
    try:
        model = load_model(str(directory))
    except Exception as err:  # noqa: BLE001 - a family the bridge cannot load is reported, with why
        return FamilyResult(family, model_type=json.loads((directory / "config.json").read_text())["model_type"],
                            error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    feats = features(model.bridge.original_model.config)
    prompts = ioi_prompts(tokenizer, n=8, seed=5, prepend_bos=model.prepend_bos)
    acts = capture(model, prompts, writers=True, resid_layers=range(model.n_layers), kv=True)
    geometry = attention_geometry(model)
    L, P, H, n, _ = acts.pattern.shape
    inside = (torch.arange(n)[None, :] < acts.lengths[:, None])
    pair = (inside[:, None, :, None] & inside[:, None, None, :])[None]
    theirs = model_attention(directory, acts)
    pattern_error = float(((theirs - acts.pattern).abs() * pair).max())
    firings_equal = bool(torch.equal(dc.firing_mask(acts.pattern, acts.scores, acts.lengths, THRESHOLD),
                                     dc.firing_mask(theirs, acts.scores, acts.lengths, THRESHOLD)))
    roots = next(r for layer in (*range(L - 1, 0, -1), 0) for distinct in (True, False)
                 if (r := busiest_roots(acts, prompts, layer, threshold=THRESHOLD, distinct=distinct)) or layer == 0)
    t = trace(model, prompts, roots, THRESHOLD, activations=acts, geometry=geometry)
    ex = exactness(t.events)
    sets = [InterventionSet("into root 1", (EdgeSelector("into", root=1),), random_control=True)]
    partial = run_interventions(model, prompts, t, sets, roots, seed=0, acts=acts, geometry=geometry)
    whole = run_interventions(model, prompts, t, sets, roots, seed=0, acts=acts, geometry=geometry, partial=False)
    partial_error = max((float(np.nanmax(np.abs(getattr(partial.rows, f) - getattr(whole.rows, f)) / (1 + np.abs(getattr(whole.rows, f)))))
                         for f in ("f_after", "score_after") if len(whole.rows)), default=0.0)
    authors = trace(model, prompts, roots, THRESHOLD, readings=READING_SETS["authors"], activations=acts, geometry=geometry)
    sources = trace(model, prompts, roots, THRESHOLD, writers=("heads", "mlp", "embed", "bias"), activations=acts, geometry=geometry)
    return FamilyResult(
        family, model_type=model.model_type, features=feats, events=len(t.events), edges=len(t.edges), score_residual=ex["max_relative_residual"],
        writer_residual=writer_residual(acts, geometry, t.events), pattern_error=pattern_error, firings_equal=firings_equal,
        partial_error=partial_error, authors_edges=len(authors.edges), sources_edges=len(sources.edges),
        position_term=ex.get("unattributed_position_term", 0.0),
    )


def run_suite(tokenizer, families=FAMILIES) -> list[FamilyResult]:
    with tempfile.TemporaryDirectory(prefix="circuitlang-families-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [check_family(f, Path(tmp) / f, tokenizer) for f in families]


FEATURE_COLUMNS = ("rotary", "heads", "parallel", "window", "soft cap", "position term")


def _what(result: FamilyResult) -> str:
    if result.error is not None:
        return result.error
    notes = []
    if result.features.get("soft cap", "no") != "no":
        notes.append("the slices decompose the score before the soft cap, which is undone exactly (atanh)")
    if result.position_term:
        notes.append(f"ALiBi's slope_h * j is added to the score outside Omega: reported, not attributed (up to {result.position_term:.2g} here)")
    return "; ".join(notes)


def status_table(results: list[FamilyResult]) -> dict[str, dict]:
    """models/status.json, by Hugging Face model_type: the suite's variants of it (Llama 2 and 3 are both
    `llama`), each one's status, and what is not attributed."""
    table: dict[str, dict] = {}
    for r in results:
        entry = table.setdefault(r.model_type or r.family, {"variants": {}})
        entry["variants"][r.family] = {"status": r.status, "note": _what(r)}
    for entry in table.values():
        statuses = {v["status"] for v in entry["variants"].values()}
        entry["status"] = statuses.pop() if len(statuses) == 1 else "mixed: " + ", ".join(sorted(statuses))
    return table


def render_markdown(results: list[FamilyResult]) -> str:
    """docs/models.md, generated from the suite's results."""
    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.0e}" if x else "0"

    head = ["family", *FEATURE_COLUMNS, "status", "score residual", "eq. (8) residual", "attention vs HF", "partial vs whole", "what is not attributed"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rows.append("| " + " | ".join([f"`{r.family}`", *(r.features.get(c, "—") for c in FEATURE_COLUMNS), f"**{r.status}**",
                                       num(r.score_residual), num(r.writer_residual), num(r.pattern_error), num(r.partial_error),
                                       _what(r) or "nothing"]) + " |")
    return TEMPLATE.format(table="\n".join(rows), tolerance=f"{TOLERANCE:.0e}", threshold=THRESHOLD, count=sum(r.status.startswith("exact") for r in results),
                           total=len(results))


TEMPLATE = """# Model families

<!-- Generated by `python -m circuitlang.conformance tests/data/gpt2-tokenizer` from the conformance suite's
results; tests/test_families.py fails when this file and the suite disagree. Do not edit by hand. -->

Every decoder-only family below is traced by the same engine: what differs between families (how attention
reads its input, rotary kind, norms, grouped key heads, soft caps, position terms) is read by the
model-access layer (`circuitlang/models`: `families.py`, `geometry.py`) into one `AttentionGeometry`, and the
engine never branches on a family. Each family is checked on a tiny random model built from transformers'
own config class (3 layers, d = 64, 4 query heads; norm gains and biases and attention biases randomised,
query/key weights scaled so heads fire), loaded through the path a user's `model "local/dir"` takes, on 8
IOI-style prompts, firing threshold {threshold}:

- **score residual**: over every traced event, the largest |model's score - sum of the slice terms|, over
  the largest score (what every run's trace.json reports as `exactness`);
- **eq. (8) residual**: every residual writer's contribution (heads, MLPs, embeddings, biases, the
  homogeneous term) summed against the event's signal, likewise;
- **attention vs HF**: the attention the engine captured against the Hugging Face model's own (eager
  attention, loaded afresh), and the firing events read from either are the same;
- **partial vs whole**: intervention passes resumed at the first changed layer and token against passes
  through the whole model (relative);
- `readings authors` and `sources heads mlp embed bias` run and trace edges.

A family is **exact** when every residual is at most {tolerance} (float32). {count} of {total} are.

{table}

Columns: *rotary* "half" pairs dimension t with t + rotary_dim/2 (rotate_half), "interleaved" pairs 2t with
2t+1 (GPT-J's rotate-every-two); for rotary families Omega has one core per offset i - j. *heads*: MHA, GQA
(grouped key heads) or MQA (one key head shared by all queries). *parallel*: attention and MLP read the same
input. *window*: sliding-window attention (a layer's firings lie inside its window). *soft cap*: scores pass
through cap * tanh(s / cap) before the softmax.

Where the model-access layer reads something a family does differently:

| what | families | how it is read |
|---|---|---|
| the score | GPT-Neo, OPT, GPT-J | their bridges hook the softmaxed weights as `hook_attn_scores`; the score is formed from the model's own queries and keys (rotated as the model rotates them) |
| score scale | GPT-Neo (none), Gemma (query_pre_attn_scalar) | 1 / the attention module's `scaling` (or `inv_norm_factor`); GPT-Neo does not scale |
| q/k norm | Qwen3, Gemma 3 (per head), OLMo-2 (across all heads) | the gain per head multiplies into Omega; the per-token scale divides each slice term |
| no norm before attention | OLMo-2 | the attention input is the residual itself (scale 1) |
| post-attention norm | Gemma 2, Gemma 3, OLMo-2 | its gain multiplies W_O, its per-token scale divides each head's write |
| rotary tables | GPT-J | from the model's own rotary module (the bridge hooks none), interleaved |
| soft cap | Gemma 2 | the decomposition is of the score before the cap; the cap is undone exactly (atanh) |
| position term | BLOOM (ALiBi) | slope_h * j is taken out of the score before it is decomposed and reported per event (`position`), never attributed |

`circ check SPEC` names the family of a local model and its status from this table
(`circuitlang/models/status.json`). A model of a family not listed here runs through the generic reading;
its trace.json's `exactness` says whether the decomposition held.
"""


def main(argv: list[str] | None = None) -> int:
    from transformers import GPT2TokenizerFast

    args = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parent
    tokenizer = GPT2TokenizerFast.from_pretrained(args[0] if args else root.parent / "tests" / "data" / "gpt2-tokenizer")
    results = run_suite(tokenizer)
    from circuitlang.atomic import atomic_write
    from circuitlang.models.families import status_path

    atomic_write(status_path(), json.dumps(status_table(results), indent=1, sort_keys=True) + "\n")
    atomic_write(root.parent / "docs" / "models.md", render_markdown(results))
    for r in results:
        print(f"{r.family:10s} {r.status:30s} {asdict(r)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
