"""What of a JSON value the store cannot keep.

PostgreSQL refuses a NUL character and half of a surrogate pair (not
Unicode) in a string, and JSON has no NaN or infinity; such a value is
refused on every store, so a service behaves alike on SQLite and
PostgreSQL. Standard library only: an attempt's process under a service's
own interpreter loads it from its file (:mod:`workers_bridge.child`).
"""

from __future__ import annotations

import math
from typing import Any


def unstorable(value: Any) -> str | None:
    """What in a JSON value the store cannot keep, or None."""
    pending = [value]
    while pending:
        item = pending.pop()
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
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return f"a number is not finite ({item}): JSON has no NaN or infinity"
    return None


def escaped(text: str) -> str:
    """``text`` as the store keeps it: NUL characters and lone surrogates
    written as backslash escapes (what service code raises or prints may
    hold them)."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
