"""Prompts of a `task` block (docs/language.md, "Tasks"): templates whose `{slot}` placeholders are filled with
words drawn from word lists, the roles named by slot, answer sets and a counterfactual as functions of the slots.

Pure Python (no torch). The compiler checks a task with `placeholders` and `template_roles` (no tokenizer); once
the model's tokenizer is loaded, `task_prompts` drops the words that are not one token where they are written,
draws the prompts and checks what only the tokens can say (answers of one token, counterfactuals aligned).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from circuitlang.data.prompts import DataError, Prompt, PromptSet, bos_id, encode, token_labels

_OPERAND = r"\s*(?:(\d+)|([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?)\s*(?:([+-])\s*(\d+))?\s*"
_REFERENCE = re.compile(r"\s*([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?\s*")
_RANGE = re.compile(_OPERAND + r"\.\." + _OPERAND)
_BRACES = re.compile(r"\{([^{}]*)\}")


class TaskTextError(ValueError):
    """A placeholder that cannot be read, at `offset` in its text."""

    def __init__(self, offset: int, message: str):
        self.offset, self.message = offset, message
        super().__init__(message)


@dataclass(frozen=True)
class Reference:
    """`{slot}` or `{slot.column}` at `offset` of its text: the slot's word (its first column, or the named one)."""

    slot: str
    column: str | None
    offset: int


@dataclass(frozen=True)
class Operand:
    """One end of a range: a number, or a slot's word read as a whole number, plus `shift`."""

    number: int | None
    slot: str | None
    column: str | None
    shift: int


@dataclass(frozen=True)
class Span:
    """`{lo..hi}` at `offset`: one answer per whole number from lo to hi, zero-padded to the widest operand."""

    lo: Operand
    hi: Operand
    offset: int


Piece = str | Reference | Span


def placeholders(text: str) -> list[Piece]:
    """The text as literal pieces and placeholders; TaskTextError for a placeholder that cannot be read."""
    pieces: list[Piece] = []
    at = 0
    for match in _BRACES.finditer(text):
        pieces.append(text[at : match.start()])
        inside, offset = match.group(1), match.start()
        if m := _REFERENCE.fullmatch(inside):
            pieces.append(Reference(m.group(1), m.group(2), offset))
        elif m := _RANGE.fullmatch(inside):
            pieces.append(Span(_operand(m.groups()[:5]), _operand(m.groups()[5:]), offset))
        else:
            raise TaskTextError(offset, f'cannot read the placeholder "{{{inside}}}"; write {{slot}}, {{slot.column}} '
                                "or a range {A..B} (A, B: a number or a slot, with + or - a number)")
        at = match.end()
    pieces.append(text[at:])
    stray = next((i for i, c in enumerate(text) if c in "{}" and not _inside(i, text)), None)
    if stray is not None:
        raise TaskTextError(stray, f'unmatched "{text[stray]}"; placeholders are written {{slot}}')
    return [p for p in pieces if p != ""]


def _inside(i: int, text: str) -> bool:
    return any(m.start() <= i < m.end() for m in _BRACES.finditer(text))


def _operand(groups: tuple) -> Operand:
    number, slot, column, sign, shift = groups
    return Operand(None if number is None else int(number), slot, column, (-1 if sign == "-" else 1) * int(shift or 0))


def references(text: str) -> list[Reference | Operand]:
    """Every slot a text reads (its references and the slot operands of its ranges)."""
    found: list[Reference | Operand] = []
    for piece in placeholders(text):
        if isinstance(piece, Reference):
            found.append(piece)
        elif isinstance(piece, Span):
            found += [o for o in (piece.lo, piece.hi) if o.slot is not None]
    return found


def template_roles(texts: list[str]) -> list[tuple[str, ...]]:
    """The roles of each template, in text order, then `end`: a slot's placeholder is a role named after the slot,
    numbered from 1 (`S1`, `S2`) when some template writes the slot more than once."""
    counts = [Counter(p.slot for p in placeholders(t) if isinstance(p, Reference)) for t in texts]
    repeated = {slot for c in counts for slot, k in c.items() if k > 1}
    out = []
    for text in texts:
        seen: Counter = Counter()
        roles = []
        for p in placeholders(text):
            if isinstance(p, Reference):
                seen[p.slot] += 1
                roles.append(f"{p.slot}{seen[p.slot]}" if p.slot in repeated else p.slot)
        out.append((*roles, "end"))
    return out


# ---------------------------------------------------------------------------------------------- prompts


def task_prompts(task: Any, tokenizer: Any, n: int = 256, seed: int = 0, *, prepend_bos: bool = False) -> PromptSet:
    """`n` prompts of `task` (a circuitlang.lang.plan.Task), deterministic for `seed`.

    Words that are not one token where a text writes them (with the leading space the text puts before them, or
    none) are dropped first, and the description counts them. Then, with one `random.Random(seed)`, for each prompt
    in turn: `rng.choice` of a template, then for each `slot` statement in order `rng.choice` of a row (one name) or
    `rng.sample` of distinct rows (several). A counterfactual that draws fresh words uses a second
    `random.Random(seed)`, prompt by prompt once all are drawn: `rng.sample` of the rows the prompt did not draw.
    These are the IOI generator's draws (circuitlang.data.ioi), so the IOI task reproduces its prompts.
    """
    where = dict(task.where)
    vocabularies = {v.name: v for v in task.vocabularies}
    slots = {name: vocabularies[s.vocabulary] for s in task.slots for name in s.names}
    roles = template_roles([t.text for t in task.templates])
    rows, dropped = _one_token_rows(task, tokenizer, vocabularies, slots, roles)
    swap = task.counterfactual
    for s in task.slots:
        wanted = len(s.names) + (len(swap.roles) if swap and swap.vocabulary == s.vocabulary else 0)
        if len(rows[s.vocabulary]) < wanted:
            raise DataError(_at(task, where, f"words {s.vocabulary}", f"only {len(rows[s.vocabulary])} of the "
                                f"{len(vocabularies[s.vocabulary].rows)} words of {s.vocabulary} are one token for this "
                                f"tokenizer; slot {', '.join(s.names)} and the counterfactual need {wanted}"))
    rng = random.Random(seed)
    drawn = []
    for _ in range(n):
        index = rng.randrange(len(task.templates))
        values = {}
        for s in task.slots:
            pool = rows[s.vocabulary]
            values.update(zip(s.names, [rng.choice(pool)] if len(s.names) == 1 else rng.sample(pool, len(s.names))))
        drawn.append((index, values))
    cf_rng = random.Random(seed)
    prompts = []
    for index, values in drawn:
        fresh = {}
        if swap is not None and swap.vocabulary is not None:
            taken = [row for slot, row in values.items() if slots[slot].name == swap.vocabulary]
            pool = [row for row in rows[swap.vocabulary] if row not in taken]
            fresh = dict(zip(swap.roles, cf_rng.sample(pool, len(swap.roles))))
        prompts.append(_prompt(task, where, index, roles[index], values, fresh, slots, vocabularies, tokenizer, prepend_bos))
    common = tuple(r for r in roles[0] if all(r in rs for rs in roles))
    description = f'task "{task.name}" {n} seed {seed}'
    if any(dropped.values()):
        description += ", dropped " + ", ".join(f"{k} of {len(vocabularies[v].rows)} words {v}"
                                                for v, k in dropped.items() if k) + " (not one token)"
    if prepend_bos:
        description += ", BOS"
    return PromptSet(tuple(prompts), common, description, metric=task.metric)


def dropped_words(description: str) -> str:
    """The dropped-words part of a task prompt set's description ('' when none were)."""
    return description[description.find("dropped"):].split(" (not one token)")[0] if "dropped" in description else ""


def _at(task: Any, where: dict, key: str, message: str) -> str:
    w = where.get(key)
    place = f"{w.file}:{w.line}:{w.column}" if w is not None and w.line else (task.file or f'task "{task.name}"')
    return f"{place}: {message}"


def _one_token_rows(task: Any, tokenizer: Any, vocabularies: dict, slots: dict, roles: list) -> tuple[dict[str, list], dict[str, int]]:
    """The rows of each word list whose words are one token wherever a text writes them, and how many were dropped.
    A word is written after a space (" Mary") or not ("7" in "17"), as its text puts it."""
    contexts: dict[str, set[tuple[int, str]]] = {v: set() for v in vocabularies}
    swap = task.counterfactual
    texts = [(t.text, i) for i, t in enumerate(task.templates)]
    for t in task.templates:
        texts += [(x, None) for x in (*t.targets, *t.distractors, *([t.counterfactual] if t.counterfactual else ()))]
    texts += [(x, None) for x in (*task.targets, *task.distractors, *([swap.text] if swap and swap.text else ()))]
    for text, template in texts:
        refs = [p for p in placeholders(text) if isinstance(p, Reference)]
        for k, p in enumerate(refs):
            lead = " " if p.offset and text[p.offset - 1] == " " else ""
            contexts[slots[p.slot].name].add((_column(slots[p.slot], p.column), lead))
            if template is not None and swap and swap.vocabulary and roles[template][k] in swap.roles:
                contexts[swap.vocabulary].add((_column(vocabularies[swap.vocabulary], p.column), lead))
    rows, dropped = {}, {}
    for name, v in vocabularies.items():
        kept = [r for r in v.rows if all(len(encode(tokenizer, lead + r[c])) == 1 for c, lead in sorted(contexts[name]))]
        rows[name], dropped[name] = kept, len(v.rows) - len(kept)
    return rows, dropped


def _column(vocabulary: Any, column: str | None) -> int:
    return 0 if column is None else vocabulary.columns.index(column)


def _render(text: str, values: dict, slots: dict, replace: dict[int, str] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The text with its references filled (the k-th reference by replace[k] where given), and each reference's
    character span."""
    out, spans, k = "", [], 0
    for p in placeholders(text):
        if isinstance(p, Reference):
            word = (replace or {}).get(k, values[p.slot][_column(slots[p.slot], p.column)])
            spans.append((len(out), len(out) + len(word)))
            out += word
            k += 1
        else:
            out += p
    return out, spans


def _expand(text: str, values: dict, slots: dict) -> list[str]:
    """An answer text's answers: one, or one per number of each range in it."""
    pieces = placeholders(text)
    outs = [""]
    for p in pieces:
        if isinstance(p, Span):
            ends = [_value(o, values, slots) for o in (p.lo, p.hi)]
            width = max(w for _, w in ends)
            outs = [o + str(k).zfill(width) for o in outs for k in range(ends[0][0], ends[1][0] + 1)]
        else:
            word = p if isinstance(p, str) else values[p.slot][_column(slots[p.slot], p.column)]
            outs = [o + word for o in outs]
    return outs


def _value(o: Operand, values: dict, slots: dict) -> tuple[int, int]:
    """(value, digits) of a range's end."""
    if o.number is not None:
        return o.number + o.shift, len(str(o.number))
    word = values[o.slot][_column(slots[o.slot], o.column)]
    return int(word) + o.shift, len(word)


def _tokens(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        got = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError("tasks need a fast tokenizer (one that gives each token's characters)") from None
    return list(got["input_ids"]), [tuple(o) for o in got["offset_mapping"]]


def _prompt(task: Any, where: dict, index: int, roles: tuple[str, ...], values: dict, fresh: dict, slots: dict,
            vocabularies: dict, tokenizer: Any, prepend_bos: bool) -> Prompt:
    template = task.templates[index]
    here = f"template {index + 1}"
    text, spans = _render(template.text, values, slots)
    ids, offsets = _tokens(tokenizer, text)
    positions = []
    for (start, stop), role in zip(spans, roles):
        hit = [i for i, (a, b) in enumerate(offsets) if a < stop and b > start]
        if len(hit) != 1 or offsets[hit[0]][0] < start - 1 or offsets[hit[0]][1] > stop:
            raise DataError(_at(task, where, here, f'the word "{text[start:stop]}" of role {role} is not one token of its own '
                                f"in {text!r}; change the template or the word"))
        positions.append(hit[0])
    positions.append(len(ids) - 1)  # end: where the answer is read
    answers = []
    for key, own, default in (("target", template.targets, task.targets), ("distractor", template.distractors, task.distractors)):
        ids_of = []
        for answer in own or default:
            for word in _expand(answer, values, slots):
                got = encode(tokenizer, word)
                if len(got) != 1:
                    raise DataError(_at(task, where, here if own else key, f"{key} {word!r} is {len(got)} tokens for this "
                                        "tokenizer; an answer must be one token"))
                if got[0] not in ids_of:
                    ids_of.append(got[0])
        if not ids_of:
            raise DataError(_at(task, where, here if own else key, f"the {key}s of {text!r} are an empty set"))
        answers.append(tuple(ids_of))
    both = set(answers[0]) & set(answers[1])
    if both:
        raise DataError(_at(task, where, here if template.targets else "target", f"{tokenizer.decode([min(both)])!r} is both "
                            f"a target and a distractor of {text!r}"))
    counterfactual, cf_text = _counterfactual(task, template, roles, values, fresh, slots, vocabularies)
    cf_ids = None
    if cf_text is not None:
        cf_ids = encode(tokenizer, cf_text)
        if len(cf_ids) != len(ids):
            raise DataError(_at(task, where, counterfactual, f"the counterfactual {cf_text!r} has {len(cf_ids)} tokens and its "
                                f"prompt {text!r} {len(ids)}; they must align token by token"))
    offset = 1 if prepend_bos else 0
    bos = [bos_id(tokenizer)] if prepend_bos else []
    role_positions = tuple((role, position + offset) for role, position in zip(roles, positions))
    token_ids = tuple(bos + ids)
    return Prompt(
        text=text, token_ids=token_ids, roles=role_positions,
        labels=token_labels(token_ids, role_positions, tokenizer, bos=prepend_bos),
        target=answers[0][0], distractor=answers[1][0], targets=answers[0], distractors=answers[1],
        meta=(("template", str(index + 1)),) + ((("counterfactual", cf_text),) if cf_text is not None else ()),
        counterfactual=tuple(bos + cf_ids) if cf_ids is not None else None,
    )


def _counterfactual(task: Any, template: Any, roles: tuple[str, ...], values: dict, fresh: dict, slots: dict,
                    vocabularies: dict) -> tuple[str, str | None]:
    """(where the rule was written, the counterfactual text or None when the task has none)."""
    if template.counterfactual is not None:
        return f"template {task.templates.index(template) + 1}", _render(template.counterfactual, values, slots)[0]
    swap = task.counterfactual
    if swap is None:
        return "counterfactual", None
    refs = [p for p in placeholders(template.text) if isinstance(p, Reference)]
    replace = {}
    for k, (role, p) in enumerate(zip(roles, refs)):
        if role in swap.roles:
            if swap.vocabulary is not None:
                replace[k] = fresh[role][_column(vocabularies[swap.vocabulary], p.column)]
            else:
                replace[k] = _render(swap.text, values, slots)[0]
    return "counterfactual", _render(template.text, values, slots, replace)[0]
