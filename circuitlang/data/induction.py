"""Induction prompts: a random word sequence followed by its own start again, for long-context traces.

A prompt is [BOS] w_0 .. w_{k-1} w_0 .. w_{m-1}: k distinct random words, each one token of the model's
vocabulary, then the first m repeated, n tokens in all. At the last token (w_{m-1} again) an induction head
attends to the token after that word's first occurrence, w_m, and the model predicts it (Olsson et al.,
2022). Roles: `end` (the last token), `match` (w_{m-1}'s first occurrence), `next` (w_m in the first copy,
what is predicted); target w_m, distractor w_{m+1}. Prompts are written as prompt-file records
(docs/language.md, "Prompt files") so that they run through `prompts file`; this module is pure Python.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from circuitlang.atomic import atomic_write
from circuitlang.data.prompts import DataError, encode


def word_tokens(tokenizer: Any) -> list[str]:
    """The vocabulary's whole lowercase words of 3 to 8 letters that start with a space, as text (" word")."""
    words = []
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        word = text[1:]
        if text.startswith(" ") and word.isascii() and word.isalpha() and word.islower() and 3 <= len(word) <= 8:
            words.append(text)
    return sorted(words)


def induction_records(tokenizer: Any, n_tokens: int, count: int, seed: int) -> list[dict]:
    """`count` prompt-file records of n_tokens tokens each (BOS included), from `seed`."""
    k = n_tokens // 2 + 1
    m = n_tokens - 1 - k
    words = [w for w in word_tokens(tokenizer) if len(encode(tokenizer, w)) == 1]
    if m < 1 or len(words) < k:
        raise DataError(f"an induction prompt of {n_tokens} tokens needs at least 4 tokens and {k} one-token words "
                        f"(this vocabulary has {len(words)})")
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        seq = rng.sample(words, k)
        text = "".join(seq + seq[:m])
        if len(encode(tokenizer, text)) != k + m:  # the words must stay one token each inside the text
            raise DataError("the induction words do not tokenize one token each in sequence")
        records.append({"text": text, "roles": {"match": m - 1, "next": m, "end": k + m - 1},
                        "target": seq[m], "distractor": seq[m + 1]})
    return records


def write_records(records: list[dict], path: Path, header: str) -> None:
    """The records as a prompt file: `header` as # comment lines, then one JSON object a line."""
    lines = [f"# {line}" for line in header.splitlines()] + [json.dumps(r) for r in records]
    atomic_write(path, "\n".join(lines) + "\n")
