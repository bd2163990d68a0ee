"""Rules without code and urgent sessions (README, "Rules without code",
"Urgent studies first"): the condition language, its validation, planning
with ``when`` and ``urgent``, and the urgent flag in the store and listings."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from scheduler import entry
from scheduler.api import create_app
from scheduler.cli import app as cli
from scheduler.config import Settings
from scheduler.ingest import record_instances
from scheduler.registry import load_registry
from scheduler.rules import RuleError, compile_condition, evaluate, series_records
from scheduler.store.db import transaction
from scheduler.store.models import SchedulingSession, utcnow
from scheduler.testing import use_environment

from .conftest import Define
from .test_planning import job, make_plan, reason

CT = {"SeriesInstanceUID": "1.1", "Modality": "CT", "SeriesNumber": "2", "SliceThickness": "0.625"}
US = {"SeriesInstanceUID": "1.2", "Modality": "US", "SeriesNumber": "3"}


def headers(*series: dict[str, Any], description: str = "CT HEAD CODE STROKE") -> dict[str, Any]:
    """A headers document of study 1 with ``series`` (tags, and optionally
    ``count`` instances carrying ``instance_tags``)."""
    documents = []
    for tags in series:
        count = tags.get("count", 2)
        shown = {k: v for k, v in tags.items() if k not in ("count", "instance_tags")}
        instance = tags.get("instance_tags", {})
        documents.append(
            shown
            | {
                "StudyInstanceUID": "1",
                "instance_count": count,
                "instances": [
                    {"SOPInstanceUID": f"{tags['SeriesInstanceUID']}.{n}", **instance}
                    for n in range(count)
                ],
            }
        )
    return {
        "level": "study",
        "uid": "1",
        "patient": {"PatientID": "P", "PatientSex": "F"},
        "studies": [{"StudyInstanceUID": "1", "StudyDescription": description}],
        "series": documents,
        "seriesIds": [s["SeriesInstanceUID"] for s in documents],
    }


def matched(spec: Any, document: dict[str, Any] | None = None) -> list[str]:
    """The series of ``document`` (default: a CT and an US series) matching ``spec``."""
    return evaluate(compile_condition(spec), series_records(document or headers(CT, US))).matched


def why(spec: Any, document: dict[str, Any] | None = None) -> str:
    return evaluate(compile_condition(spec), series_records(document or headers(CT, US))).summary()


# --------------------------------------------------------------------------
# The language


def test_a_value_or_a_list_of_values_compares_case_insensitively() -> None:
    assert matched({"Modality": "CT"}) == ["1.1"]
    assert matched({"Modality": "ct"}) == ["1.1"]
    assert matched({"Modality": ["MR", "US"]}) == ["1.2"]
    assert matched({"Modality": {"equals": "us"}}) == ["1.2"]
    assert matched({"Modality": {"in": ["CT", "US"]}}) == ["1.1", "1.2"]
    assert matched({"Modality": ["MR", "PT"]}) == []


def test_a_number_equals_the_dicom_text_of_that_number() -> None:
    assert matched({"SeriesNumber": 2}) == ["1.1"]
    assert matched({"SeriesNumber": "2"}) == ["1.1"]
    assert matched({"SeriesNumber": 2.5}) == []


def test_matches_searches_a_regular_expression_ignoring_case() -> None:
    assert matched({"StudyDescription": {"matches": "stroke|code"}}) == ["1.1", "1.2"]
    assert matched({"StudyDescription": {"matches": "^ct head"}}) == ["1.1", "1.2"]
    assert matched({"StudyDescription": {"matches": "^head"}}) == []
    # A number is matched as its text.
    assert matched({"SeriesNumber": {"matches": "^[23]$"}}) == ["1.1", "1.2"]


def test_a_pattern_that_backtracks_for_ever_in_other_engines_ends_at_once() -> None:
    # (a+)+$ on 64 a's and a '!' takes about 2^64 steps in a backtracking
    # engine: planning would hang. RE2 answers in time linear in the text.
    document = headers(CT, US, description="a" * 64 + "!")
    assert matched({"StudyDescription": {"matches": "(a+)+$"}}, document) == []


def test_a_number_the_store_keeps_equals_its_text_but_text_stays_text() -> None:
    thick = headers(CT | {"SliceThickness": 5.0}, US)
    assert matched({"SliceThickness": "5"}, thick) == ["1.1"]
    assert matched({"SliceThickness": {"in": ["5", "7"]}}, thick) == ["1.1"]
    assert matched({"SeriesNumber": "02"}) == []  # "2" as text is not "02"


def test_reasons_show_text_as_it_is_written() -> None:
    document = headers(CT, US, description="Schlaganfall ÄÖÜ 脑卒中")
    assert '"Schlaganfall ÄÖÜ 脑卒中"' in why({"StudyDescription": {"matches": "stroke"}}, document)


def test_numeric_comparisons_read_text_values_and_never_match_what_is_not_a_number() -> None:
    assert matched({"SliceThickness": {"le": 1.5}}) == ["1.1"]
    assert matched({"SliceThickness": {"lt": 0.625}}) == []
    assert matched({"SliceThickness": {"ge": 0.625, "gt": 0.5}}) == ["1.1"]
    assert matched({"SliceThickness": {"gt": 0.625}}) == []
    odd = headers(CT | {"SliceThickness": "thin"})
    assert matched({"SliceThickness": {"le": 1.5}}, odd) == []
    assert why({"SliceThickness": {"le": 1.5}}, odd) == (
        'SliceThickness is "thin", not a number (no series matched)'
    )


def test_instances_is_the_number_of_instances_of_the_series() -> None:
    document = headers(CT | {"count": 120}, US | {"count": 3})
    assert matched({"instances": {"ge": 100}}, document) == ["1.1"]
    assert matched({"instances": 3}, document) == ["1.2"]


def test_present_and_absent_fields() -> None:
    assert matched({"SliceThickness": {"present": True}}) == ["1.1"]
    assert matched({"SliceThickness": {"present": False}}) == ["1.2"]
    # Absent fields satisfy no other operator.
    assert matched({"ContrastBolusAgent": {"matches": ".*"}}) == []
    assert matched({"not": {"ContrastBolusAgent": {"matches": ".*"}}}) == ["1.1", "1.2"]


def test_any_all_not_and_an_object_combine_conditions() -> None:
    assert matched({"Modality": "CT", "SliceThickness": {"le": 1.5}}) == ["1.1"]
    assert matched({"all": [{"Modality": "CT"}, {"SliceThickness": {"gt": 5}}]}) == []
    assert matched({"any": [{"Modality": "US"}, {"SliceThickness": {"le": 1}}]}) == ["1.1", "1.2"]
    assert matched({"not": {"Modality": "CT"}}) == ["1.2"]
    assert matched({"not": {"any": [{"Modality": "CT"}, {"Modality": "US"}]}}) == []


def test_study_patient_and_instance_fields_apply_to_each_series() -> None:
    document = headers(
        CT | {"instance_tags": {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}},
        US | {"instance_tags": {"ImageType": ["DERIVED", "SECONDARY"]}},
    )
    assert matched({"PatientSex": "F", "StudyDescription": {"matches": "stroke"}}, document) == [
        "1.1",
        "1.2",
    ]
    # A multi-valued tag matches when any of its values does.
    assert matched({"ImageType": "axial"}, document) == ["1.1"]
    assert matched({"not": {"ImageType": "DERIVED"}}, document) == ["1.1"]


def test_the_reason_names_the_condition_that_failed_for_each_series() -> None:
    assert why({"Modality": ["CT", "MR"]}, headers(US)) == (
        'Modality is "US", not one of ["CT", "MR"] (no series matched)'
    )
    assert why({"Modality": "MR"}) == (
        'Modality is "CT", not "MR" (series 1.1); Modality is "US", not "MR" (series 1.2)'
        " (none of 2 series matched)"
    )
    assert why({"Modality": "CT", "SliceThickness": {"le": 1}}) == (
        'Modality is "CT" and SliceThickness is 0.625 (<= 1) (1 of 2 series matched)'
    )
    assert why({"not": {"Modality": "US"}}, headers(US)) == (
        "Modality is \"US\" (excluded by 'not') (no series matched)"
    )
    assert why({"StudyDescription": {"matches": "knee"}}, headers(US)) == (
        'StudyDescription is "CT HEAD CODE STROKE", which does not match "knee" (no series matched)'
    )


@pytest.mark.parametrize(
    ("spec", "where", "message"),
    [
        ({"Modality": {"eq": "CT"}}, "when.Modality.eq", "unknown operator 'eq'"),
        ({"SliceThickness": {"le": "1.5"}}, "when.SliceThickness.le", "expected a number"),
        ({"Modality": {"matches": 3}}, "when.Modality.matches", "expected a regular expression"),
        ({"Modality": {"matches": "CT("}}, "when.Modality.matches", "invalid regular expression"),
        ({"Modality": {"matches": "(C)\\1"}}, "when.Modality.matches", "no backreferences"),
        ({"Modality": {"matches": "(?=C)T"}}, "when.Modality.matches", "rules use RE2 syntax"),
        ({"any": {"Modality": "CT"}}, "when.any", "expected a non-empty list of conditions"),
        ({"all": [{"Modality": "CT"}, 4]}, "when.all[1]", "expected an object of conditions"),
        ({"Modalty": "CT"}, "when.Modalty", "unknown field 'Modalty' (did you mean 'Modality'?)"),
        ({"Modality": {"present": "yes"}}, "when.Modality.present", "expected true or false"),
        ({"Modality": [["CT"]]}, "when.Modality[0]", "expected a string or a number"),
        ({"not": []}, "when.not", "expected an object of conditions"),
    ],
)
def test_a_wrong_condition_is_refused_with_where_it_is_wrong(
    spec: Any, where: str, message: str
) -> None:
    with pytest.raises(RuleError) as raised:
        compile_condition(spec)
    assert str(raised.value).startswith(f"{where}: "), raised.value
    assert message in raised.value.message


# --------------------------------------------------------------------------
# Validation of definitions


@pytest.mark.parametrize(
    ("rule", "where", "written", "message"),
    [
        (
            {"when": {"Modality": "CT", "SeriesDescription": {"like": "AX"}}},
            "when.SeriesDescription.like",
            '"like"',
            "unknown operator 'like'",
        ),
        (
            {"when": {"any": [{"Modality": "CT"}, {"SliceThickness": {"le": "thin"}}]}},
            "when.any[1].SliceThickness.le",
            '"le"',
            'expected a number, got "thin"',
        ),
        (
            {"when": {"StudyDescription": {"matches": "stroke(|code"}}},
            "when.StudyDescription.matches",
            '"matches"',
            'invalid regular expression "stroke(|code"',
        ),
        (
            {"urgent": {"StudyDescription": {"matches": 7}}},
            "urgent.StudyDescription.matches",
            '"matches"',
            "expected a regular expression (a string), got 7",
        ),
    ],
)
def test_services_validate_names_file_line_job_and_field_of_a_wrong_rule(
    define: Define,
    services_root: Path,
    rule: dict[str, Any],
    where: str,
    written: str,
    message: str,
) -> None:
    path = define([job("fine"), job("rule", **rule)])
    line = next(
        n
        for n, text in enumerate(path.read_text().splitlines(), 1)
        if text.strip().startswith(written)
    )
    result = CliRunner().invoke(cli, ["services", "validate", str(services_root / "testjobs")])
    assert result.exit_code == 1, result.output
    expected = f"{path}: job 'rule': field '{where}': line {line}: {message}"
    assert expected in " ".join(result.output.split()), result.output


def test_urgent_takes_true_false_or_a_condition(define: Define, services_root: Path) -> None:
    path = define(
        [
            job("always", urgent=True),
            job("never", urgent=False),
            job("thin", urgent={"SliceThickness": {"le": 1}}),
            job("odd", urgent="yes"),
        ]
    )
    registry = load_registry([services_root])
    line = path.read_text().splitlines().index('      "urgent": "yes"') + 1
    assert [str(p) for p in registry.problems] == [
        f"{path}: job 'odd': field 'urgent': line {line}: "
        'expected true, false or an object of conditions, got "yes"'
    ]


def test_a_legacy_settings_file_may_carry_rules_and_is_checked_the_same(tmp_path: Path) -> None:
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "__init__.py").write_text("def worker(*args, **kwargs):\n    return {}\n")
    settings = folder / "settings.json"
    settings.write_text(
        '[{"jobName": "old", "worker": "legacy.worker"},\n'
        ' {"jobName": "ruled", "worker": "legacy.worker",\n'
        '  "when": {"Modality": {"in": "CT"}}}]\n'
    )
    registry = load_registry([tmp_path], entry_points=False)
    assert [str(p) for p in registry.problems] == [
        f"{settings}: job 'ruled': field 'when.Modality.in': line 3: "
        'expected a non-empty list of values, got "CT"'
    ]


# --------------------------------------------------------------------------
# Planning


def test_definitions_without_rules_plan_as_before(define: Define, services_root: Path) -> None:
    define([job("plain"), job("called", registryEntry="dcm_testjobs:accept")])
    result = make_plan(services_root, headers=headers(CT, US))
    assert result.job_names == ["called", "plain"]
    assert reason(result, "plain") == "no registryEntry: always scheduled"
    assert reason(result, "called") == "callback returned (True, params)"
    assert result.added_params == {"called": {"seen": [], "uid": "1", "job": "called"}}
    assert not result.urgent and "urgent" not in result.trace


def test_when_schedules_a_job_for_the_series_that_match(
    define: Define, services_root: Path
) -> None:
    define(
        [
            job("ct-only", when={"Modality": "CT"}),
            job("mr-only", when={"Modality": ["MR"]}),
        ]
    )
    result = make_plan(services_root, headers=headers(CT, US))
    assert result.job_names == ["ct-only"]
    assert result.added_params == {"ct-only": {"series": ["1.1"]}}
    assert result.jobs[0].added_params == {"series": ["1.1"]}
    assert reason(result, "ct-only") == 'when: Modality is "CT" (1 of 2 series matched)'
    assert reason(result, "mr-only") == (
        'when: Modality is "CT", not "MR" (series 1.1); Modality is "US", not "MR" (series 1.2)'
        " (none of 2 series matched)"
    )


def test_with_when_and_a_callback_both_must_accept(define: Define, services_root: Path) -> None:
    define(
        [
            # `when` fails: the callback (which would raise) never runs.
            job("skipped", when={"Modality": "MR"}, registryEntry="dcm_testjobs:explode"),
            job("declined", when={"Modality": "CT"}, registryEntry="dcm_testjobs:decline"),
            job(
                "narrowed",
                when={"StudyDescription": {"matches": "stroke"}},
                registryEntry="dcm_testjobs:narrow",
            ),
        ]
    )
    result = make_plan(services_root, headers=headers(CT, US))
    assert result.job_names == ["narrowed"]
    skipped = result.trace["jobs"]["skipped"]
    assert skipped["reason"].startswith('when: Modality is "CT", not "MR"')
    assert "traceback" not in skipped
    assert reason(result, "declined") == (
        'when: Modality is "CT" (1 of 2 series matched); callback returned False'
    )
    assert "declined" not in result.added_params
    # The callback received the full headers and the matching series, and
    # its own "series" wins.
    assert result.added_params["narrowed"] == {
        "series": ["1.1"],
        "given": ["1.1", "1.2"],
        "all": ["1.1", "1.2"],
    }


def test_a_rule_or_a_callback_makes_the_session_urgent(define: Define, services_root: Path) -> None:
    define(
        [
            job(
                "triage",
                when={"Modality": "CT"},
                urgent={"StudyDescription": {"matches": "stroke"}},
            ),
            job("flagged", registryEntry="dcm_testjobs:urgent"),
        ]
    )
    result = make_plan(services_root, headers=headers(CT, US))
    assert result.urgent
    assert result.trace["urgent"] == [
        "job 'flagged': its callback returned \"urgent\": true",
        'job \'triage\': urgent: StudyDescription "CT HEAD CODE STROKE" matches "stroke"'
        " (1 of 1 series matched)",
    ]
    assert result.trace["jobs"]["triage"]["urgent"].startswith("urgent: StudyDescription")

    routine = make_plan(services_root, headers=headers(CT, description="KNEE"))
    assert routine.job_names == ["flagged", "triage"] and routine.urgent  # the callback's


def test_an_urgent_rule_is_tested_on_the_matching_series_of_scheduled_jobs_only(
    define: Define, services_root: Path
) -> None:
    define(
        [
            # Only the CT series is this job's; the US series cannot make it urgent.
            job("ct", when={"Modality": "CT"}, urgent={"Modality": "US"}),
            job("mr", when={"Modality": "MR"}, urgent=True),
            job("declined", registryEntry="dcm_testjobs:decline", urgent=True),
            job("calm", registryEntry="dcm_testjobs:urgent", params={"urgent": False}),
        ]
    )
    result = make_plan(services_root, headers=headers(CT, US))
    assert result.job_names == ["calm", "ct"]
    assert not result.urgent and "urgent" not in result.trace


# --------------------------------------------------------------------------
# Sessions in the store, the CLI and the API (each store backend)


def record(study: str, *series: dict[str, Any], description: str) -> None:
    """Record two instances of each series of ``study``, detected long ago."""
    items = [
        {
            "PatientID": "P1",
            "StudyInstanceUID": study,
            "StudyDescription": description,
            "SOPInstanceUID": f"{study}.{tags['SeriesInstanceUID']}.{n}",
            "location": f"/data/{study}/{tags['SeriesInstanceUID']}/{n}.dcm",
            **tags,
            "SeriesInstanceUID": f"{study}.{tags['SeriesInstanceUID']}",
        }
        for tags in series
        for n in range(2)
    ]
    with transaction() as db:
        record_instances(db, items, now=utcnow() - timedelta(seconds=300))


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return result.output


STROKE_RULES = [
    job(
        "triage",
        when={"Modality": "CT", "SliceThickness": {"le": 1.5}},
        urgent={"StudyDescription": {"matches": "stroke|code"}},
    ),
    job("mr-contrast", when={"Modality": "MR", "ContrastBolusAgent": {"present": True}}),
]


@pytest.fixture
def rules(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    use_environment({})
    define(STROKE_RULES)


def test_an_urgent_session_is_stored_and_shown_in_listings_and_the_api(rules: None) -> None:
    record("7.1", CT, US, description="CODE STROKE")
    record("7.2", CT, description="routine head")
    from scheduler.celery_app import app

    # Inline: the job runs in this process, so its worker's inputs are seen.
    app.conf.task_always_eager = True
    try:
        stroke = json.loads(run("plan", "--study", "7.1", "--json"))
        routine = json.loads(run("plan", "--study", "7.2", "--json"))
    finally:
        app.conf.task_always_eager = False
    assert stroke["jobs"] == routine["jobs"] == ["triage"]
    assert (stroke["urgent"], routine["urgent"]) == (True, False)
    assert stroke["trace"]["urgent"] == [
        'job \'triage\': urgent: StudyDescription "CODE STROKE" matches "stroke|code"'
        " (1 of 1 series matched)"
    ]
    with transaction() as db:
        stored = {row.uid: row.urgent for row in db.query(SchedulingSession)}
    assert stored == {"7.1": True, "7.2": False}

    listed = {s["uid"]: s for s in json.loads(run("sessions", "--json"))}
    assert (listed["7.1"]["urgent"], listed["7.1"]["cohort"]) == (True, None)
    assert (listed["7.2"]["urgent"], listed["7.2"]["cohort"]) == (False, None)
    shown = json.loads(run("show", stroke["session_id"], "--json"))
    assert shown["urgent"] is True and shown["cohort"] is None
    [triage] = shown["jobs"]
    # The worker received the series the rule matched.
    assert triage["status"] == "succeeded", triage
    assert triage["result"]["added_params"]["triage"] == {"series": ["7.1.1.1"]}
    api = TestClient(create_app())
    assert api.get(f"/api/sessions/{stroke['session_id']}").json()["urgent"] is True
    assert [s["urgent"] for s in api.get("/api/sessions").json()] == [False, True]

    assert "urgent" in run("show", stroke["session_id"]).splitlines()[0]
    assert "urgent" not in run("show", routine["session_id"]).splitlines()[0]
    table = run("sessions")
    urgent_line = next(line for line in table.splitlines() if "7.1" in line)
    routine_line = next(line for line in table.splitlines() if "7.2" in line)
    assert "urgent" in urgent_line and "urgent" not in routine_line


def test_the_fast_json_listing_has_urgent_and_cohort_too(
    rules: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record("9.1", CT, description="code stroke")
    run("plan", "--study", "9.1")
    monkeypatch.setattr(sys, "argv", ["dcm-scheduler", "sessions", "--json"])
    with pytest.raises(SystemExit) as ended:
        entry.main()
    assert ended.value.code == 0
    [session] = json.loads(capsys.readouterr().out)
    assert (session["urgent"], session["cohort"]) == (True, None)


def test_plan_dry_run_prints_the_condition_that_failed_and_why_it_is_urgent(rules: None) -> None:
    record("8.1", US, description="abdomen")
    record("8.2", CT, description="Code stroke")
    output = " ".join(run("plan", "--study", "8.1", "--dry-run").split())
    assert 'when: Modality is "US", not "CT" (no series matched)' in output, output
    assert 'when: Modality is "US", not "MR" (no series matched)' in output, output
    assert "urgent:" not in output
    output = " ".join(run("plan", "--study", "8.2", "--dry-run").split())
    assert (
        'urgent: job \'triage\': urgent: StudyDescription "Code stroke" matches "stroke|code"'
        in output
    ), output
    with transaction() as db:
        assert db.query(SchedulingSession).count() == 0
