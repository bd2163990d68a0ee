"""Render one study report as a self-contained HTML page.

Every value that comes from a DICOM header is untrusted text (descriptions are
typed by people at the scanner): it goes through :func:`text` or :func:`attr`
before it reaches the page, never through string formatting alone.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

PATIENT_ORDER = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge")
STUDY_ORDER = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
# Keys of the headers document that are structure, not tags to display.
STRUCTURAL_KEYS = frozenset({"series", "instances"})
LABELS = {"instance_count": "Instances"}

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.skipped { color: #a00; font-size: 0.9em; }
img { min-width: 64px; image-rendering: pixelated; }  /* 10x10 dose grids stay visible */
"""


@dataclass(frozen=True)
class SeriesRow:
    """One line of the series table."""

    number: str
    modality: str
    description: str
    instance_count: str
    thumbnail_href: str | None  # relative to the report file
    skipped_reason: str | None


def format_value(value: Any) -> str:
    """A JSON tag value as display text (lists joined, PN objects by their name)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, dict):
        # The DICOM JSON model writes person names as {"Alphabetic": ...}.
        return str(value.get("Alphabetic") or json.dumps(value, sort_keys=True))
    return str(value)


def text(value: Any) -> str:
    """Escaped element content."""
    return html.escape(format_value(value), quote=True)


def attr(value: str) -> str:
    """Escaped attribute value."""
    return html.escape(value, quote=True)


def href(relative_path: str) -> str:
    """A relative file path as a URL path (spaces, '#', '?' percent-encoded)."""
    return quote(relative_path.replace("\\", "/"), safe="/._-")


def ordered_items(tags: dict[str, Any], first: Iterable[str]) -> list[tuple[str, Any]]:
    """The displayable tags: the usual ones in their usual order, then the rest sorted."""
    first = tuple(first)
    shown = [(k, tags[k]) for k in first if k in tags]
    rest = sorted(k for k in tags if k not in first and k not in STRUCTURAL_KEYS)
    return shown + [(k, tags[k]) for k in rest]


def tag_table(tags: list[tuple[str, Any]]) -> str:
    """A two-column keyword/value table."""
    rows = "".join(f"<tr><th>{text(LABELS.get(k, k))}</th><td>{text(v)}</td></tr>" for k, v in tags)
    return f"<table>{rows}</table>"


def series_table(rows: list[SeriesRow]) -> str:
    """The series table with one thumbnail (or the reason there is none) per row."""
    head = (
        "<tr><th>Number</th><th>Modality</th><th>Description</th>"
        "<th>Instances</th><th>Thumbnail</th></tr>"
    )
    body = "".join(_series_row(row) for row in rows)
    return f"<table>{head}{body}</table>"


def _series_row(row: SeriesRow) -> str:
    if row.thumbnail_href is not None:
        cell = (
            f'<td><img src="{attr(row.thumbnail_href)}" '
            f'alt="series {attr(row.number)} thumbnail"></td>'
        )
    elif row.skipped_reason:
        cell = f'<td class="skipped">{text(row.skipped_reason)}</td>'
    else:
        cell = "<td>&mdash;</td>"
    return (
        f"<tr><td>{text(row.number)}</td><td>{text(row.modality)}</td>"
        f"<td>{text(row.description)}</td><td>{text(row.instance_count)}</td>{cell}</tr>"
    )


def render_report(
    patient: dict[str, Any],
    study: dict[str, Any],
    rows: list[SeriesRow],
    footer: str,
) -> str:
    """The whole page for one study."""
    title = format_value(study.get("StudyDescription")) or format_value(
        study.get("StudyInstanceUID")
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>Study report: {text(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Study report: {text(title)}</h1>"
        f"<h2>Patient</h2>{tag_table(ordered_items(patient, PATIENT_ORDER))}"
        f"<h2>Study</h2>{tag_table(ordered_items(study, STUDY_ORDER))}"
        f"<h2>Series ({len(rows)})</h2>{series_table(rows)}"
        f"<footer><small>{text(footer)}</small></footer>"
        "</body></html>\n"
    )
