"""One cached forward pass: the activations a trace reads, stacked over layers, nothing more.

Prompts are right-padded; causal attention keeps every position inside a prompt independent of the
padding after it, and `lengths` masks the padding out of every later step.

Every pass stops at the final norm (`ln_final.hook_normalized`): the logit difference F(X) reads the answers'
unembedding columns there, not the full vocabulary; only the probability difference (`metric probability` of a
task) needs every logit, at the last token alone.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from circuitlang.data.prompts import PromptSet
from circuitlang.engine.decompose import Firings, dense_firings, join_firings, layer_firings
from circuitlang.engine.omega import rotation_matrices
from circuitlang.models.geometry import bilinear_scores, rotary_tables
from circuitlang.models.model import LoadedModel

Progress = Callable[[int, int], None]
Hook = tuple[str, Callable]

FINAL = "ln_final.hook_normalized"  # the residual after the final norm: what the unembedding reads


@dataclass(frozen=True)
class Activations:
    """Cached activations for P prompts of at most n tokens, L layers, H query heads.

    tokens [P, n], lengths [P]; x [L, P, n, d]: each layer's attention input after its norm
    (`ln1.hook_normalized`, gains folded); scale [L, P, n]: that norm's per-token scale; pattern and
    scores [L, P, H, n, n]: A and A' over the attention scale (`hook_pattern`, `hook_attn_scores`), None
    where the capture kept only the firing events (`firings`);
    z [P, n, L, H, r]: each head's mix of values (`hook_z`), whose output is z @ W_O; final_scale [P, n]:
    the final norm's scale (direct logit attribution); logit_diff [P]: F(X), the target-minus-distractor
    logit at each prompt's last token (section 5.4), when the prompts name both.
    Rotary family only: q_scale, k_scale [L, P, H, n] (q/k norm scales, per query head), post_scale
    [L, P, n] (the post-attention norm's scale), cos and sin [L, n, rotary_dim].
    embed [P, n, d]: the residual before layer 0 (the embeddings' write); writers=True only: mlp_out
    [L, P, n, d] (each MLP block's write to the residual), for `sources mlp` and the completeness check.
    resid: {l: [P, n, d]} the residual entering block l, for the layers asked for (partial passes start there).
    kv: (keys, values), each [L, P, H_kv, n, r]: every layer's attention keys and values as the model caches
    them (after any k-norm and rotation), kv=True only; a partial pass resumes after a prefix from them.
    """

    tokens: Tensor
    lengths: Tensor
    x: Tensor
    scale: Tensor
    pattern: Tensor | None
    scores: Tensor | None
    z: Tensor
    final_scale: Tensor
    logit_diff: Tensor | None = None
    q_scale: Tensor | None = None
    k_scale: Tensor | None = None
    post_scale: Tensor | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    embed: Tensor | None = None
    mlp_out: Tensor | None = None
    resid: dict[int, Tensor] | None = None
    kv: tuple[Tensor, Tensor] | None = None
    firings: Firings | None = None

    def firings_at(self, threshold: float) -> Firings:
        """The firing events at `threshold`: those captured, or found in the dense pattern and scores."""
        if self.firings is not None:
            if self.firings.threshold != threshold:
                raise ValueError(f"these activations kept the firings at attention > {self.firings.threshold}, not {threshold}")
            return self.firings
        return dense_firings(self.pattern, self.scores, self.lengths, threshold)

    def event_score(self, layer: int, prompt: int, head: int, dest: int, src: int) -> float:
        """The captured score (A' over the attention scale) of one event: a firing one where only firings were kept."""
        if self.scores is not None:
            return float(self.scores[layer, prompt, head, dest, src])
        row = int(self.firings.rows_of(*(torch.tensor([v]) for v in (layer, prompt, head, dest, src)))[0])
        if row < 0:
            raise ValueError(f"event {layer}.{head} {dest}->{src} of prompt {prompt} does not fire; only firings were kept")
        return float(self.firings.score[row])


_PER_LAYER = {  # field: hook under blocks.{l}, kept when the model has it
    "x": "ln1.hook_normalized",
    "scale": "ln1.hook_scale",
    "pattern": "attn.hook_pattern",
    "scores": "attn.hook_attn_scores",
    "z": "attn.hook_z",
    "q_scale": "attn.q_norm.hook_scale",
    "k_scale": "attn.k_norm.hook_scale",
    "post_scale": "ln1_post.hook_scale",
    "cos": "attn.hook_cos",
    "sin": "attn.hook_sin",
}
_MLP_WRITE = ("ln2_post.hook_out", "hook_mlp_out")  # after the post-MLP norm where there is one


def score_hooks(model: LoadedModel, layer: int) -> list[str]:
    """The hooks a pass reads layer `layer`'s scores from: the score hook, or the queries and keys where the
    bridge hooks the softmaxed weights there (`Family.scores_from_qk`)."""
    if model.family.scores_from_qk:
        return [f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"]
    return [f"blocks.{layer}.attn.hook_attn_scores"]


def qk_scores(model: LoadedModel, q: Tensor, k: Tensor, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    """[..., H, n, n] scores over the attention scale from queries and keys [..., n, heads, r] taken before any
    rotation (cos, sin [n, rotary_dim]: rotate them as the model does), future positions masked."""
    if cos is not None:
        R = rotation_matrices(cos, sin, q.shape[-1], model.family.interleaved)
        q, k = (torch.einsum("...ihr,irs->...ihs", t, R) for t in (q, k))
    k = k.repeat_interleave(q.shape[-2] // k.shape[-2], dim=-2)
    scores = torch.einsum("...ihr,...jhr->...hij", q, k) / model.attn_scale
    n = q.shape[-3]
    return scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))


def pass_scores(model: LoadedModel, captured: dict[str, list[Tensor]], layer: int) -> Tensor:
    """[B, H, n, n]: the bilinear part of layer `layer`'s scores (`bilinear_scores`) from a pass's kept hooks."""
    names = score_hooks(model, layer)
    if len(names) == 1:
        return bilinear_scores(model, captured[names[0]][0])
    q, k = (captured[name][0] for name in names)
    tables = rotary_tables(model, q.shape[1])
    return bilinear_scores(model, qk_scores(model, q, k, *((tables[0][layer], tables[1][layer]) if tables else ())))


def batch_tokens(prompts: PromptSet, pad_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-padded token ids [P, n] and lengths [P]; n = `length` (at least the longest prompt) if given."""
    lengths = torch.tensor([len(p.token_ids) for p in prompts], dtype=torch.long)
    tokens = torch.full((len(prompts), max(int(lengths.max()), length or 0)), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt.token_ids)] = torch.tensor(prompt.token_ids)
    return tokens, lengths


def answer_ids(prompts: PromptSet) -> Tensor | None:
    """[P, 2, K]: each prompt's target and distractor sets (circuitlang.data.prompts.Prompt.answer_sets), padded with
    -1 to the largest set; None when a prompt has no answers."""
    sets = [p.answer_sets() for p in prompts]
    if any(s is None for s in sets):
        return None
    K = max(len(side) for s in sets for side in s)
    out = torch.full((len(sets), 2, K), -1, dtype=torch.long)
    for row, s in enumerate(sets):
        for side, ids in enumerate(s):
            out[row, side, : len(ids)] = torch.tensor(ids)
    return out


def answer_logits(final: Tensor, W_U: Tensor, b_U: Tensor | None, answers: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
    """The logits of answers [B, ...] (token ids; -1 pads, read as token 0) off the final-norm residual final [B, d].

    The unembedding's answer columns instead of all of them; `transform` is the model's elementwise
    post-unembedding map (Gemma's soft cap; the identity elsewhere), so the values equal the model's.
    """
    ids = answers.clamp(min=0)
    logits = torch.einsum("bd,db...->b...", final, W_U[:, ids].to(final.dtype))
    if b_U is not None:
        logits = logits + b_U[ids].to(final.dtype)
    return transform(logits)


def set_metric(logits: Tensor, answers: Tensor, metric: str = "logit") -> Tensor:
    """[B]: F from logits [B, V] (all of them) or [B, 2, K] (the answers' own) and answers [B, 2] or [B, 2, K]:
    `logit`, the mean logit of the targets minus that of the distractors (logit(target) - logit(distractor) for
    single answers, section 5.4); `probability`, the targets' summed probability minus the distractors' (logits
    [B, V] only)."""
    if answers.dim() == 2:
        answers = answers[:, :, None]
    valid = answers >= 0
    if metric == "probability":
        probs = torch.softmax(logits.float(), dim=-1)
        picked = torch.gather(probs, 1, answers.clamp(min=0).flatten(1)).view(answers.shape)
        sums = (picked * valid).sum(-1)
        return sums[:, 0] - sums[:, 1]
    if logits.dim() == 2:
        logits = torch.gather(logits, 1, answers.clamp(min=0).flatten(1)).view(answers.shape)
    means = (logits * valid).sum(-1) / valid.sum(-1)
    return means[:, 0] - means[:, 1]


def logit_diff(model: LoadedModel, final_last: Tensor, answers: Tensor, metric: str = "logit") -> Tensor:
    """[B]: F(X) from the final-norm residual at the last token [B, d] and answers [B, 2] or [B, 2, K]
    (`set_metric`): the answers' unembedding columns for `logit`, every logit for `probability`."""
    b = model.bridge
    b_U = getattr(b, "b_U", None)
    W_U, b_U = b.W_U.detach().float(), None if b_U is None else b_U.detach().float()
    answers = answers.to(final_last.device)
    if metric == "probability":
        logits = final_last.float() @ W_U.to(final_last.device) + (0 if b_U is None else b_U.to(final_last.device))
        return set_metric(b.adapter.apply_output_logits_transform(logits), answers, metric).cpu()
    if answers.dim() == 2:
        answers = answers[:, :, None]
    return set_metric(answer_logits(final_last.float(), W_U, b_U, answers, b.adapter.apply_output_logits_transform),
                      answers).cpu()


def keepers(names: Sequence[str], store: dict[str, list[Tensor]]) -> list[Hook]:
    """Hooks appending a float32 CPU copy of each named activation to store[name], once per pass.

    Keyed by the name asked for (the bridge calls a hook by its canonical alias), and copied (later
    blocks may write into the tensor in place)."""
    def keeper(name: str) -> Callable:
        def keep(tensor, hook):
            store.setdefault(name, []).append(tensor.detach().to("cpu", torch.float32, copy=True))
        return keep

    return [(name, keeper(name)) for name in names]


def run_to_final_norm(model: LoadedModel, tokens: Tensor, hooks: Sequence[Hook] = (), *, start: int = 0,
                      resid: Tensor | None = None, cache=None) -> Tensor:
    """[B, n, d]: the final-norm residual of a pass with `hooks`, stopping before the unembedding.

    start > 0 runs only blocks start..L-1 from `resid` [B, n, d], the residual entering block `start`
    (captured from a clean pass): the bridge's `start_at_layer` swaps it in at that block, and the
    blocks below it are skipped outright (the bridge would otherwise run them on the injected tensor
    and discard their output). cache: a Hugging Face key/value cache (`kv_cache`); the pass appends its
    positions' keys and values to it, and attends to any it already holds (`prefix_cache`: the pass
    then runs positions after that prefix only, at their own positions).
    """
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    def stop(tensor, hook):
        raise StopAtLayerException(tensor)

    fwd = list(hooks) + [(FINAL, stop)]
    extra = {} if cache is None else {"past_key_values": cache}
    with torch.inference_mode(), _cache_by_both_names(model, cache is not None):
        if start == 0:
            out = model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=fwd, **extra)
        else:
            with _skip_blocks_below(model, start):
                out = model.bridge.run_with_hooks(resid.to(model.device, model.dtype), fwd_hooks=fwd, start_at_layer=start, **extra)
    return out


def kv_cache(model: LoadedModel) -> DynamicCache:
    """An empty Hugging Face key/value cache that keeps every position at every layer. Laid out for the model,
    its sliding-window layers would keep only their window, and a prompt longer than that (Gemma 3: 512
    tokens) could not resume after a prefix; the model's masks apply the window by position all the same."""
    return DynamicCache()


class PrefixCache(DynamicCache):
    """Positions 0..first-1 of a batch, for a pass of that batch stacked `repeat` times (the variants): each
    layer attends to them and to its new positions, and nothing is appended (one pass, no decoding after it),
    so a layer's joined keys and values are freed once its attention has read them."""

    def __init__(self, config, repeat: int):
        super().__init__(config=config)
        self.repeat = repeat

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        layer = self.layers[layer_idx]
        return tuple(torch.cat([held.repeat(self.repeat, 1, 1, 1), new], dim=-2)
                     for held, new in ((layer.keys, key_states), (layer.values, value_states)))


def prefix_cache(model: LoadedModel, kv: tuple[Tensor, Tensor], rows: Tensor, first: int, repeat: int = 1) -> PrefixCache:
    """The cache of positions 0..first-1 of the prompts `rows` of captured `kv` (`Activations.kv`), for a pass
    of those rows stacked `repeat` times: the pass runs positions first.. only."""
    cache = PrefixCache(None, repeat)  # every layer full, as `kv_cache`: the masks apply any window by position
    keys, values = kv
    for layer in range(keys.shape[0]):
        DynamicCache.update(cache, keys[layer, rows, :, :first].to(model.device, model.dtype),
                            values[layer, rows, :, :first].to(model.device, model.dtype), layer)
    return cache


@contextlib.contextmanager
def _cache_by_both_names(model: LoadedModel, active: bool) -> Iterator[None]:
    """transformers 5 hands each attention layer its cache as `cache`; TransformerLens 4's attention bridges
    read it as `past_key_values` and, not finding it, attend within the new positions alone. Give it both names."""
    if not active:
        yield
        return

    def alias(module, args, kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs

    handles = [block.attn.register_forward_pre_hook(alias, with_kwargs=True) for block in model.bridge.blocks]
    try:
        with warnings.catch_warnings():  # the bridge passes the cache on as `past_key_values`, which transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _skip_blocks_below(model: LoadedModel, start: int) -> Iterator[None]:
    """Blocks 0..start-1 pass their input through unchanged (block `start` replaces it anyway)."""
    blocks = list(model.bridge.blocks)[:start]

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    for block in blocks:  # an instance attribute shadows the method (the bridge's __setattr__ would forward it)
        object.__setattr__(block, "forward", passthrough)
    try:
        yield
    finally:
        for block in blocks:
            object.__delattr__(block, "forward")
        for block in model.bridge.blocks:  # the bridge leaves its start-at-layer marks on the blocks
            block._start_at_layer_idx = None
            block._start_residual = None


@torch.inference_mode()
def capture(
    model: LoadedModel,
    prompts: PromptSet,
    *,
    batch_size: int = 64,
    writers: bool = False,
    length: int | None = None,
    resid_layers: Sequence[int] = (),
    kv: bool = False,
    firing: float | None = None,
    progress: Progress | None = None,
) -> Activations:
    """Run the model once over `prompts` in batches of `batch_size` and keep what the trace needs.

    length: pad to this many positions (chunks of one prompt set padded alike give identical numbers);
    resid_layers: also keep the residual entering these blocks (where partial passes start); kv: keep every
    layer's keys and values (partial passes resume after a prefix from them; left out, as None, where the
    model's cache drops positions, a sliding window shorter than the prompts, or where scores are formed
    from queries and keys, which a resumed pass would hook for its own positions only); firing: keep only the
    firing events at this attention threshold (`Activations.firings`), found layer by layer as the pass runs,
    instead of the [L, P, H, n, n] pattern and scores (each layer's are freed once its events are taken).
    """
    pad = model.tokenizer.pad_token_id
    tokens, lengths = batch_tokens(prompts, 0 if pad is None else pad, length)
    available = set(model.bridge.hook_dict)
    L = model.n_layers
    fields = {f: hook for f, hook in _PER_LAYER.items() if f"blocks.0.{hook}" in available}
    if "x" not in fields:  # no norm before attention (one after it instead): x is the residual, scale 1
        fields["x"] = "hook_resid_pre"
    if model.family.scores_from_qk:  # the bridge's score hook holds the softmaxed weights: form q.k instead
        fields.pop("scores")
        fields.update(q="attn.hook_q", k="attn.hook_k")
    if writers:
        fields["mlp_out"] = next(h for h in _MLP_WRITE if f"blocks.0.{h}" in available)
    names = {f"blocks.{l}.{hook}" for hook in fields.values() for l in range(L)} | {"ln_final.hook_scale"}
    names |= {f"blocks.{l}.hook_resid_pre" for l in {0, *resid_layers}}
    answers = answer_ids(prompts)
    has_answers = answers is not None
    per_layer = {f"blocks.{l}.{hook}": (field, l) for field, hook in fields.items() for l in range(L)}
    kept: dict[str, Tensor] = {}
    at = 0  # the first row of the batch being run
    # Firings found as the pass runs: a layer's scores wait for its pattern (hooked next), then both go.
    sparse = firing is not None and "scores" in fields
    pending: dict[int, Tensor] = {}
    found: list[Firings] = []

    # Each activation is copied straight into its place in one float32 tensor over all prompts (and layers):
    # no per-batch copies to concatenate and stack afterwards, which took 2.4x the activations' memory.
    def keeper(name: str) -> Callable:
        key, layer = per_layer.get(name, (name, None))

        def keep(tensor, hook):
            t = tensor.detach()
            if sparse and key == "scores":
                pending[layer] = bilinear_scores(model, t.to(torch.float32, copy=True))
                return
            if sparse and key == "pattern":
                found.append(layer_firings(t.float(), pending.pop(layer), lengths[at : at + t.shape[0]], firing, layer, at))
                return
            if key in ("cos", "sin"):  # positions 0..n-1, the same in every prompt: the first row, once
                if at == 0:
                    kept.setdefault(key, torch.empty((L, *t.shape[1:]), dtype=torch.float32))[layer].copy_(t[0])
                return
            if key not in kept:
                kept[key] = torch.empty((total, *t.shape[1:]) if layer is None else (L, total, *t.shape[1:]), dtype=torch.float32)
            (kept[key] if layer is None else kept[key][layer])[at : at + t.shape[0]].copy_(t)
        return keep

    hooks = [(name, keeper(name)) for name in sorted(names)]
    kv = kv and not model.family.scores_from_qk  # a resumed pass would see only its own positions' keys
    diffs = []
    total = tokens.shape[0]
    keys_values: list[Tensor] | None = None
    for at in range(0, total, batch_size):
        chunk = tokens[at : at + batch_size]
        cache = kv_cache(model) if kv else None
        final = run_to_final_norm(model, chunk, hooks, cache=cache)
        if cache is not None:
            keys_values = _keep_kv(cache, keys_values, at, total, chunk.shape[1])
            kv = keys_values is not None
        if has_answers:
            rows = torch.arange(chunk.shape[0])
            last = final[rows.to(final.device), (lengths[at : at + batch_size] - 1).to(final.device)]
            diffs.append(logit_diff(model, last, answers[at : at + batch_size], prompts.metric))
        del final
        if progress is not None:
            progress(min(at + batch_size, total), total)

    def shaped(field: str) -> Tensor:
        stacked = kept.pop(field)
        if field in ("scale", "post_scale"):
            return stacked.squeeze(-1)
        if field in ("q_scale", "k_scale"):  # [L, P, heads, n, 1] -> per query head
            if stacked.dim() == 4:  # [L, P, n, 1]: one norm across all heads, one scale per token
                return stacked.squeeze(-1)[:, :, None].expand(-1, -1, model.n_heads, -1).contiguous()
            return stacked.squeeze(-1).repeat_interleave(model.n_heads // stacked.shape[2], dim=2)
        if field == "z":
            return stacked.permute(1, 2, 0, 3, 4)  # [P, n, L, H, r]
        return stacked

    tables = rotary_tables(model, tokens.shape[1]) if "cos" not in fields else None
    if tables is not None:
        fields.update(cos="", sin="")
        kept["cos"], kept["sin"] = tables
    if "q" in fields:  # [L, P, n, heads, r] queries and keys -> scores [L, P, H, n, n] over the attention scale
        q, k = kept.pop("q"), kept.pop("k")
        kept["scores"] = torch.stack([qk_scores(model, q[l], k[l], *((kept["cos"][l], kept["sin"][l]) if "cos" in kept else ()))
                                      for l in range(L)])
        fields = {**{f: h for f, h in fields.items() if f not in ("q", "k")}, "scores": ""}
    if sparse:
        fields = {f: h for f, h in fields.items() if f not in ("pattern", "scores")}
    if "scores" in kept:
        for layer in range(L):  # the part of each score that Omega's slices decompose
            kept["scores"][layer] = bilinear_scores(model, kept["scores"][layer])
    if fields["x"] == "hook_resid_pre":
        fields["scale"] = ""
        kept["scale"] = torch.ones(kept["x"].shape[:-1] + (1,))
    stacked = {field: shaped(field) for field in fields}
    firings = join_firings(found, firing) if sparse else None
    if firing is not None and not sparse:  # scores formed from q.k after the pass: the events from the dense tensors
        firings = dense_firings(stacked.pop("pattern"), stacked.pop("scores"), lengths, firing)
    if firings is not None:
        stacked.update(pattern=None, scores=None)

    def residual(layer: int) -> Tensor:  # the residual entering block `layer` (x itself where nothing normalises it)
        return stacked["x"][layer] if fields["x"] == "hook_resid_pre" else kept[f"blocks.{layer}.hook_resid_pre"]
    return Activations(
        tokens=tokens,
        lengths=lengths,
        final_scale=kept["ln_final.hook_scale"].squeeze(-1),
        logit_diff=torch.cat(diffs) if has_answers else None,
        embed=residual(0),
        resid={l: residual(l) for l in resid_layers} or None,
        kv=None if keys_values is None else tuple(keys_values),
        firings=firings,
        **stacked,
    )


def _keep_kv(cache, kept: list[Tensor] | None, at: int, total: int, n: int) -> list[Tensor] | None:
    """Copy a batch's cached keys and values into rows at.. of [L, P, H_kv, n, r] tensors; None if any layer
    holds fewer than the n positions (its window is shorter: a prefix could not be resumed from it)."""
    layers = cache.layers
    if any(layer.keys is None or layer.keys.shape[-2] != n for layer in layers):
        return None
    if kept is None:
        kept = [torch.empty((len(layers), total, *layers[0].keys.shape[1:]), dtype=torch.float32) for _ in range(2)]
    for l, layer in enumerate(layers):
        kept[0][l, at : at + layer.keys.shape[0]].copy_(layer.keys)
        kept[1][l, at : at + layer.values.shape[0]].copy_(layer.values)
    return kept
