"""The headers document (README, "Writing a service"): structure, legacy keys, DCM_HEADER_FIELDS filtering."""

from __future__ import annotations

import pytest

from scheduler.config import Settings
from scheduler.headers import UnknownCandidateError, build_headers
from scheduler.ingest import record_instances
from scheduler.store.db import transaction


def record() -> None:
    base = {
        "PatientID": "PAT-1",
        "PatientName": "Doe^Jane",
        "PatientBirthDate": "19700101",
        "StudyInstanceUID": "1.5",
        "StudyDescription": "Head CT",
    }
    items = [
        base
        | {
            "SeriesInstanceUID": "1.5.2",
            "SeriesNumber": "2",
            "Modality": "CT",
            "SOPInstanceUID": f"1.5.2.{n}",
            "InstanceNumber": str(n),
            "location": f"/data/1.5/2/{n}.dcm",
        }
        for n in (3, 1, 2)
    ] + [
        base
        | {
            "SeriesInstanceUID": "1.5.1",
            "SeriesNumber": "1",
            "Modality": "SR",
            "SOPInstanceUID": "1.5.1.1",
            "location": "/data/1.5/1/1.dcm",
        }
    ]
    with transaction() as db:
        record_instances(db, items)


def test_headers_summarise_patient_studies_series_and_files(env: Settings) -> None:
    record()
    with transaction() as db:
        headers = build_headers(db, "study", "1.5")
    assert headers["level"] == "study" and headers["uid"] == "1.5"
    assert headers["id"] == "PAT-1"
    assert headers["patient"]["PatientName"] == "Doe^Jane"
    assert headers["studies"] == [
        {
            "StudyInstanceUID": "1.5",
            "StudyDescription": "Head CT",
            "instance_count": 4,
            "series": ["1.5.1", "1.5.2"],
        }
    ]
    assert headers["seriesIds"] == ["1.5.1", "1.5.2"]
    ct = headers["series"][1]
    assert (ct["Modality"], ct["instance_count"]) == ("CT", 3)
    assert [i["InstanceNumber"] for i in ct["instances"]] == ["1", "2", "3"]
    assert ct["instances"][0]["location"] == "/data/1.5/2/1.dcm"
    assert headers["dcmpath"] == "/data/1.5"
    assert headers["instance_count"] == 4


def test_header_fields_limit_the_tags_but_keep_the_structure(env: Settings) -> None:
    record()
    with transaction() as db:
        headers = build_headers(db, "study", "1.5", fields=["Modality"])
    assert headers["patient"] == {}
    assert "id" not in headers  # PatientID was not allowed
    assert headers["studies"][0].keys() == {"StudyInstanceUID", "instance_count", "series"}
    assert headers["series"][1]["Modality"] == "CT"
    assert "SeriesNumber" not in headers["series"][1]
    assert headers["series"][1]["instances"][0].keys() == {"SOPInstanceUID", "location"}
    # the order still follows InstanceNumber, though the tag itself is filtered out
    assert [i["SOPInstanceUID"] for i in headers["series"][1]["instances"]] == [
        "1.5.2.1",
        "1.5.2.2",
        "1.5.2.3",
    ]


def test_series_and_patient_candidates(env: Settings) -> None:
    record()
    with transaction() as db:
        series = build_headers(db, "series", "1.5.2")
        patient = build_headers(db, "patient", "PAT-1")
        with pytest.raises(UnknownCandidateError, match="no study '9'"):
            build_headers(db, "study", "9")
    assert series["seriesIds"] == ["1.5.2"] and series["instance_count"] == 3
    assert patient["instance_count"] == 4 and patient["patient"]["PatientID"] == "PAT-1"


def test_a_planned_session_s_headers_are_its_candidate_s_up_to_its_last_instance(
    env: Settings,
) -> None:
    from sqlalchemy import update

    from scheduler.sessions import open_session, plan_session
    from scheduler.store.models import SchedulingSession

    record()
    # Two sessions of each level in a row: a planner reads a session's rows
    # with the session when it is of the level of the one before.
    opened = [
        (level, uid, open_session(level, uid, "study.stable", manual=True))
        for level, uid in (("study", "1.5"), ("series", "1.5.2"), ("patient", "PAT-1"))
        for _ in range(2)
    ]
    # Data recorded after the sessions opened belongs to the next revision.
    with transaction() as db:
        record_instances(
            db,
            [
                {
                    "PatientID": "PAT-1",
                    "StudyInstanceUID": "1.5",
                    "SeriesInstanceUID": "1.5.2",
                    "SOPInstanceUID": "1.5.2.4",
                    "location": "/data/1.5/2/4.dcm",
                }
            ],
        )
    unbounded = open_session("study", "1.5", "study.stable", manual=True)
    with transaction() as db:  # opened by an older version: no last instance
        db.execute(
            update(SchedulingSession)
            .where(SchedulingSession.id == unbounded)
            .values(last_instance_id=None)
        )
    for level, uid, session_id in opened:
        assert session_id is not None
        planned = plan_session(session_id)
        assert planned is not None
        with transaction() as db:
            session = db.get(SchedulingSession, session_id)
            assert session is not None and session.last_instance_id is not None
            expected = build_headers(db, level, uid, up_to=session.last_instance_id)
        assert planned.headers == expected == session.headers
        assert "1.5.2.4" not in str(expected)
    assert unbounded is not None
    planned = plan_session(unbounded)
    assert planned is not None and planned.headers["instance_count"] == 5
