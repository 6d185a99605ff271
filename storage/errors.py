"""Errors of the target store. The CLI prints their message (one line each) and exits non-zero."""
from __future__ import annotations


class StoreError(Exception):
    """A store that is missing, unreadable, of another format version or inconsistent.

    The message names the store (or file in it), says what is wrong and how to fix it.
    """


class StoreMismatch(StoreError):
    """A store made with another configuration than the one at hand.

    `lines` holds one line per differing field ("shots: store has 32, config has 8"); the message
    is a header line, those lines indented, and a line with the fix.
    """

    def __init__(self, header: str, lines: list[str], fix: str):
        self.lines = list(lines)
        super().__init__("\n".join([header, *(f"  {line}" for line in self.lines), fix]))
