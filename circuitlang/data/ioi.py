"""The Indirect Object Identification (IOI) prompt set of Wang et al. (2023), "Interpretability in the
Wild", as used by the paper: e.g. "Then, John and Mary went to the store. John gave a drink to Mary",
where the model should predict the indirect object (IO, Mary) rather than the subject (S, John).

Task facts (names, templates, places, objects, known circuit heads) are read from ``ioi-task.json``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from functools import cache
from importlib import resources
from typing import Any

from circuitlang.data.prompts import DataError, Prompt, PromptSet, bos_id, encode, token_labels

IOI_ROLES = (
    "IO", "S1", "S2", "end", "verb", "punct",
    "IO-1", "IO+1", "S1-1", "S1+1", "S2-1", "S2+1", "end-1", "starts",
)
"""Role names of every IOI prompt, in label priority order (a position's label is its first role)."""
AUTHORS_ROLES = (
    "IO", "IO-1", "IO+1", "S1", "S1-1", "S1+1", "S2", "S2-1", "S2+1", "end", "end-1", "starts", "punct", "verb",
)
"""The keys of the authors' `word_idx` (their ioi_dataset.get_idx_dict) in order: their `idx_to_gram` writes each
key's position in turn, so where two roles share a token the later key names it (`readings ... labels authors`)."""
LABELS = ("circuitlang", "authors")

_KINDS = ("ABBA", "BABA", "mixed")
COUNTERFACTUALS = ("abc", "flipped")
"""The IOI counterfactuals `ioi_counterfactuals` makes (the faithfulness evaluation patches head outputs from them)."""
_PUNCT = {",", "."}
_VERBS = {" gave", " give", " said"}


@cache
def _task() -> dict[str, Any]:
    return json.loads(resources.files("circuitlang.data").joinpath("ioi-task.json").read_text(encoding="utf-8"))


def _abba(template: str) -> str:
    """The ABBA form of a BABA template: swap the first [B] and the first [A] (the first clause only)."""
    return template.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)


def known_heads(name: str = "ioi") -> dict[str, tuple[str, ...]]:
    """The known IOI circuit heads of Wang et al. (2023) in GPT-2 small, by class, as ``"layer.head"``
    strings, e.g. ``{"name_mover": ("9.9", "9.6", "10.0"), ...}``."""
    if name != "ioi":
        raise DataError(f"no known heads for task {name!r}; known tasks: ioi")
    heads = _task()["known_circuit_heads"]
    return {cls: tuple(value) for cls, value in heads.items() if isinstance(value, list)}


def ioi_prompts(
    tokenizer: Any,
    n: int = 256,
    kind: str = "mixed",
    seed: int = 0,
    *,
    prepend_bos: bool = False,
    all_templates: bool = False,
    drop_multitoken_names: bool = False,
    labels: str = "circuitlang",
) -> PromptSet:
    """``n`` IOI prompts of ``kind`` "ABBA", "BABA" or "mixed", deterministic for ``seed``.

    Templates are the 15 BABA templates of Wang et al. and their ABBA forms (the first [B] and [A]
    swapped). As in the reference generator the paper used, "mixed" draws from the first 7 BABA and the
    first 7 ABBA templates only (15 // 2 = 7); ``all_templates=True`` draws from all 15 of each. "ABBA" and
    "BABA" draw from all 15 templates of that form. The paper's set is ``ioi_prompts(tok)``: 256 mixed,
    seed 0, no BOS.

    Sampling, with one ``random.Random(seed)``, for each prompt in turn: ``rng.choice`` of a template from
    the candidate list (BABA templates in index order, then ABBA ones), then ``rng.sample(names, 2)`` for
    (IO, S), then ``rng.choice(places)``, then ``rng.choice(objects)`` (drawn even when the template does
    not use them, so the sequence does not depend on the template).

    Each text ends with the IO name; role ``end`` is the token before it, where the model's prediction of
    IO is read. The model is fed the tokens through ``end`` (the final IO name is the answer, ``target``),
    so every position a trace sees lies inside the prompt the paper traces (dest <= end). IO and S1 are the first occurrences of the names, S2 the last of S. Every name (with a
    leading space) must be a single token: DataError lists those that are not, unless
    ``drop_multitoken_names`` drops them (the count is reported in ``description``). Positions count the
    BOS token when ``prepend_bos``. ``target`` is the IO token id, ``distractor`` the S token id. Where two roles
    share a token, its label is the first role of ``IOI_ROLES``, or with ``labels="authors"`` the last of
    ``AUTHORS_ROLES`` (the authors' priority; ``Prompt.roles`` are then in that priority order).
    """
    if kind not in _KINDS:
        raise DataError(f"unknown IOI kind {kind!r}; use one of: {', '.join(_KINDS)}")
    if labels not in LABELS:
        raise DataError(f"unknown labels {labels!r}; use one of: {', '.join(LABELS)}")
    if not isinstance(n, int) or n < 1:
        raise DataError(f"n must be a positive integer, got {n!r}")
    task = _task()
    names, dropped = _single_token_names(tokenizer, task["names"], drop_multitoken_names)

    baba = task["baba_templates"]
    count = len(baba) if kind != "mixed" or all_templates else len(baba) // 2
    candidates = [(form, i) for form in ("BABA", "ABBA") if kind in (form, "mixed") for i in range(count)]

    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        form, index = rng.choice(candidates)
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(task["places"]), rng.choice(task["objects"])
        template = baba[index] if form == "BABA" else _abba(baba[index])
        text = template.replace("[A]", io).replace("[B]", s).replace("[PLACE]", place).replace("[OBJECT]", obj)
        prompts.append(_ioi_prompt(text, io, s, tokenizer, prepend_bos, (("kind", form), ("template", str(index))),
                                   IOI_ROLES if labels == "circuitlang" else AUTHORS_ROLES[::-1]))

    description = f"ioi {n} {kind} seed {seed}"
    if kind == "mixed" and all_templates:
        description += ", all templates"
    if prepend_bos:
        description += ", BOS"
    if labels != "circuitlang":
        description += f", {labels}' labels"
    if dropped:
        description += f", dropped {dropped} multi-token names"
    return PromptSet(tuple(prompts), IOI_ROLES, description)


def _single_token_names(tokenizer: Any, names: list[str], drop: bool) -> tuple[list[str], int]:
    """The names that are one token with a leading space, and how many were dropped."""
    bad = [name for name in names if len(encode(tokenizer, " " + name)) != 1]
    if bad and not drop:
        listed = ", ".join(repr(" " + name) for name in bad)
        raise DataError(f"names not single tokens for this tokenizer: {listed} (or pass drop_multitoken_names=True)")
    kept = [name for name in names if name not in bad]
    if len(kept) < 2:
        raise DataError(f"only {len(kept)} IOI names are single tokens for this tokenizer; need at least 2")
    return kept, len(bad)


def _ioi_prompt(
    text: str, io: str, s: str, tokenizer: Any, prepend_bos: bool, meta: tuple[tuple[str, str], ...], priority: tuple[str, ...]
) -> Prompt:
    """A Prompt with IOI roles found by matching the name tokens' ids in the tokenized text, in `priority` order."""
    ids = encode(tokenizer, text)
    io_id, s_id = encode(tokenizer, " " + io)[0], encode(tokenizer, " " + s)[0]
    io_at = [i for i, t in enumerate(ids) if t == io_id]
    s_at = [i for i, t in enumerate(ids) if t == s_id]
    if len(io_at) != 2 or len(s_at) != 2 or io_at[-1] != len(ids) - 1:
        raise DataError(f"names ' {io}' and ' {s}' do not tokenize as single tokens inside {text!r}")
    texts = [tokenizer.decode([t]) for t in ids]
    first_clause = max(io_at[0], s_at[0])
    punct = next((i for i in range(first_clause, len(ids)) if texts[i].strip() in _PUNCT), None)
    verb = next((i for i, t in enumerate(texts) if t in _VERBS), None)
    if punct is None or verb is None:
        raise DataError(f"no punctuation or verb token ({', '.join(sorted(_VERBS))}) found in {text!r}")

    io_pos, s1, s2, end = io_at[0], s_at[0], s_at[-1], io_at[-1] - 1
    positions = {
        "IO": io_pos, "S1": s1, "S2": s2, "end": end, "verb": verb, "punct": punct,
        "IO-1": io_pos - 1, "IO+1": io_pos + 1, "S1-1": s1 - 1, "S1+1": s1 + 1,
        "S2-1": s2 - 1, "S2+1": s2 + 1, "end-1": end - 1, "starts": 0,
    }
    offset = 1 if prepend_bos else 0
    roles = tuple((name, positions[name] + offset) for name in priority)
    # The answer is not fed: positions after `end` would only add firings the paper does not trace.
    token_ids = tuple(([bos_id(tokenizer)] if prepend_bos else []) + ids[:-1])
    return Prompt(
        text=text,
        token_ids=token_ids,
        roles=roles,
        labels=token_labels(token_ids, roles, tokenizer, bos=prepend_bos),
        target=io_id,
        distractor=s_id,
        meta=meta,
    )


def ioi_counterfactuals(prompts: PromptSet, tokenizer: Any, kind: str = "abc", seed: int = 0) -> PromptSet:
    """The IOI ``prompts`` with a counterfactual beside each (``Prompt.counterfactual``), aligned token by token.

    ``"abc"`` (Wang et al.'s pABC): the same template, place and object with the three name tokens (IO, S1,
    S2) replaced by three distinct names, none of them the prompt's IO or S, drawn with one
    ``random.Random(seed)`` prompt by prompt: the sentence structure stays, the information on which name is
    the indirect object goes. ``"flipped"``: S2 becomes the IO name ("... John and Mary ... Mary gave a
    drink to"), so the model's answer flips to S and F = logit(IO) - logit(S) changes sign. Names are single
    tokens, so positions, lengths and the roles stay those of the clean prompt; the answers stay the clean
    prompt's (F of a counterfactual run is read with them). The counterfactual text is kept in ``meta``.
    """
    if kind not in COUNTERFACTUALS:
        raise DataError(f"unknown IOI counterfactual {kind!r}; use one of: {', '.join(COUNTERFACTUALS)}")
    names, _ = _single_token_names(tokenizer, _task()["names"], True)
    name_ids = [encode(tokenizer, " " + name)[0] for name in names]
    rng = random.Random(seed)
    out = []
    for prompt in prompts:
        ids = list(prompt.token_ids)
        io, s1, s2 = prompt.role("IO"), prompt.role("S1"), prompt.role("S2")
        if kind == "flipped":
            ids[s2] = ids[io]
        else:
            pool = [t for t in name_ids if t not in (prompt.target, prompt.distractor)]
            ids[io], ids[s1], ids[s2] = rng.sample(pool, 3)
        start = 1 if prompt.labels and prompt.labels[0] == "BOS" else 0
        text = tokenizer.decode(ids[start:])
        out.append(dataclasses.replace(prompt, counterfactual=tuple(ids), meta=prompt.meta + (("counterfactual", text),)))
    return PromptSet(tuple(out), prompts.role_names, f"{prompts.description}, {kind} counterfactuals seed {seed}")
