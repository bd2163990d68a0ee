"""The outbox: every message the scheduler sends, and what happens when it cannot.

Two kinds leave for the broker, both addressed by task name, so nothing here
imports the modules that define the tasks: the jobs that became ready
(``workers_bridge.run_job``: task id = job id, queue = channel, the job's
priority, Flower name ``dcm:<jobName>``), sent in order on one producer
and marked dispatched; and the plans of new sessions (``scheduler.plan``).
Every message's priority comes from :func:`broker_priority`: urgent
sessions first, cohort runs last (README, "Urgent studies first"). Jobs of
a paused channel and jobs whose off-peak window is closed are held back,
queued and undispatched, for ``resume`` and the re-sender (README,
"Pausing a channel", "Off-peak windows").

Messages always follow committed rows. One broker retry policy serves both;
when the broker stays away the rows keep saying what is owed (jobs not
dispatched, sessions still ``planning``) and the re-sender sends them when it
is back (README, "Failure modes"): a failure to send is logged, never raised.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from scheduler.config import get_settings
from scheduler.store.db import statements, transaction
from scheduler.store.models import Job, PausedChannel, SchedulingSession, utcnow
from scheduler.vocabulary import JobStatus
from scheduler.windows import window_open

log = logging.getLogger(__name__)

RUN_JOB = "workers_bridge.run_job"
PLAN = "scheduler.plan"
# A short retry inside one send: longer outages are the re-sender's.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2}


def app() -> Any:
    from scheduler.celery_app import app as celery_app

    if celery_app.conf.task_always_eager:
        # Eager mode runs tasks here, by name: their modules must be loaded.
        celery_app.loader.import_default_modules()
    return celery_app


@dataclass(frozen=True)
class SessionFlags:
    """What of a job's session decides how its messages go: urgent ones
    first, cohort ones after live work (README, "Urgent studies first")."""

    urgent: bool = False
    cohort: bool = False


NORMAL = SessionFlags()


@dataclass(frozen=True)
class ReadyJob:
    """What sending a job needs, without loading its row."""

    id: str
    job_name: str
    channel: str
    priority: int
    sort_position: float
    urgent: bool = False
    cohort: bool = False
    # "HH:MM-HH:MM": sent only while this off-peak window is open.
    window: str | None = None

    @classmethod
    def of(cls, job_id: str, definition: Any, session: SessionFlags = NORMAL) -> ReadyJob:
        return cls(
            job_id,
            definition.job_name,
            definition.channel,
            definition.priority,
            definition.sort_position,
            session.urgent,
            session.cohort,
            definition.window,
        )

    @property
    def level(self) -> int:
        return message_priority(self.priority, urgent=self.urgent, cohort=self.cohort)


# Message priorities, higher first, on one scale for every queue (README,
# "Urgent studies first"): urgent sessions above every normal job, cohort
# runs below them, a job's own priority (0-9) in between. RabbitMQ queues are
# declared with x-max-priority 10 (celeryconfig), so the scale fits 0-9.
URGENT_LEVEL = 9
COHORT_LEVEL = 0
# A plan message of a live session, and a job's default priority (5).
NORMAL_LEVEL = 4


def message_priority(
    priority: int | None = None, *, urgent: bool = False, cohort: bool = False
) -> int:
    """The message priority (0-9, higher first) of a job of ``priority``
    (None: a plan message) in an urgent, cohort or normal session: 9 urgent,
    0 cohort, and the job's priority 0-9 folded into 1-8 (0 and 1 share 1,
    4 and 5 share 4)."""
    if urgent:
        return URGENT_LEVEL
    if cohort:
        return COHORT_LEVEL
    if priority is None:
        return NORMAL_LEVEL
    return 1 + max(0, min(9, priority)) * 7 // 9


def broker_priority(
    priority: int | None = None, *, urgent: bool = False, cohort: bool = False
) -> int:
    """:func:`message_priority` in the broker's terms: Redis runs the lowest
    number first, AMQP the highest. Every message the scheduler sends takes
    its priority from here."""
    level = message_priority(priority, urgent=urgent, cohort=cohort)
    return _in_broker_terms(level, _lowest_first(app()))


def _lowest_first(celery_app: Any) -> bool:
    """Whether the broker runs the lowest priority number first (Redis)."""
    return str(celery_app.conf.broker_url or "").startswith(("redis", "rediss"))


def _in_broker_terms(level: int, lowest_first: bool) -> int:
    return 9 - level if lowest_first else level


def job_signature(job: ReadyJob, countdown: float | None = None) -> Any:
    options: dict[str, Any] = {
        "task_id": job.id,
        "queue": job.channel,
        "priority": broker_priority(job.priority, urgent=job.urgent, cohort=job.cohort),
        "shadow": f"dcm:{job.job_name}",
    }
    if countdown:
        options["countdown"] = countdown
    return app().signature(RUN_JOB, args=(job.id,), **options)


def _publish(jobs: Sequence[ReadyJob], countdown: float | None) -> None:
    """Send each job's ``run_job`` message, in order, on one producer.

    What a signature's ``apply_async`` sends (Celery's own message, routing,
    queue declaration and publish signals), without what a job message never
    needs: a group and its result objects, routing looked up per message.
    A third of a job's publish time went there. On Redis the messages (and
    their ``task-sent`` events) leave together, in one round trip
    (:func:`_together`). Eager mode (tests) runs the signatures instead."""
    celery_app = app()
    if celery_app.conf.task_always_eager:
        for job in jobs:
            job_signature(job, countdown).apply_async()
        return
    amqp = celery_app.amqp
    parent = celery_app.current_worker_task
    root_id = parent_id = None
    if parent is not None:  # Flower links a job's message to the task that sent it
        root_id, parent_id = parent.request.root_id or parent.request.id, parent.request.id
    sent_event, reply_to = celery_app.conf.task_send_sent_event, celery_app.thread_oid
    lowest_first = _lowest_first(celery_app)
    queues = {channel: amqp.queues[channel] for channel in dict.fromkeys(j.channel for j in jobs)}
    policy = dict(celery_app.conf.task_publish_retry_policy or {}, **RETRY_POLICY)
    with celery_app.producer_or_acquire() as producer, _together(producer, len(jobs)):
        # Each queue declared as the app declares it, once per send rather
        # than at each message (a copy of the queue bound to the channel each time).
        for queue in queues.values():
            producer.maybe_declare(queue, retry=True, **policy)
        for job in jobs:
            message = amqp.create_task_message(
                job.id,
                RUN_JOB,
                (job.id,),
                {},
                countdown=countdown or None,
                reply_to=reply_to,
                create_sent_event=sent_event,
                root_id=root_id,
                parent_id=parent_id,
                shadow=f"dcm:{job.job_name}",
                ignore_result=True,
                argsrepr=repr((job.id,)),
                kwargsrepr="{}",
            )
            amqp.send_task_message(
                producer,
                RUN_JOB,
                message,
                queue=queues[job.channel],
                declare=[],
                priority=_in_broker_terms(job.level, lowest_first),
                retry=True,
                retry_policy=RETRY_POLICY,
            )


def _together(producer: Any, messages: int) -> AbstractContextManager[Any]:
    """Send what ``producer`` publishes in the block at its end, in one round
    trip, where the transport can (kombu's publish batch: a Redis pipeline);
    elsewhere (RabbitMQ, the embedded broker, an older kombu) each message
    leaves as it is published. Each message on its own built a Redis client
    and waited for its own reply: two thirds of a ten-job session's publish.

    A batch is sent once, without the retry policy: when it fails, which of
    its messages arrived is unknown, and the caller leaves them all to the
    re-sender (a job sent twice runs once: its claim takes it once). A
    single message (what an ending releases, most often) gains nothing from
    a batch and keeps the retry policy."""
    batch = getattr(producer, "batch", None)
    return contextlib.nullcontext() if batch is None or messages < 2 else batch()


def _left_for_resender(what: str, count: int, error: Exception) -> None:
    log.warning("broker unavailable, %d %s left for the re-sender: %s", count, what, error)


# How long a process trusts what it read of the paused channels. A message
# sent within that time after a pause is stopped by the claim instead.
PAUSED_TTL = 2.0
_paused: tuple[float, frozenset[str]] = (float("-inf"), frozenset())


def paused_channels() -> frozenset[str]:
    """The channels an operator paused (README, "Pausing a channel"), as read
    at most :data:`PAUSED_TTL` seconds ago by this process."""
    global _paused
    read_at, channels = _paused
    if time.monotonic() - read_at < PAUSED_TTL:
        return channels
    try:
        with statements() as db:
            channels = frozenset(db.scalars(select(PausedChannel.channel)))
    except Exception as exc:  # noqa: BLE001 - the claim still refuses a paused channel's job
        log.warning("could not read the paused channels: %s", exc)
    _paused = (time.monotonic(), channels)
    return channels


def forget_paused() -> None:
    """Read the paused channels afresh at the next send (after a pause or resume)."""
    global _paused
    _paused = (float("-inf"), frozenset())


def held_back(jobs: Sequence[ReadyJob], at: datetime) -> list[ReadyJob]:
    """The jobs that must not be sent at ``at``: those of a paused channel,
    and those of a normal session whose off-peak window is closed."""
    paused = paused_channels()
    zone = get_settings().timezone if any(j.window for j in jobs) else None
    return [
        job
        for job in jobs
        if job.channel in paused or (not job.urgent and not window_open(job.window, at, zone))
    ]


def send_jobs(
    jobs: Sequence[ReadyJob],
    countdown: float | None = None,
    *,
    marked: bool = False,
    now: datetime | None = None,
) -> int:
    """Send jobs known to be queued and ready, then mark them dispatched
    (``marked``: the caller marked them already, in the transaction that
    made them ready; a failed send unmarks them); returns how many went out.
    Ordered by message priority (urgent first, cohort last), then priority,
    then sortPosition. Jobs held back (a paused channel, a closed window at
    the time the message would run) stay queued and undispatched: the
    re-sender or ``resume`` sends them later."""
    if not jobs:
        return 0
    held = held_back(jobs, (now or utcnow()) + timedelta(seconds=countdown or 0))
    if held:
        if marked:
            _mark_dispatched([j.id for j in held], None)
        waiting = {j.id for j in held}
        jobs = [j for j in jobs if j.id not in waiting]
        if not jobs:
            return 0
    ordered = sorted(jobs, key=lambda j: (-j.level, -j.priority, j.sort_position, j.job_name))
    ids = [j.id for j in jobs]
    try:
        _publish(ordered, countdown)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the rows say what is owed
        _left_for_resender("job(s)", len(jobs), exc)
        if marked:
            _mark_dispatched(ids, None)
        return 0
    if not marked:
        _mark_dispatched(ids, utcnow())
    return len(jobs)


def _mark_dispatched(job_ids: list[str], when: datetime | None) -> None:
    try:
        with statements() as db:
            db.execute(update(Job).where(Job.id.in_(job_ids)).values(dispatched_at=when))
    except Exception as exc:  # noqa: BLE001 - left marked, the re-sender still sends them late
        log.warning("could not record the dispatch of %d job(s): %s", len(job_ids), exc)


def send_job_ids(
    job_ids: Sequence[str], countdown: float | None = None, *, now: datetime | None = None
) -> int:
    """:func:`send_jobs` for jobs known by id only (read from the store; those
    no longer queued are left out)."""
    if not job_ids:
        return 0
    with transaction() as db:
        jobs = [
            ReadyJob(*row)
            for row in db.execute(
                select(
                    Job.id,
                    Job.job_name,
                    Job.channel,
                    Job.priority,
                    Job.sort_position,
                    SchedulingSession.urgent,
                    SchedulingSession.cohort.is_not(None),
                    Job.window,
                )
                .join(SchedulingSession, SchedulingSession.id == Job.session_id)
                .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.QUEUED)
            )
        ]
    return send_jobs(jobs, countdown, now=now)


def send_plans(session_ids: Sequence[str], *, urgent: bool = False, cohort: bool = False) -> int:
    """Send one ``scheduler.plan`` task per session (those of a cohort run
    after live ones); returns how many went out."""
    if not session_ids:
        return 0
    sent = 0
    celery_app = app()
    priority = broker_priority(urgent=urgent, cohort=cohort)
    try:
        with celery_app.producer_or_acquire() as producer:
            for session_id in session_ids:
                # A signature, not send_task: where the task is known (a
                # worker, eager mode) its own options and routing apply.
                celery_app.signature(PLAN, kwargs={"session_id": session_id}).apply_async(
                    producer=producer, retry=True, retry_policy=RETRY_POLICY, priority=priority
                )
                sent += 1
    except Exception as exc:  # noqa: BLE001 - sessions left in planning are re-planned
        _left_for_resender("plan(s)", len(session_ids) - sent, exc)
    return sent
