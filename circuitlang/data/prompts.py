"""Prompt data types and the loader for user prompt files (JSONL).

A :class:`Prompt` is everything a trace needs about one input: the exact token ids the model is fed,
the token positions of named roles (e.g. IO, S1, S2, end for the IOI task of Wang et al., 2023), the
answer token ids, and one display label per position so that traces aggregate across prompts whose
templates differ. This module is pure Python: the engine turns token ids into tensors.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

MAX_PROMPTS = 100_000
"""The most prompts a run takes (`prompts ioi N`, or the prompts of one file)."""

ROLE_NAME = re.compile(r"[A-Za-z_.\/][\w.:\/]*([+-][\w.:\/]+)*")
"""A role name a spec can write: the `.circ` grammar's bare WORD (tests check they agree)."""


class DataError(ValueError):
    """A problem with prompt data, stated in one sentence."""


class PromptFileError(DataError):
    """A problem with a prompt file found where it was written: `file:line:column: message` (column 0: none
    is meaningful; line 0: the file as a whole)."""

    def __init__(self, file: str, line: int, column: int, message: str):
        self.file, self.line, self.column, self.message = str(file), line, column, message
        super().__init__(str(self))

    def __str__(self) -> str:
        place = self.file + (f":{self.line}" if self.line else "") + (f":{self.column}" if self.line and self.column else "")
        return f"{place}: {self.message}"


@dataclass(frozen=True)
class Prompt:
    """One prompt.

    ``token_ids`` is exactly what the model is fed (BOS first when one was prepended); ``roles`` maps role
    names to positions in ``token_ids``, in priority order (the first role at a position names its label);
    ``labels`` has one display label per position; ``target``/``distractor`` are the token ids of the
    correct and the competing answer (IOI: the IO and S names). ``counterfactual``, when set, is the token ids of
    a counterfactual prompt aligned position by position with ``token_ids`` (same length; the faithfulness
    evaluation patches head outputs from it). ``targets``/``distractors``, when set, are answer *sets* (a task's,
    circuitlang.data.tasks): F compares the sets; ``target``/``distractor`` are then their first members.
    """

    text: str
    token_ids: tuple[int, ...]
    roles: tuple[tuple[str, int], ...]
    labels: tuple[str, ...]
    target: int | None = None
    distractor: int | None = None
    meta: tuple[tuple[str, str], ...] = ()
    counterfactual: tuple[int, ...] | None = None
    targets: tuple[int, ...] = ()
    distractors: tuple[int, ...] = ()

    def answer_sets(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(targets, distractors): the sets, or the one target and distractor; None without answers."""
        if self.target is None or self.distractor is None:
            return None
        return self.targets or (self.target,), self.distractors or (self.distractor,)

    def role(self, name: str) -> int:
        """The token position of role ``name``; DataError listing the known roles if it has none."""
        for role_name, position in self.roles:
            if role_name == name:
                return position
        known = ", ".join(role_name for role_name, _ in self.roles)
        raise DataError(f"unknown role {name!r}; this prompt's roles are: {known}")


@dataclass(frozen=True)
class PromptSet:
    """An ordered set of prompts; ``role_names`` are the roles every prompt defines; ``metric`` is how F compares
    the answers: ``logit`` (difference of the mean logits of the targets and of the distractors) or ``probability``
    (difference of their summed probabilities)."""

    prompts: tuple[Prompt, ...]
    role_names: tuple[str, ...]
    description: str
    metric: str = "logit"

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __getitem__(self, index: int | slice) -> Prompt | PromptSet:
        """A prompt for an int; a PromptSet (same roles and description) for a slice."""
        if isinstance(index, slice):
            return PromptSet(self.prompts[index], self.role_names, self.description, self.metric)
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


_KEYS = ("text", "roles", "target", "distractor", "counterfactual")


@dataclass(frozen=True)
class PromptRecord:
    """One line of a prompt file, checked for everything that needs no tokenizer."""

    line: int
    text: str
    roles: tuple[tuple[str, Any], ...]  # (name, int | word | {"word": ..., "occurrence": n}), as written
    target: str | None
    distractor: str | None
    counterfactual: str | None = None
    # (key, column) of each key written ("roles.NAME" for a role), for the token-level errors; 0: not found
    columns: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    def column(self, key: str) -> int:
        return dict(self.columns).get(key, 0)


def read_prompt_file(path: str | Path) -> tuple[PromptRecord, ...]:
    """The prompts of a JSONL prompt file, checked without a tokenizer: the file exists and is UTF-8 text,
    each line is a JSON object with a non-empty string `text`, known keys only, `roles` an object of valid
    role names and values, `target`/`distractor` strings, at least one and at most MAX_PROMPTS prompts.

    Raises PromptFileError naming `file:line:column`. Token-level checks (a role's word is a token, a
    position is inside the text's tokens, an answer is one token) need the tokenizer: `load_prompt_file`.
    """
    name = str(path)
    path = Path(path)
    if path.is_dir():
        raise PromptFileError(name, 0, 0, "is a directory, not a prompt file (a JSONL file, one prompt a line)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(name, 0, 0, "no such prompt file") from None
    except OSError as err:
        raise PromptFileError(name, 0, 0, f"cannot read the prompt file: {(err.strerror or str(err)).lower()}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise PromptFileError(name, line, column, f"not UTF-8 text (byte 0x{data[err.start]:02x}); "
                              "save the file as UTF-8") from None
    records = []
    # split on \n only: JSON strings may hold U+2028 and other characters str.splitlines() breaks at
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip() and not line.lstrip().startswith("#"):
            if len(records) == MAX_PROMPTS:
                raise PromptFileError(name, number, 0, f"more than {MAX_PROMPTS} prompts; split the file")
            records.append(_record(line, name, number))
    if not records:
        raise PromptFileError(name, 0, 0, "no prompts in file (blank lines and # comments only)")
    return tuple(records)


def common_roles(records: tuple[PromptRecord, ...]) -> tuple[str, ...]:
    """The role names every prompt defines, in the first prompt's order: the roles a trace root may name."""
    common = set.intersection(*({name for name, _ in r.roles} for r in records))
    return tuple(name for name, _ in records[0].roles if name in common)


def _record(line: str, file: str, number: int) -> PromptRecord:
    """One prompt line checked without a tokenizer."""
    def error(message: str, column: int = 0) -> PromptFileError:
        return PromptFileError(file, number, column, message)

    def column_of(key: str) -> int:
        return line.find(json.dumps(key)) + 1  # 0 (none) when the key is written with escapes

    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise error(f"bad JSON: {err.msg}", err.colno) from None
    except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; nesting too deep
        raise error(f"bad JSON: {err if isinstance(err, ValueError) else 'nested too deeply'}") from None
    if not isinstance(record, dict):
        raise error(f"expected a JSON object like {{\"text\": ...}}, got {_json_type(record)}", 1)
    for key in record:
        if key not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise error(f"unknown key {key!r}; keys are {', '.join(map(repr, _KEYS))}{hint}", column_of(key))
    text = record.get("text")
    if "text" not in record:
        raise error("missing 'text' (the prompt, a non-empty string)", 1)
    if not isinstance(text, str) or not text.strip():
        raise error(f"'text' must be a non-empty string, got {_json_type(text)}", column_of("text"))
    raw_roles = record.get("roles", {})
    if not isinstance(raw_roles, dict):
        raise error(f"'roles' must be an object mapping role names to positions or words, got {_json_type(raw_roles)}",
                    column_of("roles"))
    roles = []
    for role, value in raw_roles.items():
        if not ROLE_NAME.fullmatch(role):
            raise error(f"role name {role!r} can't be written in a spec: use letters, digits and _ . : / "
                        "(+ or - between parts), starting with a letter or _", column_of(role))
        problem = _role_problem(value, text)
        if problem:
            raise error(f"role {role!r}: {problem}", column_of(role))
        roles.append((role, value))
    answers = {}
    for key in ("target", "distractor"):
        value = record.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise error(f"{key!r} must be a non-empty string (one token of the answer, e.g. \" Mary\"), "
                        f"got {_json_type(value)}", column_of(key))
        answers[key] = value
    counterfactual = record.get("counterfactual")
    if "counterfactual" in record and (not isinstance(counterfactual, str) or not counterfactual.strip()):
        raise error(f"'counterfactual' must be a non-empty string (the same prompt with the task's evidence changed), "
                    f"got {_json_type(counterfactual)}", column_of("counterfactual"))
    columns = tuple((key, column_of(key)) for key in record) + tuple((f"roles.{role}", column_of(role)) for role, _ in roles)
    return PromptRecord(number, text, tuple(roles), answers["target"], answers["distractor"], counterfactual, columns)


def _role_problem(value: Any, text: str) -> str | None:
    """What is wrong with one role value, as far as can be known without a tokenizer; None if nothing."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value >= 0 else f"position {value} is negative (positions count the text's tokens from 0)"
    occurrence = 1
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"word", "occurrence"})
        if unknown:
            return f"unknown key {unknown[0]!r} in {{\"word\": ..., \"occurrence\": n}}"
        occurrence = value.get("occurrence", 1)
        if not isinstance(occurrence, int) or isinstance(occurrence, bool) or occurrence < 1:
            return f"occurrence must be a positive integer, got {_json_type(occurrence)}"
        value = value.get("word")
    if not isinstance(value, str) or not value.strip():
        return ("must be a token position (an integer), a word (a string) or {\"word\": ..., \"occurrence\": n}, "
                f"got {_json_type(value)}")
    word = value.strip()
    found = text.count(word)  # a token equal to the word is an occurrence of it in the text
    if not found:
        return f"word {word!r} not found in the text"
    if found < occurrence:
        return f"word {word!r} occurs {found} time(s) in the text, not {occurrence}"
    return None


def _json_type(value: Any) -> str:
    """How a JSON value is described in an error: its type, and the value itself when short."""
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    shown = json.dumps(value, ensure_ascii=False)
    return f"{kind} {shown}" if len(shown) <= 30 and not isinstance(value, (dict, list)) and value is not None else kind


def load_prompt_file(path: str | Path, tokenizer: Any, *, prepend_bos: bool = False) -> PromptSet:
    """Read prompts from a JSONL file, one JSON object a line (docs/language.md, "Prompt files").

    Each line is ``{"text": ..., "roles": {...}, "target": " Mary", "distractor": " John"}``; ``roles``,
    ``target`` and ``distractor`` are optional. A role value is an int (a position in the text's own
    tokens, before any BOS), a word (the first token whose text, stripped, equals the word stripped) or
    ``{"word": "John", "occurrence": 2}`` (its 2nd such token). ``target``/``distractor`` must each be a
    single token. Blank lines and lines starting with ``#`` are skipped. ``role_names`` are the roles common
    to all prompts, in the first prompt's order. Every problem raises DataError naming ``file:line``:
    `read_prompt_file` checks what needs no tokenizer (so `circ check` can), this the tokens.
    """
    records = read_prompt_file(path)
    shown = _shown(path)
    prompts = tuple(_file_prompt(r, shown, tokenizer, prepend_bos) for r in records)
    return PromptSet(prompts, common_roles(records), f"file {Path(path).name} ({len(prompts)} prompts)")


def _shown(path: str | Path) -> str:
    """A prompt file as an error names it: relative to the working directory when it lies below it (the plan
    holds it absolute), else as given."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _file_prompt(record: PromptRecord, file: str, tokenizer: Any, prepend_bos: bool) -> Prompt:
    """One prompt from one checked line; a token-level problem is a PromptFileError at the key it is about."""
    def where(key: str) -> tuple[str, int, int]:
        return file, record.line, record.column(key)

    ids = encode(tokenizer, record.text)
    offset = 1 if prepend_bos else 0
    roles = tuple((name, _role_position(value, name, ids, tokenizer, where(f"roles.{name}")) + offset) for name, value in record.roles)
    token_ids = tuple(([bos_id(tokenizer)] if prepend_bos else []) + ids)
    return Prompt(
        text=record.text,
        token_ids=token_ids,
        roles=roles,
        labels=token_labels(token_ids, roles, tokenizer, bos=prepend_bos),
        target=_answer_id(record.target, "target", tokenizer, where("target")),
        distractor=_answer_id(record.distractor, "distractor", tokenizer, where("distractor")),
        meta=(("source", f"{file}:{record.line}"),),
        counterfactual=_counterfactual_ids(record, ids, token_ids[:offset], tokenizer, where("counterfactual")),
    )


def _counterfactual_ids(record: PromptRecord, ids: list[int], bos: tuple[int, ...], tokenizer: Any,
                        where: tuple[str, int, int]) -> tuple[int, ...] | None:
    """The counterfactual's token ids (BOS as the text's), which must align with the text's token by token."""
    if record.counterfactual is None:
        return None
    cf = encode(tokenizer, record.counterfactual)
    if len(cf) != len(ids):
        raise PromptFileError(*where, f"counterfactual has {len(cf)} tokens and the text {len(ids)}; they must align "
                              "token by token (change words for words of as many tokens)")
    return bos + tuple(cf)


def _role_position(value: Any, name: str, ids: list[int], tokenizer: Any, where: tuple[str, int, int]) -> int:
    """The position (in the text's own tokens) that a role value points at."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(ids):
            raise PromptFileError(*where, f"role {name!r} position {value} out of range (text has {len(ids)} tokens)")
        return value
    occurrence = 1
    if isinstance(value, dict) and set(value) <= {"word", "occurrence"}:
        occurrence = value.get("occurrence", 1)
        value = value.get("word")
        if not isinstance(occurrence, int) or isinstance(occurrence, bool) or occurrence < 1:
            raise PromptFileError(*where, f"role {name!r} occurrence must be a positive integer")
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError(*where, f"role {name!r} must be a token position, a word, or {{\"word\": ..., \"occurrence\": n}}"
        )
    word = value.strip()
    hits = [i for i, token_id in enumerate(ids) if tokenizer.decode([token_id]).strip() == word]
    if not hits:
        raise PromptFileError(*where, f"role {name!r}: word {word!r} not found among the text's tokens")
    if len(hits) < occurrence:
        raise PromptFileError(*where, f"role {name!r}: word {word!r} occurs {len(hits)} time(s), not {occurrence}")
    return hits[occurrence - 1]


def _answer_id(word: str | None, key: str, tokenizer: Any, where: tuple[str, int, int]) -> int | None:
    """The single token id of an answer (None if absent)."""
    if word is None:
        return None
    ids = encode(tokenizer, word)
    if len(ids) != 1:
        raise PromptFileError(*where, f"{key} {word!r} is not a single token for this tokenizer ({len(ids)} tokens)")
    return ids[0]
