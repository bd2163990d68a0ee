"""What of a JSON value the store cannot keep.

PostgreSQL refuses a NUL character and half of a surrogate pair (not
Unicode) in a string; the value is refused on every store, so a service
behaves alike on SQLite and PostgreSQL. Standard library only: an attempt's
process under a service's own interpreter loads it from its file
(:mod:`workers_bridge.child`).
"""

from __future__ import annotations

from typing import Any


def unstorable(value: Any) -> str | None:
    """What in a JSON value the store cannot keep, or None."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return f"a string holds a NUL character (\\x00): {item[:40]!r}"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return f"a string is not valid Unicode (a lone surrogate): {item[:40]!r}"
    return None
