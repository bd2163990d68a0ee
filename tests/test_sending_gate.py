"""What is sent, when, and in which order (README, "Urgent studies first",
"Off-peak windows", "Pausing a channel").

Most tests plan sessions in this process on each store (SQLite and
PostgreSQL) and record the job messages as they leave, in order, with the
priority the broker gets; time is passed explicitly (``now``), never slept.
One test runs a real worker on PostgreSQL and Redis to show that a message
already in the broker when its channel was paused does not run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.signals import before_task_publish
from fastapi.testclient import TestClient
from sqlalchemy import select

from scheduler import channels, messages, queries, resender
from scheduler.api import create_app
from scheduler.cli import app as cli
from scheduler.config import ConfigError, Settings, load_settings
from scheduler.doctor import WARNING, check_paused
from scheduler.jobstate import Ending, end_attempt
from scheduler.presence import record_presence
from scheduler.registry import load_registry
from scheduler.sessions import trigger
from scheduler.store.db import transaction
from scheduler.store.models import Job, PausedChannel
from scheduler.testing import (
    environment_values,
    record_study,
    using_environment,
    wait_session,
    wait_until,
)
from scheduler.windows import WindowError, parse_window, waiting_for, window_open
from workers_bridge import runner

from .conftest import Define
from .engine import jobs_by_name
from .support import worker_in_process, write_json

WORK = "dcm_testjobs:work"
TOKEN = "gate-token"


def job(name: str, **fields: Any) -> dict[str, Any]:
    return {"jobName": name, "workerEntry": WORK, **fields}


def at(hour: int, minute: int = 0, day: int = 1) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=UTC)


def window_around(now: datetime, start_h: float, end_h: float) -> str:
    """A window from ``start_h`` to ``end_h`` hours after ``now`` (UTC)."""
    start, end = now + timedelta(hours=start_h), now + timedelta(hours=end_h)
    return f"{start:%H:%M}-{end:%H:%M}"


@pytest.fixture
def gate(tmp_path: Path, store_url: str, services_root: Path) -> Iterator[Settings]:
    """A fresh store (each backend), the filesystem broker, the testjobs
    service, windows on UTC and the API token."""
    values = environment_values(tmp_path, store_url) | {
        "DCM_SERVICES_PATH": str(services_root),
        "DCM_TIMEZONE": "UTC",
        "DCM_API_TOKEN": TOKEN,
    }
    yield from gated(values)


def gated(values: dict[str, str]) -> Iterator[Settings]:
    """The settings of ``values``, with nothing known of paused channels
    before or after; messages sent in a test are never stale within its
    hours of `now`."""
    with using_environment(values | {"DCM_RESEND_AFTER": "1d"}) as settings:
        messages.forget_paused()
        yield settings
    messages.forget_paused()


@pytest.fixture
def sent() -> Iterator[list[tuple[str, int]]]:
    """(jobName, broker priority) of every job message, in the order sent."""
    record: list[tuple[str, int]] = []

    def spy(sender: str, headers: dict[str, Any], properties: dict[str, Any], **_: Any) -> None:
        if sender == messages.RUN_JOB:
            record.append((headers["shadow"].removeprefix("dcm:"), properties["priority"]))

    before_task_publish.connect(spy, weak=False)
    yield record
    before_task_publish.disconnect(spy)


def job_row(name: str) -> Job:
    with transaction() as db:
        return db.scalars(select(Job).where(Job.job_name == name)).one()


def shown(session_id: str) -> dict[str, Any]:
    with transaction() as db:
        return queries.show_session(db, session_id)


def paused_list() -> list[dict[str, Any]]:
    with transaction() as db:
        return queries.list_paused(db)


def started(uid: str, event: str = "study.stable") -> str:
    record_study(uid)
    return trigger(event, "study", uid).session_id


# --------------------------------------------------------------------------
# Urgent first


def test_urgent_sessions_go_above_every_normal_job_and_cohorts_below() -> None:
    normal = [messages.message_priority(p) for p in range(10)]
    assert normal == sorted(normal) and min(normal) == 1 and max(normal) == 8
    assert messages.message_priority(0, urgent=True) == 9
    assert messages.message_priority(9, cohort=True) == 0
    # A cohort session that is also urgent is urgent.
    assert messages.message_priority(0, urgent=True, cohort=True) == 9
    # Plan messages: live ones above cohort ones.
    assert messages.message_priority(cohort=True) < messages.message_priority()


def test_an_urgent_session_s_jobs_are_sent_at_the_top_priority(
    gate: Settings, define: Define, sent: list[tuple[str, int]]
) -> None:
    define(
        [
            job("routine", priority=9, events=["routine"]),
            job("stroke", priority=0, events=["stroke"], urgent=True),
        ]
    )
    started("30.1", "routine")
    urgent = started("30.1", "stroke")
    # The filesystem broker takes AMQP's order: higher first.
    assert sent == [("routine", 8), ("stroke", 9)]
    assert shown(urgent)["urgent"] is True


# --------------------------------------------------------------------------
# Off-peak windows


def test_a_window_across_midnight_is_open_from_its_start_to_its_end() -> None:
    night = parse_window("20:00-06:00")
    assert [night.is_open(at(h, m), UTC) for h, m in ((19, 59), (20, 0), (23, 59))] == [
        False,
        True,
        True,
    ]
    assert [night.is_open(at(h, m), UTC) for h, m in ((0, 0), (5, 59), (6, 0), (12, 0))] == [
        True,
        True,
        False,
        False,
    ]
    assert night.opens_at(at(12), UTC) == at(20)
    assert waiting_for("20:00-06:00", at(12), UTC) == "window 20:00-06:00 opens at 20:00"
    assert waiting_for("20:00-06:00", at(21), UTC) is None
    day = parse_window("08:00-09:30")
    assert (day.is_open(at(8), UTC), day.is_open(at(9, 30), UTC)) == (True, False)
    assert waiting_for("08:00-09:30", at(10), UTC) == "window 08:00-09:30 opens at 08:00 tomorrow"
    # The scheduler's zone, not UTC, decides: 20:00 in Berlin is 19:00 UTC in winter.
    berlin = load_settings({"DCM_TIMEZONE": "Europe/Berlin"}).timezone
    assert window_open("20:00-06:00", at(19), berlin) and not window_open("20:00-06:00", at(19))
    assert window_open(None, at(12), UTC)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("20:00", "HH:MM-HH:MM"),
        ("8:00-9:00", "HH:MM-HH:MM"),
        ("24:00-06:00", "00:00 to 23:59"),
        ("20:00-06:60", "00:00 to 23:59"),
        ("06:00-06:00", "starts and ends at the same time"),
        ("\u0660\u0668:00-09:00", "HH:MM-HH:MM"),  # Arabic-Indic digits
    ],
)
def test_a_window_that_is_not_two_different_times_of_day_is_refused(text: str, why: str) -> None:
    with pytest.raises(WindowError, match=why):
        parse_window(text)


def test_services_validate_names_the_file_line_job_and_field_of_a_bad_window(
    tmp_path: Path,
) -> None:
    definition = write_json(
        tmp_path / "night" / "dcm-processor.json",
        {"name": "night", "jobs": [job("recon", window="25:00-06:00")]},
    )
    [problem] = load_registry([tmp_path], entry_points=False).problems
    line = next(
        n for n, text in enumerate(definition.read_text().splitlines(), 1) if "window" in text
    )
    assert str(problem).startswith(f"{definition}: job 'recon': field 'window': line {line}: ")
    assert "25:00" in str(problem)


def test_a_bad_time_zone_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="DCM_TIMEZONE: unknown time zone 'Mars/Olympus'"):
        load_settings({"DCM_TIMEZONE": "Mars/Olympus"})


def test_a_windowed_job_waits_queued_until_the_resender_finds_its_window_open(
    gate: Settings, define: Define, sent: list[tuple[str, int]]
) -> None:
    now = datetime.now(UTC)
    window = window_around(now, 2, 3)
    define([job("day"), job("night", window=window, priority=1), job("late", window=window)])
    session_id = started("31.1")
    assert sent == [("day", 4)]
    night = job_row("night")
    assert (night.status, night.dispatched_at, night.window) == ("queued", None, window)
    doc = jobs_by_name(shown(session_id))
    # "… tomorrow" when the window opens after midnight.
    assert doc["night"]["waiting"].startswith(f"window {window} opens at {window[:5]}")
    assert doc["day"]["waiting"] is None

    assert resender.resend(gate, now=now + timedelta(hours=1)).jobs == 0
    assert resender.resend(gate, now=now + timedelta(hours=2, minutes=1)).jobs == 2
    # In priority order once open.
    assert sent == [("day", 4), ("late", 4), ("night", 1)]
    assert job_row("night").dispatched_at is not None


def test_an_urgent_session_ignores_windows(
    gate: Settings, define: Define, sent: list[tuple[str, int]]
) -> None:
    window = window_around(datetime.now(UTC), 2, 3)
    define([job("night", window=window, urgent=True)])
    session_id = started("31.2")
    assert sent == [("night", 9)]
    assert jobs_by_name(shown(session_id))["night"]["waiting"] is None


def test_a_retry_due_outside_its_window_waits_for_it(
    gate: Settings, define: Define, sent: list[tuple[str, int]]
) -> None:
    # Open now, closed when the retry's back-off of two hours is over.
    window = window_around(datetime.now(UTC), -1, 1)
    define([job("night", window=window, retries=1, retryDelay="2h")])
    started("31.3")
    assert sent == [("night", 4)]
    night = job_row("night")
    assert runner.claim(night.id, "w@host") is not None
    released = end_attempt(night.id, 1, Ending(ok=False, error="failed once"))
    assert released.retry is not None
    assert sent == [("night", 4)]
    night = job_row("night")
    assert (night.status, night.dispatched_at) == ("queued", None)


# --------------------------------------------------------------------------
# Paused channels


def test_a_paused_channel_holds_its_jobs_and_resume_sends_them_by_priority(
    gate: Settings, define: Define, sent: list[tuple[str, int]]
) -> None:
    define(
        [
            job("elsewhere"),
            job("low", channel="gpu", priority=1),
            job("high", channel="gpu", priority=9),
            job("mid", channel="gpu"),
        ]
    )
    report = channels.pause("gpu", reason="driver update")
    assert (report.paused, report.reason, report.queued) == (True, "driver update", 0)
    session_id = started("32.1")
    assert sent == [("elsewhere", 4)]
    doc = jobs_by_name(shown(session_id))
    assert doc["high"]["status"] == "queued"
    assert doc["high"]["waiting"] == "channel gpu paused (driver update)"
    # The re-sender leaves them, and does not call them lost.
    later = resender.resend(gate, now=datetime.now(UTC) + timedelta(hours=1))
    assert (later.jobs, later.lost) == (0, 0)
    assert sent == [("elsewhere", 4)]
    [paused] = paused_list()
    assert (paused["channel"], paused["reason"], paused["queued"]) == ("gpu", "driver update", 3)
    check = check_paused(gate)
    assert check is not None and check.status == WARNING
    assert "gpu" in check.detail and "dcm-scheduler resume gpu" in check.fix

    resumed = channels.resume("gpu")
    assert (resumed.queued, resumed.sent) == (3, 3)
    assert sent[1:] == [("high", 8), ("mid", 4), ("low", 1)]
    assert paused_list() == []
    assert check_paused(gate) is None
    with pytest.raises(channels.NotPausedError, match="channel gpu is not paused"):
        channels.resume("gpu")


def test_a_message_sent_before_the_pause_is_refused_by_the_claim_and_a_running_one_ends(
    gate: Settings, define: Define, sent: list[tuple[str, int]]
) -> None:
    define([job("first", channel="gpu"), job("second", channel="gpu")])
    session_id = started("32.2")
    assert len(sent) == 2
    first, second = job_row("first"), job_row("second")
    assert runner.claim(first.id, "w@host") is not None  # running when the pause comes
    channels.pause("gpu")

    # second's message is in the broker: its delivery is turned away.
    assert runner.claim(second.id, "w@host") is None
    second = job_row("second")
    assert (second.status, second.attempts, second.dispatched_at) == ("queued", 0, None)
    # The running attempt ends as usual; the session waits, not failed.
    end_attempt(first.id, 1, Ending(ok=True, result={}))
    assert job_row("first").status == "succeeded"
    assert shown(session_id)["status"] == "running"

    assert channels.resume("gpu").sent == 1
    assert sent[2:] == [("second", 4)]
    assert runner.claim(second.id, "w@host") is not None


def test_pause_resume_and_the_listings_through_the_cli_the_api_and_a_new_process(
    gate: Settings, define: Define, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    define([job("recon", channel="gpu")])
    with transaction() as db:
        record_presence(db, "w1@host", ["gpu", "default"])
    bad = CliRunner().invoke(cli, ["pause", "no such channel"])
    assert bad.exit_code == 2 and "is not a channel name" in bad.output
    assert "Traceback" not in bad.output
    paused = CliRunner().invoke(cli, ["pause", "gpu", "--reason", "maintenance", "--json"])
    assert paused.exit_code == 0, paused.output
    assert json.loads(paused.stdout)["paused"] is True

    # Another process reads the same state from the store.
    env = environment_values(tmp_path, gate.database_url) | {"COLUMNS": "200"}
    shown = subprocess.run(
        [sys.executable, "-m", "scheduler.entry", "workers", "--json"],
        env=dict(os.environ) | env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(shown.stdout)[0]["paused"] == ["gpu"]
    table = CliRunner().invoke(cli, ["workers"], env={"COLUMNS": "200"})
    assert "gpu (paused)" in table.output
    assert "channel gpu paused" in table.output and "maintenance" in table.output

    client = TestClient(create_app())
    auth = {"Authorization": f"Bearer {TOKEN}"}
    listed = client.get("/api/channels").json()
    assert {c["channel"]: c["paused"] for c in listed} == {"default": False, "gpu": True}
    assert client.post("/api/channels/gpu/resume").status_code == 401
    assert client.post("/api/channels/gpu/resume", headers=auth).json()["paused"] is False
    assert client.post("/api/channels/gpu/resume", headers=auth).status_code == 409
    assert client.post("/api/channels/bad%20name/pause", headers=auth).status_code == 422
    body = {"reason": "night maintenance"}
    again = client.post("/api/channels/gpu/pause", json=body, headers=auth).json()
    assert (again["paused"], again["reason"]) == (True, "night maintenance")
    resumed = CliRunner().invoke(cli, ["resume", "gpu"])
    assert resumed.exit_code == 0 and "channel gpu resumed" in resumed.output
    missing = CliRunner().invoke(cli, ["resume", "gpu"])
    assert missing.exit_code == 1 and "not paused" in missing.output


def test_a_pause_that_cannot_mean_what_was_meant_is_refused_or_warned(
    gate: Settings, define: Define
) -> None:
    from typer.testing import CliRunner

    define([job("recon", channel="gpu")])
    planning = CliRunner().invoke(cli, ["pause", "dcm.planning"])
    assert planning.exit_code == 2 and "not a job channel" in planning.output
    long = CliRunner().invoke(cli, ["pause", "gpu", "--reason", "x" * 501])
    assert long.exit_code == 2 and "at most 500 characters" in long.output
    typo = CliRunner().invoke(cli, ["pause", "gpuu"])
    assert typo.exit_code == 0 and "no service job, stored job or worker uses" in typo.output
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client = TestClient(create_app())
    assert "warning" in client.post("/api/channels/gpuu2/pause", headers=auth).json()
    assert "warning" not in client.post("/api/channels/gpu/pause", headers=auth).json()
    known = CliRunner().invoke(cli, ["pause", "gpu", "--reason", "line1\nline2 \x1b[31mRED"])
    assert known.exit_code == 0 and "warning" not in known.output
    with transaction() as db:
        reason = db.get(PausedChannel, "gpu").reason  # type: ignore[union-attr]
    assert reason == "line1 line2 [31mRED"  # one printable line


def test_a_real_worker_leaves_a_paused_channel_s_message_queued_until_resume(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    services_root: Path,
    define: Define,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="scheduler.jobstate")
    define([job("recon")])
    values = environment_values(tmp_path, pg_url, redis_url) | {
        "DCM_SERVICES_PATH": str(services_root)
    }
    with worker_in_process(values, concurrency=1):
        messages.forget_paused()
        channels.pause("default")
        session_id = started("33.1")
        recon = job_row("recon")
        assert recon.dispatched_at is None  # held back at sending
        # A message that left before the pause was seen (another process's
        # cache): the worker's claim turns it away.
        ready = messages.ReadyJob(recon.id, "recon", "default", 5, 0.0)
        messages.job_signature(ready).apply_async()
        wait_until(
            lambda: f"job {recon.id}: its channel is paused" in caplog.text,
            what="the paused channel's message to be turned away",
        )
        recon = job_row("recon")
        assert (recon.status, recon.attempts, recon.dispatched_at) == ("queued", 0, None)
        assert channels.resume("default").sent == 1
        doc = wait_session(session_id)
    messages.forget_paused()
    assert doc["status"] == "succeeded"
    assert jobs_by_name(doc)["recon"]["attempts"] == 1


# --------------------------------------------------------------------------
# One round trip on Redis


@pytest.fixture
def on_redis(
    tmp_path: Path, store_url: str, redis_url: str, services_root: Path
) -> Iterator[Settings]:
    """A fresh store (each backend), Redis as the broker (no worker), the
    testjobs service."""
    values = environment_values(tmp_path, store_url, redis_url)
    yield from gated(values | {"DCM_SERVICES_PATH": str(services_root)})


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The commands of each Redis round trip that carries a message (an
    LPUSH of a task or a PUBLISH of an event), pipelined or alone. Declaring
    a queue, once per connection, carries none."""
    import redis

    carrying = ("LPUSH", "PUBLISH")
    trips: list[list[str]] = []
    real_execute = redis.client.Pipeline.execute
    real_command = redis.Redis.execute_command

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        commands = [str(command[0]).upper() for command, _options in self.command_stack]
        if any(name in carrying for name in commands):
            trips.append(commands)
        return real_execute(self, *args, **kwargs)

    def command(self: Any, *args: Any, **options: Any) -> Any:
        if str(args[0]).upper() in carrying:
            trips.append([str(args[0]).upper()])
        return real_command(self, *args, **options)

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    monkeypatch.setattr(redis.Redis, "execute_command", command)
    return trips


def queued_on_redis(url: str) -> dict[str, tuple[str, int, dict[str, Any]]]:
    """Every job message waiting in Redis: job id → (queue, priority, headers)."""
    import redis

    client = redis.Redis.from_url(url)
    found = {}
    for key in client.scan_iter("*"):
        name = key.decode()
        if client.type(key) != b"list" or name.startswith("_kombu"):
            continue
        queue, _, step = name.partition(":")
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            headers = message["headers"]
            assert message["properties"]["priority"] == int(step or 0)
            found[headers["id"]] = (queue, int(step or 0), headers)
    return found


def test_a_session_s_ready_jobs_leave_in_one_round_trip_each_to_its_queue_at_its_priority(
    on_redis: Settings, define: Define, round_trips: list[list[str]]
) -> None:
    define(
        [
            job("low", priority=0),
            job("high", priority=9, channel="gpu"),
            job("usual"),
            job("after", dependsOn="usual"),
        ]
    )
    session_id = started("34.1")
    assert round_trips == [["LPUSH", "LPUSH", "LPUSH"]]
    queued = queued_on_redis(on_redis.broker_url)
    rows = {name: job_row(name) for name in ("low", "high", "usual", "after")}
    assert set(queued) == {rows[name].id for name in ("low", "high", "usual")}
    for name, channel, priority in (
        ("low", "default", 0),
        ("high", "gpu", 9),
        ("usual", "default", 5),
    ):
        queue, step, headers = queued[rows[name].id]
        assert (queue, headers["task"], headers["shadow"]) == (
            channel,
            messages.RUN_JOB,
            f"dcm:{name}",
        )
        assert step == messages.broker_priority(priority)
        assert rows[name].dispatched_at is not None
    assert rows["after"].dispatched_at is None  # waits for "usual"
    assert shown(session_id)["status"] == "running"


def test_with_task_events_on_each_job_s_task_sent_event_leaves_in_the_same_round_trip(
    on_redis: Settings, define: Define, round_trips: list[list[str]]
) -> None:
    import redis

    define([job("a"), job("b")])
    app = messages.app()
    subscriber = redis.Redis.from_url(on_redis.broker_url).pubsub(ignore_subscribe_messages=True)
    database = on_redis.broker_url.rsplit("/", 1)[1]
    subscriber.psubscribe(f"/{database}.celeryev/*")  # kombu's fanout channels of this database
    app.conf.task_send_sent_event = True  # what Flower's "enable events" turns on
    try:
        started("34.2")
    finally:
        app.conf.task_send_sent_event = False
    assert len(round_trips) == 1 and sorted(round_trips[0]) == ["LPUSH"] * 2 + ["PUBLISH"] * 2
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(events) < 2 and time.monotonic() < deadline:
        message = subscriber.get_message(timeout=1)  # None for the subscription's own reply
        if message is not None:
            envelope = json.loads(message["data"])
            assert envelope["properties"]["body_encoding"] == "base64"
            events.append(json.loads(base64.b64decode(envelope["body"])))
    subscriber.close()
    assert [e["type"] for e in events] == ["task-sent"] * 2
    assert {e["uuid"] for e in events} == {job_row(name).id for name in ("a", "b")}
    assert {(e["name"], e["queue"]) for e in events} == {(messages.RUN_JOB, "default")}


def test_a_broker_error_during_the_round_trip_leaves_the_session_s_jobs_to_the_resender(
    on_redis: Settings,
    define: Define,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis

    define([job("a"), job("b", channel="gpu")])

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("connection reset by peer")

    with monkeypatch.context() as patched:
        patched.setattr(redis.client.Pipeline, "execute", refused)
        started("34.3")
    assert "2 job(s) left for the re-sender" in caplog.text
    assert [(job_row(n).status, job_row(n).dispatched_at) for n in "ab"] == [("queued", None)] * 2
    assert queued_on_redis(on_redis.broker_url) == {}
    report = resender.resend(on_redis, now=datetime.now(UTC) + timedelta(seconds=30))
    assert report.jobs == 2
    assert set(queued_on_redis(on_redis.broker_url)) == {job_row(n).id for n in "ab"}


def test_a_single_job_s_message_is_retried_through_a_broker_blip(
    on_redis: Settings, define: Define, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an ending releases is most often one job: sent on its own, with
    # the retry policy, not left to the re-sender by a batch sent once.
    import redis

    define([job("only")])
    real_command = redis.Redis.execute_command
    refused: list[str] = []

    def blip(self: Any, *args: Any, **options: Any) -> Any:
        if str(args[0]).upper() == "LPUSH" and not refused:
            refused.append("LPUSH")
            raise redis.ConnectionError("connection reset by peer")
        return real_command(self, *args, **options)

    with monkeypatch.context() as patched:
        patched.setattr(redis.Redis, "execute_command", blip)
        started("34.9")
    assert refused == ["LPUSH"]
    row = job_row("only")
    assert (row.status, row.dispatched_at is not None) == ("queued", True)
    assert set(queued_on_redis(on_redis.broker_url)) == {row.id}
