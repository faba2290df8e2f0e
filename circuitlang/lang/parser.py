"""Syntax of the `.circ` language: text -> one Lark tree per statement.

Lark's errors become one-line SpecErrors that say what was found and what was expected in a
researcher's words, with the nearest keyword when the word looks like a typo.
"""

from __future__ import annotations

import re
from importlib.resources import files

from lark import Lark, Token, Tree, UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from circuitlang.lang.errors import SpecError, did_you_mean, listing
from circuitlang.lang.plan import READING_KEYS, READING_SETS, WRITERS

_PARSER = Lark(
    files("circuitlang.lang").joinpath("circuit.lark").read_text(),
    parser="lalr",
    lexer="basic",
    propagate_positions=True,
    maybe_placeholders=True,
)

STATEMENTS = ("model", "task", "prompts", "trace", "firing", "slices", "keep", "show", "compare", "output",
              "seed", "extends", "evaluate", "sources", "readings", "intervene")
_BLOCK_WORDS = ("edge", "edges", "top", "ablate", "boost", "global", "local", "against", "}",
                "words", "slot", "template", "target", "distractor", "counterfactual", "metric")
_LITERALS = {t.name: t.pattern.value for t in _PARSER.terminals if isinstance(t.pattern, PatternStr)}
KEYWORDS = frozenset(v for v in _LITERALS.values() if v.isidentifier())
BARE_WORD = re.compile(next(t.pattern.value for t in _PARSER.terminals if t.name == "WORD"))
_ENDS = {"_NL": "end of line", "$END": "end of file"}
_NAMED = {"DECIMAL": "a head like 9.9", "HEADS": "every head of a layer like 9.*", "LAYER_RANGE": "layers like 9-11", "INT": "a whole number", "WORD": "a name",
          "STRING": "a quoted string", **_ENDS}
# What the words of `sources` and `readings` are (the grammar takes any word there, for "did you mean"): an
# error in them lists these, not the keywords of other statements that the lexer lets through.
_SETTINGS = {"sources": (f"a source ({listing(WRITERS)})",) * 2,
             "readings": (f"a set of readings ({listing(READING_SETS)})", f"a reading ({listing(READING_KEYS)}) with its value")}
# a WORD after one of these is a token role (`9.9 end->IO`, `at end`, `every firing of layer 9 from end to S2`)
_BEFORE_ROLE = {"DECIMAL", "HEADS"} | {name for name, value in _LITERALS.items() if value in ("->", "at", "from", "to")}


def parse_statements(text: str, filename: str) -> list[Tree]:
    """The statements of one spec file, in order; each tree's `meta` has its line and column."""
    text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark, as some Windows editors write one
    try:
        return _PARSER.parse(text + "\n").children
    except UnexpectedInput as e:
        raise _syntax_error(e, text, filename) from None


def _syntax_error(e: UnexpectedInput, text: str, filename: str) -> SpecError:
    if isinstance(e, UnexpectedToken):
        kind, found = e.token.type, e.token.value
    elif isinstance(e, UnexpectedCharacters):
        kind, found = "", re.compile(r"\S+").match(text, e.pos_in_stream).group()
    else:
        return SpecError(filename, e.line, e.column, "unexpected text")
    expected = e.interactive_parser.accepts()
    words = [_LITERALS[n] for n in expected if n in _LITERALS]
    said = _ENDS.get(kind) or f'"{found}"'
    hint = "" if kind in _ENDS else did_you_mean(found, [w for w in words if w.isidentifier()] or words)

    if found.startswith('"') and kind != "STRING":
        message = f'unterminated string {found}; close it with " on the same line'
    elif kind == "$END" and "RBRACE" in expected:
        message = f'unclosed {_open_block(text, e.line)} block; end it with a line holding "}}"'
    elif "model" in words and found in _BLOCK_WORDS:
        message = f"{said} is only allowed inside {'an intervene' if _BLOCK_WORDS.index(found) < 9 else 'a task'} block"
    elif "model" in words:
        message = f"unknown statement {said}" + (hint or f"; statements are {listing(STATEMENTS)}")
    elif "}" in words and found in STATEMENTS:
        message = f'statement {said} inside {_open_block(text, e.line, "a")} block; close the block with "}}" first'
    else:
        message = f"expected {listing(_describe(expected, e))}, found {said}{hint}"
    return SpecError(filename, e.line, e.column, message)


def _open_block(text: str, line: int, article: str = "") -> str:
    """The kind of block open at `line` ("intervene" or "task"), with "a"/"an" before it when asked."""
    kind = "intervene"
    for row in text.split("\n")[:line][::-1]:
        word = row.split()[0] if row.split() else ""
        if word in ("task", "intervene"):
            kind = word
            break
    return f"{'an' if kind == 'intervene' else 'a'} {kind}" if article else kind


def _describe(expected: set[str], e: UnexpectedInput) -> list[str]:
    stack = e.interactive_parser.parser_state.value_stack
    statement = [t for t in stack if isinstance(t, Token) and t.value in _SETTINGS]
    if statement and "WORD" in expected:  # inside `sources` or `readings`: their words, not the keywords
        first, later = _SETTINGS[statement[-1].value]
        return [later if len(stack) > stack.index(statement[-1]) + 1 else first] + [_ENDS["_NL"]] * ("_NL" in expected)
    names = set(expected)
    if {"INT", "DECIMAL"} <= names:
        names -= {"INT", "DECIMAL"}
        names.add("NUMBER")
    words = sorted(f'"{_LITERALS[n]}"' for n in names if n in _LITERALS)
    role = stack and isinstance(stack[-1], Token) and stack[-1].type in _BEFORE_ROLE
    named = {**_NAMED, "NUMBER": "a number", "WORD": "a token role like end or IO" if role else "a name"}
    return words + [text for name, text in named.items() if name in names]
