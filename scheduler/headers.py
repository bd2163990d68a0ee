"""The headers document of a candidate, as callbacks and workers receive it.

It summarises the patient, studies and series of a candidate with their main
tags and file locations, filtered by ``DCM_HEADER_FIELDS`` (PHI
minimisation). The identifying UIDs, counts and locations are structure, not
tags, and are always present. The legacy dcm-processor keys ``id``,
``seriesIds`` and ``dcmpath`` are kept so existing callbacks work unchanged.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Integer, String, bindparam, func, select

from scheduler.store.db import Executor
from scheduler.store.models import Instance, Patient, SchedulingSession, Series, Study
from scheduler.vocabulary import Level

STRUCTURAL = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class UnknownCandidateError(LookupError):
    """No resource with that UID at that level is in the store."""


def _filter(tags: dict[str, Any], fields: frozenset[str] | None) -> dict[str, Any]:
    if fields is None:
        return dict(tags)
    return {k: v for k, v in tags.items() if k in fields or k in STRUCTURAL}


def _decoded(tags: Any) -> Any:
    """Stored tags: as read, or decoded from the JSON text a reader left
    them in (:func:`scheduler.store.plans_pg.take_and_read`)."""
    return json.loads(tags) if isinstance(tags, str) else tags


def _number(value: Any) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 2**31  # unnumbered last


def _common_folder(locations: Iterable[str]) -> str:
    folders = [os.path.dirname(p) for p in locations if p and "://" not in p]
    if not folders:
        return ""
    try:
        return os.path.commonpath(folders)
    except ValueError:
        return ""


def candidate_query(level: str, uid: str) -> Any:
    """Rows (patient, study, series, instance) of one candidate."""
    return _located(select(Patient, Study, Series, Instance), level, uid)


def _located(query: Any, level: str, uid: Any) -> Any:
    """``query`` over the instances of one candidate, joined up to its patient."""
    query = (
        query.select_from(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
    )
    column: dict[str, Any] = {
        Level.SERIES: Series.series_uid,
        Level.STUDY: Study.study_uid,
        Level.PATIENT: Patient.patient_id,
    }
    if level not in column:
        raise ValueError(f"unknown level {level!r}; use one of {', '.join(Level)}")
    return query.where(column[level] == uid)


def _document_columns() -> Any:
    """The columns the document is made of, not the rows as objects: loading
    objects cost more than the query."""
    return select(
        Patient.patient_id,
        Patient.tags,
        Study.id,
        Study.study_uid,
        Study.tags,
        Series.id,
        Series.series_uid,
        Series.tags,
        Instance.sop_uid,
        Instance.tags,
        Instance.location,
    )


@functools.cache
def _headers_query(level: str, *, bounded: bool) -> Any:
    """The rows of a candidate's headers (``uid`` and, when ``bounded``,
    ``up_to`` bound at execution), built once per level: planning reads
    them for every session."""
    query = _located(_document_columns(), level, bindparam("uid", type_=String()))
    if bounded:
        query = query.where(Instance.id <= bindparam("up_to", type_=Integer()))
    return query


@functools.cache
def session_rows_query(level: str) -> Any:
    """The rows of the headers of the session bound as ``session_id``, if it
    is of ``level``: the instances, up to its ``last_instance_id`` (all when
    it has none), of the candidate its ``uid`` names; none for a session of
    another level. Sent with the statements that read the session, before
    its level is known: the level is the one sessions usually have, and one
    query, not one per level, keeps the server's planning short (it is
    planned at each execution)."""
    session_id = bindparam("session_id", type_=String())
    uid = (
        select(SchedulingSession.uid)
        .where(SchedulingSession.id == session_id, SchedulingSession.level == level)
        .scalar_subquery()
    )
    up_to = (
        select(SchedulingSession.last_instance_id)
        .where(SchedulingSession.id == session_id)
        .scalar_subquery()
    )
    return _located(_document_columns(), level, uid).where(
        Instance.id <= func.coalesce(up_to, Instance.id)
    )


def build_headers(
    db: Executor,
    level: str,
    uid: str,
    fields: Iterable[str] | None = None,
    *,
    up_to: int | None = None,
    rows: Sequence[Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """The headers document of the candidate ``level``/``uid``.

    ``up_to``: only instances with an id up to this one, the instances a
    session's fingerprint covers (later ones belong to the next revision).
    ``rows``: the candidate's rows when the caller read them already
    (:func:`session_rows_query`).
    """
    allowed = None if fields is None else frozenset(fields)
    if rows is None:
        query = _headers_query(level, bounded=up_to is not None)
        rows = db.execute(query, {"uid": uid, "up_to": up_to}).all()
    if not rows:
        raise UnknownCandidateError(f"no {level} {uid!r} in the store")
    patient_id, patient_stored = rows[0][0], _decoded(rows[0][1])
    studies: dict[int, dict[str, Any]] = {}
    series: dict[int, dict[str, Any]] = {}
    sort_keys: dict[int, tuple[str, int, str]] = {}
    instance_keys: dict[str, tuple[int, str]] = {}
    for (
        _patient_id,
        _patient_tags,
        study_pk,
        study_uid,
        study_tags,
        series_pk,
        series_uid,
        series_tags,
        sop_uid,
        instance_tags,
        location,
    ) in rows:
        if study_pk not in studies:
            studies[study_pk] = {
                **_filter(_decoded(study_tags), allowed),
                "StudyInstanceUID": study_uid,
                "instance_count": 0,
                "series": [],
            }
        if series_pk not in series:
            series_tags = _decoded(series_tags)
            # Sorted on the stored tags: the order must not depend on the filter.
            sort_keys[series_pk] = (
                study_uid,
                _number(series_tags.get("SeriesNumber")),
                series_uid,
            )
            series[series_pk] = {
                **_filter(series_tags, allowed),
                "SeriesInstanceUID": series_uid,
                "StudyInstanceUID": study_uid,
                "instance_count": 0,
                "instances": [],
            }
            studies[study_pk]["series"].append(series_uid)
        studies[study_pk]["instance_count"] += 1
        series[series_pk]["instance_count"] += 1
        instance_tags = _decoded(instance_tags)
        instance_keys[sop_uid] = (_number(instance_tags.get("InstanceNumber")), location)
        series[series_pk]["instances"].append(
            {
                **_filter(instance_tags, allowed),
                "SOPInstanceUID": sop_uid,
                "location": location,
            }
        )
    series_list = [series[pk] for pk in sorted(series, key=sort_keys.__getitem__)]
    for item in series_list:
        item["instances"].sort(key=lambda i: instance_keys[i["SOPInstanceUID"]])
    order = {item["SeriesInstanceUID"]: index for index, item in enumerate(series_list)}
    for study_doc in studies.values():
        study_doc["series"].sort(key=order.__getitem__)
    patient_tags = _filter(patient_stored, allowed)
    if level == Level.PATIENT:
        patient_tags["PatientID"] = patient_id
    headers: dict[str, Any] = {
        "level": level,
        "uid": uid,
        "patient": patient_tags,
        "studies": sorted(studies.values(), key=lambda s: s["StudyInstanceUID"]),
        "series": series_list,
        "seriesIds": [s["SeriesInstanceUID"] for s in series_list],
        "dcmpath": _common_folder(i["location"] for s in series_list for i in s["instances"]),
        "instance_count": len(rows),
    }
    if "PatientID" in patient_tags:
        headers["id"] = patient_tags["PatientID"]
    return headers
