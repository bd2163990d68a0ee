"""What of a JSON value the store cannot keep.

PostgreSQL refuses a NUL character and half of a surrogate pair (not
Unicode) in a string, and JSON has no NaN or infinity; such a value is
refused on every store, so a service behaves alike on SQLite and
PostgreSQL. So is a value nested deeper than :data:`DEEPEST` levels:
Python's JSON reader and writer recurse once per level, and a value some
hundreds of levels deep stops them with a ``RecursionError`` wherever it
is read or written next (storing it, a message, a callback's process).

Standard library only: an attempt's process under a service's own
interpreter loads it from its file (:mod:`workers_bridge.child`).
"""

from __future__ import annotations

import math
from typing import Any

# Levels of objects and lists a value may have: far more than any definition,
# parameters or result needs, far fewer than Python's recursion limit (1,000).
DEEPEST = 100
TOO_DEEP = f"nested too deep: more than {DEEPEST} levels of objects and lists"


def unstorable(value: Any) -> str | None:
    """What in a JSON value the store cannot keep, or None."""
    pending = [(value, 0)]  # a value and the objects and lists around it
    while pending:
        item, around = pending.pop()
        if isinstance(item, (dict, list, tuple)) and around >= DEEPEST:
            return TOO_DEEP
        if isinstance(item, str):
            if "\x00" in item:
                return f"a string holds a NUL character (\\x00): {escaped(item[:40])!r}"
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    shown = escaped(item[:40])
                    return f"a string is not valid Unicode (a lone surrogate): {shown!r}"
        elif isinstance(item, dict):
            pending.extend((key, around + 1) for key in item)
            pending.extend((member, around + 1) for member in item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend((member, around + 1) for member in item)
        elif isinstance(item, float) and not math.isfinite(item):
            return f"a number is not finite ({item}): JSON has no NaN or infinity"
    return None


def escaped(text: str) -> str:
    """``text`` as the store keeps it: NUL characters and lone surrogates
    written as backslash escapes (what service code raises or prints may
    hold them)."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
