"""Worker of the study-report job: ``<output_dir>/<StudyInstanceUID>.html`` per study.

The thumbnails come from the stored result of the ``thumbnails`` dependency
(``kwargs["results"]["thumbnails"]``), referenced by paths relative to the
report so the session folder can be moved or archived as a whole.
"""

from __future__ import annotations

import os
from typing import Any

from dcm_study_report.html import SeriesRow, format_value, href, render_report

THUMBNAILS_JOB = "thumbnails"


def report_name(study: dict[str, Any], position: int) -> str:
    """File name of a study's report; a study without UID is named by position."""
    uid = format_value(study.get("StudyInstanceUID"))
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in uid)
    return f"{safe or f'study-{position}'}.html"


def _series_sort_key(series: dict[str, Any]) -> tuple[float, str]:
    try:
        number = float(format_value(series.get("SeriesNumber")))
    except ValueError:
        number = float("inf")
    return number, str(series.get("SeriesInstanceUID", ""))


def studies_of(headers: dict[str, Any]) -> list[dict[str, Any]]:
    """The studies of the candidate; one synthetic study when the headers list none."""
    studies = [s for s in headers.get("studies") or [] if isinstance(s, dict)]
    if studies:
        return studies
    return [{"StudyInstanceUID": headers.get("uid", ""), "series": headers.get("seriesIds", [])}]


def series_of(headers: dict[str, Any], study: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's series, by SeriesNumber; matched by the study's list or their own tag."""
    study_uid = study.get("StudyInstanceUID")
    listed = set(study.get("series") or [])
    members = [
        s
        for s in headers.get("series") or []
        if s.get("SeriesInstanceUID") in listed
        or (study_uid and s.get("StudyInstanceUID") == study_uid)
    ]
    return sorted(members, key=_series_sort_key)


def thumbnail_result(kwargs: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(thumbnails, skipped) from the thumbnails job's stored result, if any."""
    result = (kwargs.get("results") or {}).get(THUMBNAILS_JOB) or {}
    if not isinstance(result, dict):
        return {}, {}
    return dict(result.get("thumbnails") or {}), dict(result.get("skipped") or {})


def series_row(
    series: dict[str, Any],
    thumbnails: dict[str, str],
    skipped: dict[str, str],
    report_dir: str,
) -> SeriesRow:
    """One table row; the thumbnail path is made relative to the report's folder."""
    uid = str(series.get("SeriesInstanceUID", ""))
    thumbnail = thumbnails.get(uid)
    return SeriesRow(
        number=format_value(series.get("SeriesNumber")),
        modality=format_value(series.get("Modality")),
        description=format_value(series.get("SeriesDescription")),
        instance_count=format_value(
            series.get("instance_count", len(series.get("instances") or []))
        ),
        thumbnail_href=href(os.path.relpath(thumbnail, report_dir)) if thumbnail else None,
        skipped_reason=skipped.get(uid),
    )


def worker(
    jobName: str,  # name fixed by the dcm-processor worker signature
    headers: dict[str, Any],
    params: dict[str, Any],
    added_params: dict[str, Any],
    **kwargs: Any,
) -> dict[str, Any]:
    """Write one HTML report per study of the candidate."""
    output_dir = str(kwargs["output_dir"])
    os.makedirs(output_dir, exist_ok=True)
    thumbnails, skipped = thumbnail_result(kwargs)
    patient = headers.get("patient") or {}
    footer = (
        f"session {kwargs.get('session_id', '?')}, event {kwargs.get('event', '?')}, "
        f"revision {kwargs.get('revision', '?')}, job {jobName}"
    )
    reports: list[str] = []
    for position, study in enumerate(studies_of(headers), start=1):
        rows = [series_row(s, thumbnails, skipped, output_dir) for s in series_of(headers, study)]
        path = os.path.join(output_dir, report_name(study, position))
        with open(path, "w", encoding="utf-8") as report:
            report.write(render_report(patient, study, rows, footer))
        reports.append(path)
    return {"reports": reports}
