"""Where a value is written in a definition file: its line number.

Python's JSON reader keeps no positions, so a problem found deep inside a
job's field (a ``when`` condition with a wrong operator) is located here, by
walking the file's text once more, only when there is a problem to report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
KeyPath = tuple[str | int, ...]


def _skip(text: str, index: int) -> int:
    match = _SPACE.match(text, index)
    return match.end() if match else index


def _walk(text: str, index: int, path: KeyPath, offsets: dict[KeyPath, int]) -> int:
    """Record where each value under ``path`` is written (for an object
    member, where its key is); returns the end of the value at ``index``."""
    offsets.setdefault(path, index)
    opening = text[index]
    if opening not in "{[":
        _value, end = _DECODER.raw_decode(text, index)
        return end
    closing = "}" if opening == "{" else "]"
    index = _skip(text, index + 1)
    position = 0
    while text[index] != closing:
        if opening == "{":
            key, after = _DECODER.raw_decode(text, index)
            offsets.setdefault((*path, key), index)
            index = _skip(text, _skip(text, after) + 1)  # past the ':'
            index = _walk(text, index, (*path, key), offsets)
        else:
            index = _walk(text, index, (*path, position), offsets)
            position += 1
        index = _skip(text, index)
        if text[index] == ",":
            index = _skip(text, index + 1)
    return index + 1


def _get(document: Any, path: KeyPath) -> Any:
    for step in path:
        document = document[step]
    return document


def line_in_job(file: Path | None, job_name: str, within: Sequence[str | int]) -> int | None:
    """The line of ``within`` (keys and indexes) inside the job called
    ``job_name`` in ``file``, or of the nearest enclosing value written;
    ``None`` when the file cannot be read or holds no such job."""
    if file is None:
        return None
    try:
        text = file.read_text(encoding="utf-8-sig")
        document = json.loads(text)
        offsets: dict[KeyPath, int] = {}
        _walk(text, _skip(text, 0), (), offsets)
    except (OSError, UnicodeDecodeError, ValueError, IndexError, RecursionError):
        return None
    for path in offsets:
        if path[-1:] != ("jobName",) or _get(document, path) != job_name:
            continue
        target = (*path[:-1], *within)
        while target not in offsets:
            target = target[:-1]
        return text.count("\n", 0, offsets[target]) + 1
    return None
