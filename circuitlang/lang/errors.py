"""The one error a spec can raise: `file:line:col: message`, on one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from circuitlang.lang.plan import Where


class SpecError(Exception):
    """A mistake in a spec, with where it was written. `str(e)` is one line."""

    def __init__(self, file: str, line: int, column: int, message: str):
        self.file, self.line, self.column, self.message = file, line, column, message
        super().__init__(str(self))

    @classmethod
    def at(cls, where: Where, message: str) -> SpecError:
        return cls(*where, message)

    def __str__(self) -> str:
        if self.line:  # column 0: the line as a whole (a prompt file's line, say)
            return f"{self.file}:{self.line}" + (f":{self.column}" if self.column else "") + f": {self.message}"
        return f"{self.file}: {self.message}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`'; did you mean "x"?'` for the closest choice (case-insensitive), or ''."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), by_lower, n=1, cutoff=0.6)
    return f'; did you mean "{by_lower[close[0]]}"?' if close else ""


def listing(items: Iterable[str], last: str = "or") -> str:
    """`a, b or c`."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"
