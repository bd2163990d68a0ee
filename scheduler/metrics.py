"""The scheduler's figures in Prometheus form, computed from the store at
each scrape (``GET /metrics`` on ``serve``; README, "Metrics").

Detection, planning and jobs run in many processes on many machines: beat,
planners and workers on every host. Counters kept in the memory of one
process would see only that process, and ``prometheus_client``'s
multiprocess mode only merges the processes of one machine. The store
already holds every fact the figures need (sessions, jobs and their
attempt logs, instances, worker heartbeats), so :class:`StoreCollector`
derives each figure from it with a few aggregate ``SELECT``\\ s when
Prometheus scrapes: the values are right whichever process did the work,
and one ``serve`` anywhere reports the whole scheduler. Histogram buckets
are counted by the database (``SUM(CASE WHEN value <= bound …)``), so a
scrape reads one row per label set, never one per job. Counters follow the
rows: when ``prune`` deletes old sessions and jobs, or a retried session
leaves its final status, a counter goes down, which Prometheus treats as a
counter reset (``rate()`` and ``increase()`` carry on from the new value).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from scheduler.clock import live_after, utcnow
from scheduler.store.reader import Reader, reader_of
from scheduler.vocabulary import JOB_FINAL_STATUSES, JobStatus, SessionStatus

# Bucket upper bounds, in seconds, for each histogram.
DETECTION_LAG_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PLANNING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CALLBACK_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
JOB_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 21600)

OPEN_SESSION_STATUSES = (SessionStatus.PLANNING, SessionStatus.RUNNING)
OPEN_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


# --------------------------------------------------------------------------
# Dialect-aware SQL pieces


def seconds_between(start: str, end: str, dialect: str) -> str:
    """SQL for the seconds from ``start`` to ``end`` (two time expressions)."""
    if dialect == "postgresql":
        return f"EXTRACT(EPOCH FROM ({end} - {start}))"
    # SQLite keeps times as ISO text; julianday() reads it, in days.
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


def attempt_entries(dialect: str) -> tuple[str, str]:
    """SQL joining each job to the entries of its ``attempt_log``, and the
    expression of an entry's status."""
    if dialect == "postgresql":
        return "CROSS JOIN LATERAL jsonb_array_elements(j.attempt_log) AS e", "e->>'status'"
    return "CROSS JOIN json_each(j.attempt_log) AS e", "json_extract(e.value, '$.status')"


def callback_timings(dialect: str) -> tuple[str, str, str]:
    """SQL joining each session to its trace's ``callback_s`` entries, the
    job name and the seconds of each."""
    if dialect == "postgresql":
        return (
            "CROSS JOIN LATERAL jsonb_each(s.trace->'callback_s') AS c",
            "c.key",
            "(c.value #>> '{}')::float",
        )
    return "CROSS JOIN json_each(s.trace, '$.callback_s') AS c", "c.key", "c.value"


def trace_number(key: str, dialect: str) -> str:
    """SQL for a number at the top of a session's trace."""
    if dialect == "postgresql":
        return f"(s.trace->>'{key}')::float"
    return f"json_extract(s.trace, '$.{key}')"


@dataclass(frozen=True)
class Histogram:
    """What one histogram is made of: a value per row and its labels."""

    name: str
    documentation: str
    labels: Sequence[str]
    buckets: Sequence[float]
    # Columns of ``source`` for each label, and the value's expression.
    columns: Sequence[str]
    value: str
    # FROM … WHERE …: the rows observed.
    source: str


def histogram_sql(histogram: Histogram) -> str:
    """One row per label set: count, sum and a cumulative count per bucket,
    all counted by the database."""
    labels = [f"{column} AS l{n}" for n, column in enumerate(histogram.columns)]
    grouped = [f"l{n}" for n in range(len(histogram.columns))]
    buckets = [
        f"SUM(CASE WHEN v <= {bound!r} THEN 1 ELSE 0 END) AS b{n}"
        for n, bound in enumerate(histogram.buckets)
    ]
    inner = f"SELECT {', '.join([*labels, f'{histogram.value} AS v'])} {histogram.source}"
    group = f" GROUP BY {', '.join(grouped)}" if grouped else ""
    return (
        f"SELECT {', '.join([*grouped, 'COUNT(*) AS n', 'SUM(v) AS total', *buckets])} "
        f"FROM ({inner}) AS observed WHERE v IS NOT NULL{group}"
    )


def histogram_family(histogram: Histogram, rows: list[dict[str, Any]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        histogram.name, histogram.documentation, labels=list(histogram.labels)
    )
    for row in rows:
        buckets: list[tuple[str, float]] = [
            (_bound(bound), float(row[f"b{n}"] or 0)) for n, bound in enumerate(histogram.buckets)
        ]
        buckets.append(("+Inf", float(row["n"])))
        family.add_metric(
            [_label(row[f"l{n}"]) for n in range(len(histogram.labels))],
            buckets,
            float(row["total"] or 0),
        )
    return family


def _bound(bound: float) -> str:
    return repr(float(bound))


def _label(value: Any) -> str:
    return "" if value is None else str(value)


# --------------------------------------------------------------------------
# The histograms


def histograms(dialect: str) -> list[Histogram]:
    finished_jobs = (
        "FROM jobs j WHERE j.finished_at IS NOT NULL "
        "AND j.started_at IS NOT NULL AND j.status IN ('succeeded', 'failed')"
    )
    callback_join, callback_job, callback_seconds = callback_timings(dialect)
    return [
        Histogram(
            "dcm_detection_lag_seconds",
            "From the last instance of a candidate received to its session created by detection.",
            ["level"],
            DETECTION_LAG_BUCKETS,
            ["s.level"],
            seconds_between("i.received_at", "s.created_at", dialect),
            "FROM sessions s JOIN instances i ON i.id = s.last_instance_id WHERE s.trigger = ''",
        ),
        Histogram(
            "dcm_session_planning_delay_seconds",
            "From a session created to its plan stored: the wait for a planner and the planning.",
            ["event"],
            PLANNING_BUCKETS,
            ["s.event"],
            seconds_between("s.created_at", "s.planned_at", dialect),
            "FROM sessions s WHERE s.planned_at IS NOT NULL",
        ),
        Histogram(
            "dcm_session_planning_seconds",
            "Time a planner spent deciding a session's jobs, callbacks included.",
            ["event"],
            PLANNING_BUCKETS,
            ["s.event"],
            trace_number("planning_s", dialect),
            "FROM sessions s WHERE s.planned_at IS NOT NULL",
        ),
        Histogram(
            "dcm_callback_duration_seconds",
            "Time one registry callback took to decide whether its job runs.",
            ["job_name"],
            CALLBACK_BUCKETS,
            [callback_job],
            callback_seconds,
            f"FROM sessions s {callback_join} WHERE s.planned_at IS NOT NULL",
        ),
        Histogram(
            "dcm_job_queue_wait_seconds",
            "From a finished job's last dispatch to its last attempt started.",
            ["job_name", "channel"],
            QUEUE_WAIT_BUCKETS,
            ["j.job_name", "j.channel"],
            seconds_between("j.dispatched_at", "j.started_at", dialect),
            finished_jobs + " AND j.dispatched_at IS NOT NULL",
        ),
        Histogram(
            "dcm_job_duration_seconds",
            "Run time of the last attempt of each succeeded or failed job.",
            ["job_name", "channel"],
            JOB_DURATION_BUCKETS,
            ["j.job_name", "j.channel"],
            seconds_between("j.started_at", "j.finished_at", dialect),
            finished_jobs,
        ),
    ]


# --------------------------------------------------------------------------
# Counters and gauges


def _sessions(reader: Reader) -> Iterator[Metric]:
    rows = reader.rows("SELECT event, status, COUNT(*) AS n FROM sessions GROUP BY event, status")
    created = CounterMetricFamily("dcm_sessions", "Scheduling sessions created.", labels=["event"])
    finished = CounterMetricFamily(
        "dcm_sessions_finished",
        "Scheduling sessions that ended, by final status.",
        labels=["event", "status"],
    )
    open_ = GaugeMetricFamily(
        "dcm_sessions_open",
        "Scheduling sessions planning or running now.",
        labels=["event", "status"],
    )
    per_event: dict[str, int] = defaultdict(int)
    for row in rows:
        per_event[row["event"]] += row["n"]
        family = open_ if row["status"] in OPEN_SESSION_STATUSES else finished
        family.add_metric([row["event"], row["status"]], row["n"])
    for event, count in sorted(per_event.items()):
        created.add_metric([event], count)
    yield from (created, finished, open_)


def _jobs(reader: Reader) -> Iterator[Metric]:
    finished = CounterMetricFamily(
        "dcm_jobs_finished",
        "Jobs that ended, by final status.",
        labels=["service", "job_name", "channel", "status"],
    )
    for row in reader.rows(
        "SELECT service, job_name, channel, status, COUNT(*) AS n FROM jobs "
        "WHERE status IN (:final) GROUP BY service, job_name, channel, status",
        final=sorted(JOB_FINAL_STATUSES),
    ):
        finished.add_metric(
            [row["service"], row["job_name"], row["channel"], row["status"]], row["n"]
        )
    retries = CounterMetricFamily(
        "dcm_job_retries",
        "Attempts beyond each job's first: automatic retries, re-runs after a "
        "lost worker, and operators' retries.",
        labels=["service", "job_name", "channel"],
    )
    for row in reader.rows(
        "SELECT service, job_name, channel, SUM(attempts - 1) AS n FROM jobs "
        "WHERE attempts > 1 GROUP BY service, job_name, channel"
    ):
        retries.add_metric([row["service"], row["job_name"], row["channel"]], row["n"])
    yield from (finished, retries)


def _attempts(reader: Reader) -> Iterator[Metric]:
    join, status = attempt_entries(reader.dialect)
    attempts = CounterMetricFamily(
        "dcm_job_attempts",
        "Ended attempts of jobs, by how they ended: succeeded, failed, "
        "timeout, lost (worker or process died) or cancelled.",
        labels=["service", "job_name", "channel", "status"],
    )
    for row in reader.rows(
        f"SELECT j.service, j.job_name, j.channel, {status} AS status, COUNT(*) AS n "
        f"FROM jobs j {join} WHERE j.attempts > 0 "
        f"GROUP BY j.service, j.job_name, j.channel, {status}"
    ):
        attempts.add_metric(
            [row["service"], row["job_name"], row["channel"], _label(row["status"])], row["n"]
        )
    yield attempts


def _backlog(reader: Reader, heartbeat_interval: float) -> Iterator[Metric]:
    """Jobs waiting and running per channel, and the live workers that
    consume each channel (zero for a channel with work and no worker)."""
    open_rows = reader.rows(
        "SELECT channel, status, CASE WHEN pending_deps > 0 THEN 1 ELSE 0 END AS waiting, "
        "COUNT(*) AS n FROM jobs WHERE status IN (:open) "
        "GROUP BY channel, status, CASE WHEN pending_deps > 0 THEN 1 ELSE 0 END",
        open=list(OPEN_JOB_STATUSES),
    )
    worker_rows = reader.rows("SELECT channels, last_heartbeat FROM workers")
    queued: dict[str, int] = defaultdict(int)
    waiting: dict[str, int] = defaultdict(int)
    running: dict[str, int] = defaultdict(int)
    for row in open_rows:
        if row["status"] == JobStatus.RUNNING:
            running[row["channel"]] += row["n"]
        elif row["waiting"]:
            waiting[row["channel"]] += row["n"]
        else:
            queued[row["channel"]] += row["n"]
    threshold = live_after(heartbeat_interval, utcnow())
    live: dict[str, int] = defaultdict(int)
    for row in worker_rows:
        for channel in row["channels"] or ():
            live[channel] += 1 if row["last_heartbeat"] >= threshold else 0
    channels = sorted({*queued, *waiting, *running, *live})
    figures = (
        ("dcm_jobs_queued", "Jobs ready to run, waiting for a worker of their channel.", queued),
        ("dcm_jobs_waiting", "Queued jobs still waiting for their dependencies.", waiting),
        ("dcm_jobs_running", "Jobs running now.", running),
        ("dcm_workers_live", "Workers with a recent heartbeat consuming the channel.", live),
    )
    for name, documentation, counts in figures:
        family = GaugeMetricFamily(name, documentation, labels=["channel"])
        for channel in channels:
            family.add_metric([channel], counts.get(channel, 0))
        yield family


def _instances(reader: Reader) -> Iterator[Metric]:
    [row] = reader.rows("SELECT COUNT(*) AS n FROM instances")
    yield CounterMetricFamily(
        "dcm_instances_ingested", "DICOM instances recorded in the store.", value=row["n"]
    )


# --------------------------------------------------------------------------
# The collector


def collect_from(reader: Reader, heartbeat_interval: float) -> Iterator[Metric]:
    """Every figure of the store that ``reader`` reads."""
    started = time.perf_counter()
    yield from _instances(reader)
    yield from _sessions(reader)
    yield from _jobs(reader)
    yield from _attempts(reader)
    yield from _backlog(reader, heartbeat_interval)
    for histogram in histograms(reader.dialect):
        yield histogram_family(histogram, reader.rows(histogram_sql(histogram)))
    yield GaugeMetricFamily(
        "dcm_metrics_collect_seconds",
        "Time this scrape spent reading the store.",
        value=time.perf_counter() - started,
    )


@contextmanager
def store_reader() -> Iterator[Reader]:
    """A reader of the configured store, in one read transaction."""
    from scheduler.store.db import transaction

    with transaction() as db:
        yield reader_of(db)


class StoreCollector(Collector):
    """A collector reading every figure from the store at each scrape.

    ``open_reader`` gives a reader for one scrape (the configured store by
    default); ``heartbeat_interval`` decides when a worker is live
    (``DCM_HEARTBEAT_INTERVAL`` by default)."""

    def __init__(
        self,
        open_reader: Callable[[], AbstractContextManager[Reader]] = store_reader,
        heartbeat_interval: float | None = None,
    ) -> None:
        self.open_reader = open_reader
        self.heartbeat_interval = heartbeat_interval

    def collect(self) -> Iterator[Metric]:
        interval = self.heartbeat_interval
        if interval is None:
            from scheduler.config import get_settings

            interval = get_settings().heartbeat_interval
        with self.open_reader() as reader:
            # Read everything before the first family leaves: one transaction.
            families = list(collect_from(reader, interval))
        yield from families

    def describe(self) -> Iterator[Metric]:
        # Registering must not read the store.
        return iter(())
