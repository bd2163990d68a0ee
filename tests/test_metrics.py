"""``GET /metrics`` (README, "Metrics"): the figures Prometheus scrapes are
those the store holds after a real run, on SQLite and PostgreSQL, and every
metric the Grafana dashboard charts is in a scrape."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from scheduler import retention
from scheduler.api import create_app
from scheduler.cli import app as cli
from scheduler.config import Settings
from scheduler.metrics import StoreCollector, carried_samples, labels_key, with_carry
from scheduler.presence import record_presence
from scheduler.queries import list_workers
from scheduler.sessions import trigger
from scheduler.store.db import transaction
from scheduler.store.models import Instance, Job, SchedulingSession, utcnow
from scheduler.store.reader import reader_of
from scheduler.testing import detect_and_send, record_study, use_environment, using_environment
from tests.test_api import AUTH, TOKEN, eager
from tests.test_sending_gate import window_around

from .conftest import Define

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dcm-scheduler.json"
WORK = "dcm_testjobs:work"


def jobs(calls: Path) -> list[dict[str, Any]]:
    """A session with a success, a retried success, a failure, what needed
    it, a timeout, a callback, and a job for a channel nobody runs."""
    stable = "study.stable"
    return [
        {
            "jobName": "ok",
            "workerEntry": WORK,
            "events": stable,
            "registryEntry": "dcm_testjobs:accept",
        },
        {
            "jobName": "flaky",
            "workerEntry": WORK,
            "events": stable,
            "retries": 1,
            "retryDelay": 0,
            "params": {"calls": str(calls), "fail_times": 1},
        },
        {"jobName": "broken", "workerEntry": WORK, "events": stable, "params": {"raise": "boom"}},
        {"jobName": "after-broken", "workerEntry": WORK, "events": stable, "dependsOn": "broken"},
        {
            "jobName": "slow",
            "workerEntry": WORK,
            "events": stable,
            "timeout": 1,
            "params": {"hang": True},
        },
        {"jobName": "on-gpu", "workerEntry": WORK, "events": "reprocess", "channel": "gpu"},
    ]


@pytest.fixture
def client(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    """The API on loopback over a fresh store, with the token configured."""
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    monkeypatch.setenv("DCM_API_TOKEN", TOKEN)
    use_environment({})
    return TestClient(create_app())


def scrape(client: TestClient, **headers: str) -> dict[str, Any]:
    """Family name → family, as Prometheus parses the exposition."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parsed(response.text)


def parsed(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def scrape_at(now: datetime) -> dict[str, Any]:
    """A scrape of the configured store as if the clock said ``now``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(clock=lambda: now))
    return parsed(generate_latest(registry).decode())


def values(family: Any, suffix: str = "", **match: str) -> dict[tuple[str, ...], float]:
    """Sample values of ``family`` (samples named name+suffix), keyed by the
    labels not given in ``match``."""
    found: dict[tuple[str, ...], float] = {}
    for sample in family.samples:
        if sample.name != family.name + suffix:
            continue
        if any(sample.labels.get(k) != v for k, v in match.items()):
            continue
        key = tuple(v for k, v in sorted(sample.labels.items()) if k not in match and k != "le")
        found[key] = sample.value
    return found


def total(family: Any, suffix: str = "", **match: str) -> float:
    return sum(values(family, suffix, **match).values())


def run_sessions(client: TestClient, define: Define, tmp_path: Path) -> None:
    """One detected session run to its end in this process, one manual
    session left queued, a live and a gone worker."""
    define(jobs(tmp_path / "calls"))
    record_study("9.1", now=utcnow() - timedelta(minutes=5))
    with eager():
        [detected] = detect_and_send()
    record_study("9.2")
    response = client.post(
        "/api/trigger", json={"event": "reprocess", "level": "study", "uid": "9.2"}, headers=AUTH
    )
    assert response.status_code == 201, response.text
    with transaction() as db:
        record_presence(db, "live@host", ["default"])
        record_presence(db, "gone@host", ["gpu"], now=utcnow() - timedelta(hours=1))
        assert db.get(SchedulingSession, detected).status == "partial"  # type: ignore[union-attr]


def test_a_scrape_counts_what_the_store_holds(
    client: TestClient, define: Define, tmp_path: Path
) -> None:
    run_sessions(client, define, tmp_path)
    with transaction() as db:
        rows = db.scalars(select(Job)).all()
        sessions = db.scalars(select(SchedulingSession)).all()
        by_status = Counter(
            (j.job_name, j.status) for j in rows if j.status not in ("queued", "running")
        )
        attempts = Counter((j.job_name, entry["status"]) for j in rows for entry in j.attempt_log)
        finished = [j for j in rows if j.status in ("succeeded", "failed") and j.started_at]
        retries = {j.job_name: j.attempts - 1 for j in rows if j.attempts > 1}
        session_statuses = Counter((s.event, s.status) for s in sessions)
    metrics = scrape(client)

    assert total(metrics["dcm_instances_ingested"], "_total") == 4
    routine = {"urgent": "false", "origin": "live"}
    assert values(metrics["dcm_sessions"], "_total", **routine) == {
        ("reprocess",): 1,
        ("study.stable",): 1,
    }
    assert total(metrics["dcm_sessions"], "_total") == 2
    assert values(metrics["dcm_sessions_finished"], "_total", **routine) == {
        ("study.stable", "partial"): session_statuses[("study.stable", "partial")]
    }
    assert values(metrics["dcm_sessions_open"], **routine) == {("reprocess", "running"): 1}

    finished_total = metrics["dcm_jobs_finished"]
    assert {
        (labels[1], labels[3]): value for labels, value in values(finished_total, "_total").items()
    } == dict(by_status)
    assert dict(by_status) == {
        ("ok", "succeeded"): 1,
        ("flaky", "succeeded"): 1,
        ("broken", "failed"): 1,
        ("after-broken", "upstream_failed"): 1,
        ("slow", "failed"): 1,
    }
    assert values(
        finished_total, "_total", service="testjobs", status="failed", channel="default"
    ) == {
        ("broken",): 1,
        ("slow",): 1,
    }
    attempt_values = {
        (labels[1], labels[3]): value
        for labels, value in values(metrics["dcm_job_attempts"], "_total").items()
    }
    assert attempt_values == dict(attempts)
    assert attempt_values[("slow", "timeout")] == 1
    assert attempt_values[("flaky", "failed")] == attempt_values[("flaky", "succeeded")] == 1
    assert (
        {labels[1]: v for labels, v in values(metrics["dcm_job_retries"], "_total").items()}
        == retries
        == {"flaky": 1}
    )

    for name, match in (
        ("dcm_job_duration_seconds", {}),
        ("dcm_job_queue_wait_seconds", routine),
    ):
        histogram = metrics[name]
        assert total(histogram, "_count") == len(finished) == 4, name
        counts = values(histogram, "_count", **match)
        assert counts == {("default", job): 1 for job in ("ok", "flaky", "broken", "slow")}, name
        # Cumulative buckets: +Inf holds every observation.
        assert total(histogram, "_bucket", le="+Inf") == len(finished)
    slow_run = values(
        metrics["dcm_job_duration_seconds"], "_bucket", job_name="broken", le="3600.0"
    )
    assert slow_run == {("default",): 1}

    assert values(metrics["dcm_jobs_queued"]) == {("default",): 0, ("gpu",): 1}
    assert values(metrics["dcm_jobs_running"]) == {("default",): 0, ("gpu",): 0}
    with transaction() as db:
        live = Counter(c for w in list_workers(db) if w["live"] for c in w["channels"])
    assert live["default"] >= 1 and live["gpu"] == 0
    assert values(metrics["dcm_workers_live"]) == {
        ("default",): live["default"],
        ("gpu",): 0,
    }

    lag = metrics["dcm_detection_lag_seconds"]
    assert total(lag, "_count") == 1
    assert 300 <= total(lag, "_sum") < 360
    assert total(lag, "_bucket", le="120.0") == 0
    assert total(lag, "_bucket", le="600.0") == 1
    assert total(metrics["dcm_session_planning_seconds"], "_count") == 2
    assert total(metrics["dcm_session_planning_delay_seconds"], "_count") == 2
    assert values(metrics["dcm_callback_duration_seconds"], "_count") == {("ok",): 1}


def test_urgent_cohort_paused_and_window_series_follow_the_store(
    client: TestClient, define: Define
) -> None:
    now = utcnow()
    closed = window_around(now, 2, 3)  # opens in two hours
    define(
        [
            {"jobName": "stroke", "workerEntry": WORK, "events": "stroke", "urgent": True},
            # Urgent: a closed window does not hold it (the pause does).
            {
                "jobName": "stroke-gpu",
                "workerEntry": WORK,
                "events": "stroke",
                "urgent": True,
                "channel": "gpu",
                "window": closed,
            },
            {"jobName": "routine", "workerEntry": WORK, "events": "routine"},
            {"jobName": "night", "workerEntry": WORK, "events": "night", "window": closed},
        ]
    )
    with using_environment({"DCM_TIMEZONE": "UTC"}):
        with transaction() as db:
            record_presence(db, "w@host", ["default", "gpu"])
        paused = CliRunner().invoke(cli, ["pause", "gpu"])
        assert paused.exit_code == 0, paused.output
        record_study("9.1")
        record_study("9.2")
        with eager():
            trigger("stroke", "study", "9.1")
            trigger("routine", "study", "9.1")
            cohort = trigger("routine", "study", "9.2").session_id
            trigger("night", "study", "9.1")
        waited = {"stroke": 1, "routine": 100}
        with transaction() as db:
            db.execute(
                update(SchedulingSession)
                .where(SchedulingSession.id == cohort)
                .values(cohort="ct-2025")
            )
            for job in db.scalars(select(Job).where(Job.started_at.is_not(None))):
                seconds = 1000 if job.session_id == cohort else waited[job.job_name]
                assert job.started_at is not None
                job.dispatched_at = job.started_at - timedelta(seconds=seconds)
            sessions = db.scalars(select(SchedulingSession)).all()
            created = Counter(
                (s.event, "cohort" if s.cohort else "live", "true" if s.urgent else "false")
                for s in sessions
            )
            statuses = Counter((s.event, s.status, bool(s.urgent)) for s in sessions)
        metrics = scrape(client)
        later = scrape_at(now + timedelta(hours=2, minutes=30))
        resumed = CliRunner().invoke(cli, ["resume", "gpu"])
        assert resumed.exit_code == 0, resumed.output
        after_resume = scrape_at(now)

    # Labels sort by name: event, origin, urgent.
    assert values(metrics["dcm_sessions"], "_total") == dict(created)
    assert dict(created) == {
        ("stroke", "live", "true"): 1,
        ("routine", "live", "false"): 1,
        ("routine", "cohort", "false"): 1,
        ("night", "live", "false"): 1,
    }
    # The urgent session waits for its paused gpu job; the others ended.
    assert statuses[("stroke", "running", True)] == 1
    assert values(metrics["dcm_sessions_open"], urgent="true") == {("stroke", "live", "running"): 1}
    assert values(metrics["dcm_sessions_finished"], "_total", urgent="false") == {
        ("routine", "cohort", "succeeded"): 1,
        ("routine", "live", "succeeded"): 1,
    }
    assert values(metrics["dcm_cohort_sessions"]) == {("ct-2025", "succeeded"): 1}

    # Queue wait, urgent apart from routine and live apart from cohort.
    wait = metrics["dcm_job_queue_wait_seconds"]
    assert values(wait, "_count") == {
        ("default", "stroke", "live", "true"): 1,
        ("default", "routine", "live", "false"): 1,
        ("default", "routine", "cohort", "false"): 1,
    }
    assert values(wait, "_bucket", le="5.0", urgent="true") == {("default", "stroke", "live"): 1}
    assert values(wait, "_bucket", le="300.0", urgent="false") == {
        ("default", "routine", "live"): 1,
        ("default", "routine", "cohort"): 0,
    }
    assert total(wait, "_sum", urgent="true") == pytest.approx(1, abs=0.01)
    assert total(wait, "_sum", origin="cohort") == pytest.approx(1000, abs=0.01)

    # The paused gpu holds an urgent job: paused, not waiting for its window.
    assert values(metrics["dcm_channel_paused"]) == {("default",): 0, ("gpu",): 1}
    assert values(metrics["dcm_jobs_waiting_window"]) == {("default",): 1, ("gpu",): 0}
    assert values(later["dcm_jobs_waiting_window"]) == {("default",): 0, ("gpu",): 0}
    assert values(after_resume["dcm_channel_paused"]) == {("default",): 0, ("gpu",): 0}
    assert values(after_resume["dcm_jobs_waiting_window"])[("default",)] == 1


def grown(metrics: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Every counter and histogram sample of a scrape, by name and labels."""
    return {
        (sample.name, labels_key(sample.labels)): sample.value
        for family in metrics.values()
        if family.type in ("counter", "histogram")
        for sample in family.samples
    }


def stored() -> tuple[int, int, int]:
    with transaction() as db:
        return (
            db.scalar(select(func.count()).select_from(SchedulingSession)) or 0,
            db.scalar(select(func.count()).select_from(Job)) or 0,
            db.scalar(select(func.count()).select_from(Instance)) or 0,
        )


def test_counters_and_histograms_never_go_down_when_prune_deletes_their_rows(
    client: TestClient, define: Define, tmp_path: Path
) -> None:
    define(jobs(tmp_path / "calls"))
    record_study("9.1", now=utcnow() - timedelta(minutes=5))
    with eager():
        detect_and_send()
    before = grown(scrape(client))
    assert (
        before[
            (
                "dcm_sessions_total",
                labels_key({"event": "study.stable", "origin": "live", "urgent": "false"}),
            )
        ]
        == 1
    )
    assert before[("dcm_instances_ingested_total", "{}")] == 2
    # Empty buckets are samples too: they must stay.
    assert 0 in before.values()

    report = retention.prune(0.0, now=utcnow() + timedelta(hours=1))
    assert (report.sessions, report.instances) == (1, 2)
    assert stored() == (0, 0, 0)
    after = grown(scrape(client))
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] == value, key  # not even a last-digit dip

    # A dry run carries nothing; a prune with nothing to delete neither.
    retention.prune(0.0, now=utcnow() + timedelta(hours=1), dry_run=True)
    retention.prune(0.0, now=utcnow() + timedelta(hours=1))
    assert grown(scrape(client)) == pytest.approx(after)

    # New work adds exactly its own figures to what was carried.
    (tmp_path / "calls").unlink(missing_ok=True)
    record_study("9.3", now=utcnow() - timedelta(minutes=5))
    with eager():
        [session] = detect_and_send()
    later = grown(scrape(client))
    with transaction() as db:
        own = carried_samples(reader_of(db), [session])
        statuses = Counter(
            j.status for j in db.scalars(select(Job).where(Job.session_id == session))
        )
    own[("dcm_instances_ingested_total", "{}")] = 2
    assert later.keys() == after.keys() | own.keys()
    for key, value in later.items():
        # Sums are exposed to the microsecond.
        assert value == pytest.approx(after.get(key, 0) + own.get(key, 0), abs=1e-6), key
    finished = {
        status: sum(
            v
            for (name, labels), v in later.items()
            if name == "dcm_jobs_finished_total" and json.loads(labels)["status"] == status
        )
        for status in statuses
    }
    assert finished == {status: 2 * n for status, n in statuses.items()}
    assert sum(v for (name, _labels), v in later.items() if name == "dcm_sessions_total") == 2
    assert later[("dcm_instances_ingested_total", "{}")] == 4
    for name in ("dcm_job_duration_seconds", "dcm_job_queue_wait_seconds"):
        for (sample, labels), value in later.items():
            if sample == f"{name}_count":
                inf = {**json.loads(labels), "le": "+Inf"}
                assert later[(f"{name}_bucket", labels_key(inf))] == value == 2, labels


# The dashboard and the access rule do not depend on the backend: SQLite only.
ON_SQLITE = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


@ON_SQLITE
def test_every_metric_the_grafana_dashboard_charts_is_in_a_scrape(
    client: TestClient, define: Define, tmp_path: Path
) -> None:
    run_sessions(client, define, tmp_path)
    scraped = {sample.name for family in scrape(client).values() for sample in family.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert expressions
    charted = {name for expr in expressions for name in re.findall(r"\bdcm_[a-z_]+", expr)}
    assert charted and charted <= scraped, charted - scraped


@ON_SQLITE
def test_off_loopback_a_scrape_needs_the_token(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM_API_TOKEN", TOKEN)
    use_environment({})
    remote = TestClient(create_app(host="0.0.0.0"))
    assert remote.get("/metrics").status_code == 401
    assert "dcm_jobs_queued" in scrape(remote, **AUTH)


@ON_SQLITE
def test_a_scrape_of_an_unreachable_store_is_503_without_its_password(env: Settings) -> None:
    url = "postgresql+psycopg://scheduler:hunter2@127.0.0.1:9/store?connect_timeout=2"
    with using_environment({"DCM_DATABASE_URL": url}):
        response = TestClient(create_app()).get("/metrics")
    assert response.status_code == 503
    assert "store is unreachable" in response.json()["detail"]
    assert "hunter2" not in response.text


def test_a_carried_sum_reads_the_same_as_the_sum_of_its_rows() -> None:
    # 0.1 carried + 0.2 left in the store is 0.30000000000000004 in floats,
    # while the rows summed at once gave 0.3: a dip would read as a reset.
    live = HistogramMetricFamily("dcm_x_seconds", "x", labels=["job_name"])
    live.add_metric(["a"], [("1.0", 1), ("+Inf", 1)], 0.2)
    carry = {("dcm_x_seconds_sum", labels_key({"job_name": "a"})): 0.1}
    carry |= {
        ("dcm_x_seconds_bucket", labels_key({"job_name": "a", "le": "1.0"})): 1,
        ("dcm_x_seconds_bucket", labels_key({"job_name": "a", "le": "+Inf"})): 1,
        ("dcm_x_seconds_count", labels_key({"job_name": "a"})): 1,
    }
    merged = {sample.name: sample.value for sample in with_carry(live, carry).samples}
    assert merged["dcm_x_seconds_sum"] == 0.3 and merged["dcm_x_seconds_count"] == 2
