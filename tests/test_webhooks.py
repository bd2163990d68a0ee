"""Notifications (README, "Notifications"): webhooks on session events from a durable outbox."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from celeryconfig import celery_settings
from scheduler import control, doctor, jobstate, sessions, tasks, webhooks
from scheduler.config import Settings, load_settings, reset_settings
from scheduler.emission import create_session
from scheduler.jobstate import Ending
from scheduler.leases import acquire, new_holder, release
from scheduler.store.db import get_engine, statements, transaction
from scheduler.store.models import Job, SchedulingSession, WebhookDelivery, utcnow
from scheduler.testing import (
    detect_and_send,
    free_port,
    record_study,
    use_environment,
    wait_session,
    wait_until,
)
from workers_bridge import runner

from .conftest import Define

WORK = "dcm_testjobs:work"
SECRET = "s3cret"
# For rules the store's backend does not change: the SQLite store alone.
SQLITE_ONLY = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


class Receiver:
    """A webhook receiver on a free local port: answers each POST with the
    next status of ``answers`` (200 once they are used up) and keeps what
    it received. :meth:`stop` makes the port refuse connections."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook?token=t0k3n"
        self.answers: list[int] = []
        self.received: list[tuple[int, dict[str, str], bytes]] = []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = outer.answers.pop(0) if outer.answers else 200
                outer.received.append((status, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for status, headers, body in self.received if status == 200]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.start()
    yield found
    found.stop()


def configure(monkeypatch: pytest.MonkeyPatch, **values: str) -> Settings:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return use_environment({})


@pytest.fixture
def hooked(
    env: Settings,
    define: Define,
    services_root: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Settings]:
    """A fresh store (each backend) with webhooks to ``receiver``, signed."""
    yield configure(
        monkeypatch,
        DCM_SERVICES_PATH=str(services_root),
        DCM_WEBHOOK_URLS=receiver.url,
        DCM_WEBHOOK_SECRET=SECRET,
    )
    monkeypatch.undo()
    reset_settings()


def planned(define: Define, uid: str, jobs: list[dict[str, Any]]) -> str:
    """A session of study ``uid`` planned with ``jobs`` (nothing runs them)."""
    define(jobs)
    record_study(uid)
    session_id = sessions.open_session("study", uid, "study.stable", manual=True)
    assert session_id is not None
    sessions.plan_session(session_id)
    return session_id


def run_ready(session_id: str, *, fail: bool) -> None:
    """Claim and end every ready job of the session as a worker does (on
    PostgreSQL through the per-job psycopg statements), till none is ready."""
    while True:
        with transaction() as db:
            ready = list(
                db.scalars(
                    select(Job.id).where(
                        Job.session_id == session_id, Job.status == "queued", Job.pending_deps == 0
                    )
                )
            )
        if not ready:
            return
        for job_id in ready:
            taken = runner.claim(job_id, "test-host")
            assert taken is not None
            ending = (
                Ending(ok=False, error="boom: disk full")
                if fail
                else Ending(ok=True, claimed_by=taken.claimed_by)
            )
            jobstate.end_attempt(job_id, taken.number, ending)


def outbox(session_id: str | None = None) -> list[WebhookDelivery]:
    with transaction() as db:
        query = select(WebhookDelivery).order_by(WebhookDelivery.created_at)
        if session_id:
            query = query.where(WebhookDelivery.session_id == session_id)
        return list(db.scalars(query))


def status_of(session_id: str) -> str | None:
    with transaction() as db:
        return db.scalar(select(SchedulingSession.status).where(SchedulingSession.id == session_id))


def test_a_failed_session_is_delivered_once_signed_after_the_receiver_recovers(
    hooked: Settings, define: Define, receiver: Receiver
) -> None:
    session_id = planned(define, "40.1", [{"jobName": "segment", "workerEntry": WORK}])
    run_ready(session_id, fail=True)
    [row] = outbox()
    assert (row.session_id, row.event, row.attempts, row.url) == (
        session_id,
        "session.failed",
        0,
        receiver.url,
    )

    now = utcnow()
    receiver.answers = [500]
    assert webhooks.deliver_due(now=now).failed == 1
    [row] = outbox()
    assert (row.attempts, row.delivered_at) == (1, None)
    assert row.last_error is not None and row.last_error.startswith("HTTP 500")
    assert row.next_attempt_at == now + webhooks.backoff(1)
    assert webhooks.deliver_due(now=now).failed == 0  # backing off: not due yet

    receiver.stop()  # the receiver is down: connection refused
    later = now + webhooks.backoff(1)
    assert webhooks.deliver_due(now=later).failed == 1
    [row] = outbox()
    assert row.attempts == 2 and row.next_attempt_at == later + webhooks.backoff(2)
    assert "Connect" in (row.last_error or "")
    with transaction() as db:
        state = webhooks.outbox_state(db)
    assert (state.waiting, state.failing, state.given_up) == (1, 1, 0)

    receiver.start()
    assert webhooks.deliver_due(now=later + webhooks.backoff(2)).delivered == 1
    far = later + timedelta(days=2)
    assert webhooks.deliver_due(now=far) == webhooks.DeliveryReport()
    [row] = outbox()
    assert row.delivered_at is not None and row.last_error is None and row.attempts == 3

    [(headers, body)] = receiver.accepted()
    assert len(receiver.received) == 2  # the 500 and the accepted one
    assert receiver.received[0][2] == body  # every attempt sends the same bytes
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-DCM-Signature"] == f"sha256={expected}"
    assert headers["X-DCM-Delivery"] == row.id
    assert headers["X-DCM-Event"] == "session.failed"
    payload = json.loads(body)
    assert payload["event"] == "session.failed" and payload["delivery"] == row.id
    assert payload["dashboard_url"] == f"http://127.0.0.1:8765/sessions/{session_id}"
    session = payload["session"]
    assert (session["id"], session["status"], session["event"], session["uid"]) == (
        session_id,
        "failed",
        "study.stable",
        "40.1",
    )
    assert (session["patient_id"], session["study_uid"]) == ("P1", "40.1")
    assert session["jobs"] == {"failed": 1}
    [failed] = session["failed_jobs"]
    assert (failed["job_name"], failed["service"], failed["status"]) == (
        "segment",
        "testjobs",
        "failed",
    )
    assert failed["error"] == "boom: disk full"


def test_only_subscribed_events_are_queued_and_session_finished_means_every_ending(
    hooked: Settings, define: Define, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = {"jobName": "segment", "workerEntry": WORK}
    succeeded = planned(define, "41.1", [job])
    run_ready(succeeded, fail=False)
    assert status_of(succeeded) == "succeeded" and outbox() == []  # default: failed, partial

    configure(monkeypatch, DCM_WEBHOOK_EVENTS="session.finished")
    again = planned(define, "41.2", [job])
    run_ready(again, fail=False)
    cancelled = planned(define, "41.3", [job])
    control.cancel_session(cancelled)
    empty = planned(define, "41.4", [])
    assert [(row.session_id, row.event) for row in outbox()] == [
        (again, "session.succeeded"),
        (cancelled, "session.cancelled"),
        (empty, "session.empty"),
    ]

    # A service filter: only sessions with a job of a listed service.
    configure(monkeypatch, DCM_WEBHOOK_SERVICES="other")
    run_ready(planned(define, "41.5", [job]), fail=True)
    configure(monkeypatch, DCM_WEBHOOK_SERVICES="other,testjobs")
    listed = planned(define, "41.6", [job])
    run_ready(listed, fail=True)
    assert [row.session_id for row in outbox()][3:] == [listed]


@SQLITE_ONLY
def test_a_planning_failure_is_notified(
    hooked: Settings, define: Define, receiver: Receiver
) -> None:
    define([{"jobName": "segment", "workerEntry": WORK}])
    with transaction() as db:
        session_id = create_session(
            db, event="study.stable", level="study", uid="nowhere", fingerprint="f", revision=1
        )
    assert session_id is not None
    sessions.plan_session(session_id)  # no such study in the store: planning fails
    assert [(row.session_id, row.event) for row in outbox()] == [(session_id, "session.failed")]


def test_the_outbox_row_commits_or_rolls_back_with_the_final_status(
    hooked: Settings, define: Define
) -> None:
    session_id = planned(define, "42.1", [{"jobName": "segment", "workerEntry": WORK}])
    [job_id] = [row.id for row in db_jobs(session_id)]
    taken = runner.claim(job_id, "test-host")
    assert taken is not None

    class Crash(Exception):
        pass

    with pytest.raises(Crash), statements() as db:
        released = jobstate.record_ending(db, job_id, taken.number, Ending(ok=False, error="x"))
        assert released.finished
        assert db.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
        raise Crash  # e.g. the worker dies before the commit
    assert status_of(session_id) == "running" and outbox() == []

    jobstate.end_attempt(job_id, taken.number, Ending(ok=False, error="x"))
    assert status_of(session_id) == "failed" and len(outbox()) == 1


def db_jobs(session_id: str) -> list[Job]:
    with transaction() as db:
        return list(db.scalars(select(Job).where(Job.session_id == session_id)))


def test_a_session_retried_and_failing_again_is_notified_again(
    hooked: Settings, define: Define, receiver: Receiver
) -> None:
    session_id = planned(define, "43.1", [{"jobName": "segment", "workerEntry": WORK}])
    run_ready(session_id, fail=True)
    control.retry_jobs(session_id=session_id)
    run_ready(session_id, fail=True)
    rows = outbox()
    assert [(row.event, row.sequence) for row in rows] == [
        ("session.failed", 1),
        ("session.failed", 2),
    ]
    assert webhooks.deliver_due().delivered == 2
    assert {headers["X-DCM-Delivery"] for headers, _ in receiver.accepted()} == {
        row.id for row in rows
    }


@SQLITE_ONLY
def test_a_failing_receiver_is_tried_once_per_run_not_once_per_notification(
    hooked: Settings, define: Define, receiver: Receiver
) -> None:
    for uid in ("48.1", "48.2"):
        run_ready(planned(define, uid, [{"jobName": "a", "workerEntry": WORK}]), fail=True)
    receiver.answers = [502]
    assert webhooks.deliver_due() == webhooks.DeliveryReport(failed=1)
    assert sorted(row.attempts for row in outbox()) == [0, 1]
    assert webhooks.deliver_due().delivered == 1  # the untried one, due all along


def test_one_deliverer_at_a_time_within_its_budget_so_a_slow_receiver_holds_one_slot(
    hooked: Settings, define: Define, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_ready(planned(define, "48.3", [{"jobName": "a", "workerEntry": WORK}]), fail=True)
    other = new_holder()
    assert acquire(webhooks.LEASE, 60, other)
    # Another deliverer is at it: this run returns at once, the row stays due.
    assert webhooks.deliver_due() == webhooks.DeliveryReport()
    release(webhooks.LEASE, other)
    monkeypatch.setattr(webhooks, "BUDGET", -1.0)
    # A run past its budget starts no post; the next run delivers.
    assert webhooks.deliver_due() == webhooks.DeliveryReport()
    assert [row.attempts for row in outbox()] == [0]
    monkeypatch.setattr(webhooks, "BUDGET", 15.0)
    assert webhooks.deliver_due().delivered == 1
    assert len(receiver.accepted()) == 1


def test_without_a_webhook_url_the_outbox_is_never_touched(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, DCM_SERVICES_PATH=str(services_root))
    touched: list[str] = []

    def watch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "webhook_outbox" in statement:
            touched.append(statement)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", watch)
    try:
        session_id = planned(define, "44.1", [{"jobName": "segment", "workerEntry": WORK}])
        run_ready(session_id, fail=True)
        cancelled = planned(define, "44.2", [{"jobName": "segment", "workerEntry": WORK}])
        control.cancel_session(cancelled)
    finally:
        event.remove(engine, "before_cursor_execute", watch)
    assert status_of(session_id) == "failed" and touched == []
    assert doctor.check_webhooks(env) is None


def test_beat_delivers_what_a_lost_message_left_in_the_outbox(
    hooked: Settings, define: Define, receiver: Receiver
) -> None:
    # The filesystem broker of this store has no worker: the message sent
    # after the commit is never consumed, as if it were lost.
    session_id = planned(define, "45.1", [{"jobName": "segment", "workerEntry": WORK}])
    run_ready(session_id, fail=True)
    assert receiver.received == []
    schedule = celery_settings(hooked)["beat_schedule"]
    assert schedule["dcm-webhooks"]["task"] == "scheduler.deliver_webhooks"
    assert "dcm-webhooks" not in celery_settings(load_settings({}))["beat_schedule"]
    assert tasks.deliver_webhooks() == {"delivered": 1, "failed": 0, "given_up": 0}
    assert len(receiver.accepted()) == 1
    check = doctor.check_webhooks(hooked)
    assert check is not None and check.status == doctor.OK


@SQLITE_ONLY
def test_doctor_reports_notifications_that_were_given_up(
    hooked: Settings, define: Define, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "MAX_ATTEMPTS", 1)
    run_ready(planned(define, "46.1", [{"jobName": "a", "workerEntry": WORK}]), fail=True)
    receiver.answers = [503]
    assert webhooks.deliver_due().given_up == 1
    check = doctor.check_webhooks(hooked)
    assert check is not None and check.status == doctor.PROBLEM
    assert "1 notification(s) given up" in check.detail and "HTTP 503" in check.detail
    assert "t0k3n" not in check.detail  # the receiver's token stays out of reports


def test_doctor_warns_of_a_service_filter_that_names_no_loaded_service(
    hooked: Settings, define: Define, monkeypatch: pytest.MonkeyPatch
) -> None:
    define([{"jobName": "a", "workerEntry": WORK}])
    settings = configure(monkeypatch, DCM_WEBHOOK_SERVICES="testjobs")
    check = doctor.check_webhooks(settings)
    assert check is not None and check.status == doctor.OK
    settings = configure(monkeypatch, DCM_WEBHOOK_SERVICES="testjobs,segmentaton")
    check = doctor.check_webhooks(settings)
    assert check is not None and check.status == doctor.WARNING
    assert "'segmentaton', not a loaded service" in check.detail


def test_a_real_worker_notifies_when_the_last_job_fails(
    live: Settings, define: Define, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL, Redis and a real worker: the per-job psycopg path queues
    the row, the message after the commit has a worker deliver it."""
    monkeypatch.setenv("DCM_WEBHOOK_URLS", receiver.url)
    reset_settings()
    define(
        [
            {"jobName": "a", "workerEntry": WORK},
            {"jobName": "b", "workerEntry": WORK, "params": {"raise": "no lesion model"}},
        ]
    )
    record_study("47.1", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    assert wait_session(session_id)["status"] == "partial"
    [(headers, body)] = wait_until(receiver.accepted, what="the webhook")
    payload = json.loads(body)
    assert (payload["event"], payload["session"]["id"]) == ("session.partial", session_id)
    assert payload["session"]["jobs"] == {"succeeded": 1, "failed": 1}
    assert "X-DCM-Signature" not in headers  # no secret: unsigned
    wait_until(lambda: outbox()[0].delivered_at, what="the delivery to be recorded")
    monkeypatch.undo()
    reset_settings()


def test_a_success_that_ends_its_session_partial_queues_its_webhook(
    hooked: Settings, define: Define
) -> None:
    # Subscribed by default: session.failed and session.partial. The last
    # job to end succeeds, as a worker reports it, and the session is partial.
    session_id = planned(
        define,
        "41.7",
        [{"jobName": "broken", "workerEntry": WORK}, {"jobName": "fine", "workerEntry": WORK}],
    )
    with transaction() as db:
        jobs = {
            name: job_id
            for name, job_id in db.execute(
                select(Job.job_name, Job.id).where(Job.session_id == session_id)
            )
        }
    broken = runner.claim(jobs["broken"], "test-host")
    fine = runner.claim(jobs["fine"], "test-host")
    assert broken is not None and fine is not None
    jobstate.end_attempt(jobs["broken"], broken.number, Ending(ok=False, error="boom"))
    assert outbox() == []
    jobstate.end_attempt(jobs["fine"], fine.number, Ending(ok=True, claimed_by=fine.claimed_by))
    assert status_of(session_id) == "partial"
    assert [(row.session_id, row.event) for row in outbox()] == [(session_id, "session.partial")]
