"""Prompt data types and the loader for user prompt files (JSONL).

A :class:`Prompt` is everything a trace needs about one input: the exact token ids the model is fed,
the token positions of named roles (e.g. IO, S1, S2, end for the IOI task of Wang et al., 2023), the
answer token ids, and one display label per position so that traces aggregate across prompts whose
templates differ. This module is pure Python: the engine turns token ids into tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping


class DataError(ValueError):
    """A problem with prompt data, stated in one sentence."""


@dataclass(frozen=True)
class Prompt:
    """One prompt.

    ``token_ids`` is exactly what the model is fed (BOS first when one was prepended); ``roles`` maps role
    names to positions in ``token_ids``, in priority order (the first role at a position names its label);
    ``labels`` has one display label per position; ``target``/``distractor`` are the token ids of the
    correct and the competing answer (IOI: the IO and S names).
    """

    text: str
    token_ids: tuple[int, ...]
    roles: tuple[tuple[str, int], ...]
    labels: tuple[str, ...]
    target: int | None = None
    distractor: int | None = None
    meta: tuple[tuple[str, str], ...] = ()

    def role(self, name: str) -> int:
        """The token position of role ``name``; DataError listing the known roles if it has none."""
        for role_name, position in self.roles:
            if role_name == name:
                return position
        known = ", ".join(role_name for role_name, _ in self.roles)
        raise DataError(f"unknown role {name!r}; this prompt's roles are: {known}")


@dataclass(frozen=True)
class PromptSet:
    """An ordered set of prompts; ``role_names`` are the roles every prompt defines."""

    prompts: tuple[Prompt, ...]
    role_names: tuple[str, ...]
    description: str

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __getitem__(self, index: int | slice) -> Prompt | PromptSet:
        """A prompt for an int; a PromptSet (same roles and description) for a slice."""
        if isinstance(index, slice):
            return PromptSet(self.prompts[index], self.role_names, self.description)
        return self.prompts[index]


def token_labels(
    token_ids: tuple[int, ...], roles: tuple[tuple[str, int], ...], tokenizer: Any, *, bos: bool
) -> tuple[str, ...]:
    """One label per position: the first role (in ``roles`` order) at that position, else ``BOS`` for a
    prepended BOS token, else the token's text, stripped, in single quotes (e.g. ``'went'``)."""
    by_position: dict[int, str] = {}
    for name, position in roles:
        by_position.setdefault(position, name)
    labels = []
    for position, token_id in enumerate(token_ids):
        if position in by_position:
            labels.append(by_position[position])
        elif bos and position == 0:
            labels.append("BOS")
        else:
            labels.append(f"'{tokenizer.decode([token_id]).strip()}'")
    return tuple(labels)


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text`` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_id(tokenizer: Any) -> int:
    """The tokenizer's BOS token id; DataError if it has none."""
    if tokenizer.bos_token_id is None:
        raise DataError("prepend_bos was asked for but this tokenizer has no BOS token")
    return tokenizer.bos_token_id


_KEYS = {"text", "roles", "target", "distractor"}


def load_prompt_file(path: str | Path, tokenizer: Any, *, prepend_bos: bool = False) -> PromptSet:
    """Read prompts from a JSONL file, one JSON object a line.

    Each line is ``{"text": ..., "roles": {...}, "target": " Mary", "distractor": " John"}``; ``roles``,
    ``target`` and ``distractor`` are optional. A role value is an int (a position in the text's own
    tokens, before any BOS), a word (the first token whose text, stripped, equals the word stripped) or
    ``{"word": "John", "occurrence": 2}`` (its 2nd such token). ``target``/``distractor`` must each be a
    single token. Blank lines and lines starting with ``#`` are skipped. ``role_names`` are the roles common
    to all prompts, in the first prompt's order. Every problem raises DataError naming ``file:line``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read prompt file {path}: {err.strerror or err}") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            prompts.append(_file_prompt(line, f"{path}:{number}", tokenizer, prepend_bos))
    if not prompts:
        raise DataError(f"{path}: no prompts in file")
    common = set.intersection(*({name for name, _ in p.roles} for p in prompts))
    role_names = tuple(name for name, _ in prompts[0].roles if name in common)
    return PromptSet(tuple(prompts), role_names, f"file {path.name} ({len(prompts)} prompts)")


def _file_prompt(line: str, where: str, tokenizer: Any, prepend_bos: bool) -> Prompt:
    """One prompt from one JSONL line; ``where`` is ``file:line`` for error messages."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _KEYS)
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    text = record.get("text")
    if not isinstance(text, str) or not text:
        raise DataError(f"{where}: missing 'text' (a non-empty string)")
    raw_roles = record.get("roles", {})
    if not isinstance(raw_roles, dict):
        raise DataError(f"{where}: 'roles' must be an object mapping role names to positions or words")

    ids = encode(tokenizer, text)
    offset = 1 if prepend_bos else 0
    roles = tuple(
        (name, _role_position(value, name, ids, tokenizer, where) + offset) for name, value in raw_roles.items()
    )
    token_ids = tuple(([bos_id(tokenizer)] if prepend_bos else []) + ids)
    return Prompt(
        text=text,
        token_ids=token_ids,
        roles=roles,
        labels=token_labels(token_ids, roles, tokenizer, bos=prepend_bos),
        target=_answer_id(record, "target", tokenizer, where),
        distractor=_answer_id(record, "distractor", tokenizer, where),
        meta=(("source", where),),
    )


def _role_position(value: Any, name: str, ids: list[int], tokenizer: Any, where: str) -> int:
    """The position (in the text's own tokens) that a role value points at."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(ids):
            raise DataError(f"{where}: role {name!r} position {value} out of range (text has {len(ids)} tokens)")
        return value
    occurrence = 1
    if isinstance(value, dict) and set(value) <= {"word", "occurrence"}:
        occurrence = value.get("occurrence", 1)
        value = value.get("word")
        if not isinstance(occurrence, int) or isinstance(occurrence, bool) or occurrence < 1:
            raise DataError(f"{where}: role {name!r} occurrence must be a positive integer")
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{where}: role {name!r} must be a token position, a word, or {{\"word\": ..., \"occurrence\": n}}"
        )
    word = value.strip()
    hits = [i for i, token_id in enumerate(ids) if tokenizer.decode([token_id]).strip() == word]
    if not hits:
        raise DataError(f"{where}: role {name!r}: word {word!r} not found among the text's tokens")
    if len(hits) < occurrence:
        raise DataError(f"{where}: role {name!r}: word {word!r} occurs {len(hits)} time(s), not {occurrence}")
    return hits[occurrence - 1]


def _answer_id(record: Mapping[str, Any], key: str, tokenizer: Any, where: str) -> int | None:
    """The single token id of ``record[key]`` (None if absent)."""
    word = record.get(key)
    if word is None:
        return None
    ids = encode(tokenizer, word) if isinstance(word, str) else []
    if len(ids) != 1:
        raise DataError(f"{where}: {key} {word!r} is not a single token for this tokenizer ({len(ids)} tokens)")
    return ids[0]
