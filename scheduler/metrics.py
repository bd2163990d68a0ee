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
scrape reads one row per label set, never one per job.

Counters and histograms never go down for a ``prune``: in the transaction
that deletes a page of sessions, :func:`carried_samples` computes what those
sessions add to every counter and histogram sample, by the very queries a
scrape runs, and ``prune`` adds it to the ``metric_carry`` table (and the
instances it deletes to ``dcm_instances_ingested_total``); each scrape adds
that table to what the rows still give (:func:`with_carry`), in one
snapshot of the store. A ``retry`` that re-opens a finished session still
lowers the finished counts, and the queue-wait and duration histograms of
the jobs it re-runs, which Prometheus reads as a counter reset (README,
"Metrics", says how to read it).

Sessions and the waits of their jobs carry ``urgent`` and ``origin`` (live
or cohort) labels, so urgent and routine work, and live and cohort work,
are charted apart (README, "Urgent studies first", "Cohort runs"); whether
an off-peak window is open is decided in Python, at the collector's
``now``, once per distinct window (README, "Off-peak windows").
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from itertools import chain
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from scheduler.clock import live_after, utcnow
from scheduler.store.reader import Reader, reader_of
from scheduler.vocabulary import (
    JOB_FINAL_STATUSES,
    OPEN_JOB_STATUSES,
    OPEN_SESSION_STATUSES,
    JobStatus,
)
from scheduler.windows import window_open

# Bucket upper bounds, in seconds, for each histogram.
DETECTION_LAG_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PLANNING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CALLBACK_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
JOB_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 21600)

# "true"/"false" for a session's urgent flag, and "live"/"cohort" for where
# it came from: the labels that split sessions and job waits.
URGENT = "CASE WHEN s.urgent THEN 'true' ELSE 'false' END"
ORIGIN = "CASE WHEN s.cohort IS NULL THEN 'live' ELSE 'cohort' END"

# The families that only grow: their samples are carried across a prune.
MONOTONIC = ("counter", "histogram")
# A sample and its labels, as a key of ``metric_carry``.
SampleKey = tuple[str, str]


# --------------------------------------------------------------------------
# Dialect-aware SQL pieces


def seconds_between(start: str, end: str, dialect: str) -> str:
    """SQL for the seconds from ``start`` to ``end`` (two time expressions)."""
    if dialect == "postgresql":
        # date_part answers a double; EXTRACT a numeric, much slower to add up.
        return f"date_part('epoch', {end} - {start})"
    # SQLite keeps times as ISO text; julianday() reads it, in days.
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


def attempt_entries(dialect: str) -> tuple[str, str]:
    """SQL joining each job to the entries of its ``attempt_log``, and the
    expression of an entry's status."""
    # A log that is not a list (written by hand, say) counts as empty, not as an error.
    if dialect == "postgresql":
        log = "CASE WHEN jsonb_typeof(j.attempt_log) = 'array' THEN j.attempt_log END"
        return f"CROSS JOIN LATERAL jsonb_array_elements({log}) AS e", "e->>'status'"
    log = "CASE WHEN json_type(j.attempt_log) = 'array' THEN j.attempt_log END"
    return f"CROSS JOIN json_each({log}) AS e", "json_extract(e.value, '$.status')"


def callback_timings(dialect: str) -> tuple[str, str, str]:
    """SQL joining each session to its trace's ``callback_s`` entries, the
    job name and the seconds of each."""
    if dialect == "postgresql":
        timings = (
            "CASE WHEN jsonb_typeof(s.trace->'callback_s') = 'object' "
            "THEN s.trace->'callback_s' END"
        )
        return (
            f"CROSS JOIN LATERAL jsonb_each({timings}) AS c",
            "c.key",
            "CASE WHEN jsonb_typeof(c.value) = 'number' THEN (c.value #>> '{}')::float END",
        )
    timings = "CASE WHEN json_type(s.trace, '$.callback_s') = 'object' THEN s.trace END"
    return (
        f"CROSS JOIN json_each({timings}, '$.callback_s') AS c",
        "c.key",
        "CASE WHEN c.type IN ('integer', 'real') THEN c.value END",
    )


def trace_number(key: str, dialect: str) -> str:
    """SQL for a number at the top of a session's trace."""
    if dialect == "postgresql":
        return f"(s.trace->>'{key}')::float"
    return f"json_extract(s.trace, '$.{key}')"


def fenced(subquery: str, dialect: str) -> str:
    """``subquery`` kept from being merged into the query around it, so each
    value it computes is computed once per row, not once per use."""
    return f"{subquery} OFFSET 0" if dialect == "postgresql" else f"{subquery} LIMIT -1"


@dataclass(frozen=True)
class Histogram:
    """One histogram of a :class:`Scan`: a value per row, observed for the
    rows whose scan labels match ``where``, reported by ``labels``."""

    name: str
    documentation: str
    labels: Sequence[str]
    buckets: Sequence[float]
    value: str
    where: Mapping[str, Collection[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Scan:
    """One pass over a table: rows grouped by ``labels`` (SQL ``columns``),
    with a row count, ``sums`` and every histogram's count, sum and bucket
    counts computed by the database for each group."""

    labels: Sequence[str]
    columns: Sequence[str]
    source: str
    histograms: Sequence[Histogram] = ()
    sums: Mapping[str, str] = field(default_factory=dict)

    def sql(self, dialect: str, where: str = "") -> str:
        """The grouped query; ``where`` (SQL) keeps only some rows."""
        inner = [f"{column} AS l{n}" for n, column in enumerate(self.columns)]
        inner += [f"{value} AS s_{name}" for name, value in self.sums.items()]
        inner += [f"{h.value} AS v{n}" for n, h in enumerate(self.histograms)]
        grouped = [f"l{n}" for n in range(len(self.columns))]
        outer = [*grouped, "COUNT(*) AS n"]
        outer += [f"SUM(s_{name}) AS {name}" for name in self.sums]
        for n, histogram in enumerate(self.histograms):
            outer += [f"COUNT(v{n}) AS h{n}_n", f"SUM(v{n}) AS h{n}_sum"]
            outer += [
                f"SUM(CASE WHEN v{n} <= {bound!r} THEN 1 ELSE 0 END) AS h{n}_b{b}"
                for b, bound in enumerate(histogram.buckets)
            ]
        condition = f" WHERE {where}" if where else ""
        rows = fenced(f"SELECT {', '.join(inner)} {self.source}{condition}", dialect)
        group = f" GROUP BY {', '.join(grouped)}" if grouped else ""
        return f"SELECT {', '.join(outer)} FROM ({rows}) AS scanned{group}"

    def read(self, reader: Reader, where: str = "", **params: Any) -> list[dict[str, Any]]:
        """The groups, with their labels by name; ``where`` and ``params``
        keep only some rows."""
        rows = reader.rows(self.sql(reader.dialect, where), **params)
        for row in rows:
            row.update({label: _label(row[f"l{n}"]) for n, label in enumerate(self.labels)})
        return rows

    def family(self, n: int, rows: list[dict[str, Any]]) -> HistogramMetricFamily:
        """Histogram ``n`` of the scan, its groups added up by its own labels."""
        histogram = self.histograms[n]
        merged: dict[tuple[str, ...], list[float]] = {}
        for row in rows:
            if any(row[label] not in allowed for label, allowed in histogram.where.items()):
                continue
            key = tuple(row[label] for label in histogram.labels)
            figures = [row[f"h{n}_n"], row[f"h{n}_sum"]]
            figures += [row[f"h{n}_b{b}"] for b in range(len(histogram.buckets))]
            total = merged.setdefault(key, [0.0] * len(figures))
            for index, figure in enumerate(figures):
                total[index] += float(figure or 0)
        family = HistogramMetricFamily(
            histogram.name, histogram.documentation, labels=list(histogram.labels)
        )
        for key, (count, seconds, *cumulative) in sorted(merged.items()):
            if not count:
                continue
            buckets = [(_bound(b), c) for b, c in zip(histogram.buckets, cumulative, strict=True)]
            family.add_metric(list(key), [*buckets, ("+Inf", count)], seconds)
        return family


def _bound(bound: float) -> str:
    return repr(float(bound))


def _label(value: Any) -> str:
    return "" if value is None else str(value)


def _of_sessions(column: str, sessions: Sequence[str] | None) -> str:
    """SQL keeping the rows of ``sessions`` (``column`` holds the session
    id), with a ``:sessions`` parameter; empty for every row (None)."""
    return "" if sessions is None else f"{column} IN (:sessions)"


# --------------------------------------------------------------------------
# Sessions


def sessions_scan(dialect: str) -> Scan:
    return Scan(
        ["event", "level", "status", "detected", "urgent", "cohort"],
        [
            "s.event",
            "s.level",
            "s.status",
            "CASE WHEN s.trigger = '' THEN 1 ELSE 0 END",
            URGENT,
            # The cohort's name: cohorts are few, so the groups stay few.
            "s.cohort",
        ],
        "FROM sessions s LEFT JOIN instances i ON i.id = s.last_instance_id",
        [
            Histogram(
                "dcm_detection_lag_seconds",
                "From the last instance of a candidate received to its session "
                "created by detection.",
                ["level", "urgent"],
                DETECTION_LAG_BUCKETS,
                seconds_between("i.received_at", "s.created_at", dialect),
                {"detected": ["1"]},
            ),
            Histogram(
                "dcm_session_planning_delay_seconds",
                "From a session created to its plan stored: the wait for a "
                "planner and the planning.",
                ["event", "origin"],
                PLANNING_BUCKETS,
                seconds_between("s.created_at", "s.planned_at", dialect),
            ),
            Histogram(
                "dcm_session_planning_seconds",
                "Time a planner spent deciding a session's jobs, callbacks included.",
                ["event"],
                PLANNING_BUCKETS,
                trace_number("planning_s", dialect),
            ),
        ],
    )


def callbacks_scan(dialect: str) -> Scan:
    join, job_name, seconds = callback_timings(dialect)
    return Scan(
        ["job_name"],
        [job_name],
        f"FROM sessions s {join}",
        [
            Histogram(
                "dcm_callback_duration_seconds",
                "Time one registry callback took to decide whether its job runs.",
                ["job_name"],
                CALLBACK_BUCKETS,
                seconds,
            )
        ],
    )


def _sessions(reader: Reader, sessions: Sequence[str] | None = None) -> Iterator[Metric]:
    """The figures of every session, or of ``sessions`` only."""
    where = _of_sessions("s.id", sessions)
    scan = sessions_scan(reader.dialect)
    rows = scan.read(reader, where, sessions=sessions)
    kinds = ["urgent", "origin"]
    created = CounterMetricFamily(
        "dcm_sessions", "Scheduling sessions created.", labels=["event", *kinds]
    )
    finished = CounterMetricFamily(
        "dcm_sessions_finished",
        "Scheduling sessions that ended, by final status.",
        labels=["event", "status", *kinds],
    )
    open_ = GaugeMetricFamily(
        "dcm_sessions_open",
        "Scheduling sessions planning or running now.",
        labels=["event", "status", *kinds],
    )
    cohorts = GaugeMetricFamily(
        "dcm_cohort_sessions",
        "Sessions of each cohort run in the store, by status.",
        labels=["cohort", "status"],
    )
    per_event: dict[tuple[str, ...], int] = defaultdict(int)
    per_status: dict[tuple[str, ...], int] = defaultdict(int)
    per_cohort: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        row["origin"] = "cohort" if row["cohort"] else "live"
        per_event[row["event"], row["urgent"], row["origin"]] += row["n"]
        per_status[row["event"], row["status"], row["urgent"], row["origin"]] += row["n"]
        if row["cohort"]:
            per_cohort[row["cohort"], row["status"]] += row["n"]
    for key, count in sorted(per_event.items()):
        created.add_metric(list(key), count)
    for key, count in sorted(per_status.items()):
        family = open_ if key[1] in OPEN_SESSION_STATUSES else finished
        family.add_metric(list(key), count)
    for key, count in sorted(per_cohort.items()):
        cohorts.add_metric(list(key), count)
    yield from (created, finished, open_, cohorts)
    for n in range(len(scan.histograms)):
        yield scan.family(n, rows)
    callbacks = callbacks_scan(reader.dialect)
    yield callbacks.family(0, callbacks.read(reader, where, sessions=sessions))


# --------------------------------------------------------------------------
# Jobs


def jobs_scan(dialect: str) -> Scan:
    ran = {"status": [JobStatus.SUCCEEDED, JobStatus.FAILED]}
    return Scan(
        ["service", "job_name", "channel", "status", "urgent", "origin"],
        ["j.service", "j.job_name", "j.channel", "j.status", URGENT, ORIGIN],
        "FROM jobs j JOIN sessions s ON s.id = j.session_id",
        [
            Histogram(
                "dcm_job_queue_wait_seconds",
                "From a finished job's last dispatch to its last attempt started.",
                ["job_name", "channel", "urgent", "origin"],
                QUEUE_WAIT_BUCKETS,
                seconds_between("j.dispatched_at", "j.started_at", dialect),
                ran,
            ),
            Histogram(
                "dcm_job_duration_seconds",
                "Run time of the last attempt of each succeeded or failed job.",
                ["job_name", "channel"],
                JOB_DURATION_BUCKETS,
                seconds_between("j.started_at", "j.finished_at", dialect),
                ran,
            ),
        ],
        {"retries": "CASE WHEN j.attempts > 1 THEN j.attempts - 1 ELSE 0 END"},
    )


def _jobs(reader: Reader, sessions: Sequence[str] | None = None) -> Iterator[Metric]:
    """The figures of every job, or of the jobs of ``sessions`` only."""
    scan = jobs_scan(reader.dialect)
    rows = scan.read(reader, _of_sessions("s.id", sessions), sessions=sessions)
    finished = CounterMetricFamily(
        "dcm_jobs_finished",
        "Jobs that ended, by final status.",
        labels=["service", "job_name", "channel", "status"],
    )
    retries = CounterMetricFamily(
        "dcm_job_retries",
        "Attempts beyond each job's first: automatic retries, re-runs after a "
        "lost worker, and operators' retries.",
        labels=["service", "job_name", "channel"],
    )
    per_job: dict[tuple[str, str, str], int] = defaultdict(int)
    per_status: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for row in rows:
        key = (row["service"], row["job_name"], row["channel"])
        per_job[key] += int(row["retries"] or 0)
        if row["status"] in JOB_FINAL_STATUSES:
            per_status[(*key, row["status"])] += row["n"]
    for status_key, count in sorted(per_status.items()):
        finished.add_metric(list(status_key), count)
    for key, count in sorted(per_job.items()):
        if count:
            retries.add_metric(list(key), count)
    yield from (finished, retries)
    for n in range(len(scan.histograms)):
        yield scan.family(n, rows)


def _attempts(reader: Reader, sessions: Sequence[str] | None = None) -> Iterator[Metric]:
    """The ended attempts of every job, or of the jobs of ``sessions`` only."""
    join, status = attempt_entries(reader.dialect)
    where = _of_sessions("j.session_id", sessions)
    attempts = CounterMetricFamily(
        "dcm_job_attempts",
        "Ended attempts of jobs, by how they ended: succeeded, failed, "
        "timeout, lost (worker or process died) or cancelled.",
        labels=["service", "job_name", "channel", "status"],
    )
    for row in reader.rows(
        f"SELECT j.service, j.job_name, j.channel, {status} AS status, COUNT(*) AS n "
        f"FROM jobs j {join} WHERE j.attempts > 0{' AND ' + where if where else ''} "
        f"GROUP BY j.service, j.job_name, j.channel, {status}",
        sessions=sessions,
    ):
        attempts.add_metric(
            [row["service"], row["job_name"], row["channel"], _label(row["status"])], row["n"]
        )
    yield attempts


# A queued job's off-peak window, when the job is ready, not yet sent and
# of a normal session (urgent sessions ignore windows): the jobs a closed
# window holds back (README, "Off-peak windows").
HELD_WINDOW = (
    "CASE WHEN s.urgent THEN NULL "
    "WHEN j.status = 'queued' AND j.pending_deps = 0 AND j.dispatched_at IS NULL "
    'THEN j."window" END'
)


def _backlog(
    reader: Reader, heartbeat_interval: float, now: datetime, zone: tzinfo | None
) -> Iterator[Metric]:
    """Jobs waiting and running per channel, the live workers that consume
    each channel (zero for a channel with work and no worker), the paused
    channels, and the jobs a closed off-peak window holds back at ``now``
    (on ``zone``'s clock)."""
    waits = "CASE WHEN j.pending_deps > 0 THEN 1 ELSE 0 END"
    open_rows = reader.rows(
        f"SELECT j.channel, j.status, {waits} AS waiting, {HELD_WINDOW} AS held, "
        "COUNT(*) AS n FROM jobs j JOIN sessions s ON s.id = j.session_id "
        f"WHERE j.status IN (:open) GROUP BY j.channel, j.status, {waits}, {HELD_WINDOW}",
        open=list(OPEN_JOB_STATUSES),
    )
    worker_rows = reader.rows("SELECT channels, last_heartbeat FROM workers")
    paused = {row["channel"] for row in reader.rows("SELECT channel FROM paused_channels")}
    queued: dict[str, int] = defaultdict(int)
    waiting: dict[str, int] = defaultdict(int)
    running: dict[str, int] = defaultdict(int)
    held: dict[str, int] = defaultdict(int)
    # One row per (channel, window): each window is read once per scrape.
    opened: dict[str, bool] = {}
    for row in open_rows:
        if row["status"] == JobStatus.RUNNING:
            running[row["channel"]] += row["n"]
        elif row["waiting"]:
            waiting[row["channel"]] += row["n"]
        else:
            queued[row["channel"]] += row["n"]
        window = row["held"]
        if window:
            if window not in opened:
                opened[window] = window_open(window, now, zone)
            if not opened[window]:
                held[row["channel"]] += row["n"]
    threshold = live_after(heartbeat_interval, now)
    live: dict[str, int] = defaultdict(int)
    for row in worker_rows:
        for channel in row["channels"] or ():
            live[channel] += 1 if row["last_heartbeat"] >= threshold else 0
    channels = sorted({*queued, *waiting, *running, *live, *paused})
    figures = (
        ("dcm_jobs_queued", "Jobs ready to run, waiting for a worker of their channel.", queued),
        ("dcm_jobs_waiting", "Queued jobs still waiting for their dependencies.", waiting),
        ("dcm_jobs_running", "Jobs running now.", running),
        ("dcm_workers_live", "Workers with a recent heartbeat consuming the channel.", live),
        (
            "dcm_jobs_waiting_window",
            "Queued jobs ready and unsent whose off-peak window is closed now.",
            held,
        ),
        (
            "dcm_channel_paused",
            "1 while an operator has paused the channel, else 0.",
            dict.fromkeys(paused, 1),
        ),
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
# What prune carries


INSTANCES_SAMPLE = "dcm_instances_ingested_total"


def labels_key(labels: Mapping[str, str]) -> str:
    """A sample's labels as the JSON ``metric_carry`` keeps, keys sorted."""
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))


def _session_figures(reader: Reader, sessions: Sequence[str] | None = None) -> Iterator[Metric]:
    """The figures that follow the rows of sessions and their jobs."""
    yield from _sessions(reader, sessions)
    yield from _jobs(reader, sessions)
    yield from _attempts(reader, sessions)


def carried_samples(reader: Reader, sessions: Sequence[str]) -> dict[SampleKey, float]:
    """What ``sessions`` (and their jobs) add to every counter and histogram
    sample of a scrape, by sample name and labels (:func:`labels_key`): what
    ``prune`` carries before it deletes them."""
    found: dict[SampleKey, float] = defaultdict(float)
    if not sessions:
        return found
    for family in _session_figures(reader, sessions):
        if family.type in MONOTONIC:
            for sample in family.samples:
                found[sample.name, labels_key(sample.labels)] += sample.value
    return dict(found)


def read_carry(reader: Reader) -> dict[SampleKey, float]:
    """The samples ``prune`` carried so far."""
    rows = reader.rows("SELECT sample, labels, value FROM metric_carry")
    return {(row["sample"], row["labels"]): float(row["value"]) for row in rows}


def _bucket_order(bound: str) -> float:
    return float("inf") if bound == "+Inf" else float(bound)


def with_carry(family: Metric, carry: Mapping[SampleKey, float]) -> Metric:
    """``family`` with the carried samples added: to the sample of the same
    name and labels, or as a new one for labels no row has any more. A
    histogram's buckets stay cumulative (counts add up bound by bound) and
    its ``_count`` is its ``+Inf`` bucket."""
    if family.type not in MONOTONIC:
        return family
    if carry:
        _add_carry(family, carry)
    if family.type == "histogram":
        # Sums of microsecond timings: the carried part plus what rows remain
        # is not bit for bit the sum of all rows, and a last-digit dip would
        # read as a counter reset.
        family.samples = [
            sample._replace(value=round(sample.value, 6))
            if sample.name.endswith("_sum")
            else sample
            for sample in family.samples
        ]
    return family


def _add_carry(family: Metric, carry: Mapping[SampleKey, float]) -> None:
    names = (
        [f"{family.name}_total"]
        if family.type == "counter"
        else [f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum")]
    )
    merged: dict[SampleKey, float] = {
        (sample.name, labels_key(sample.labels)): sample.value for sample in family.samples
    }
    for (name, labels), value in sorted(carry.items()):
        if name in names:
            merged[name, labels] = merged.get((name, labels), 0.0) + value
    if family.type == "counter":
        family.samples = _counter_samples(merged)
    else:
        family.samples = _histogram_samples(family.name, merged)


def _counter_samples(merged: Mapping[SampleKey, float]) -> list[Sample]:
    return [Sample(name, json.loads(labels), value) for (name, labels), value in merged.items()]


def _histogram_samples(name: str, merged: Mapping[SampleKey, float]) -> list[Sample]:
    """Each label set's buckets by bound, then its count and sum."""
    groups: dict[str, dict[str, Any]] = {}
    for (sample, labels), value in merged.items():
        decoded = json.loads(labels)
        bound = decoded.pop("le", None)
        group = groups.setdefault(labels_key(decoded), {"buckets": {}, "sum": 0.0})
        if sample == f"{name}_bucket" and bound is not None:
            group["buckets"][bound] = value
        elif sample == f"{name}_sum":
            group["sum"] = value
    samples: list[Sample] = []
    for labels, group in groups.items():
        base = json.loads(labels)
        buckets: dict[str, float] = group["buckets"]
        for bound in sorted(buckets, key=_bucket_order):
            samples.append(Sample(f"{name}_bucket", {**base, "le": bound}, buckets[bound]))
        samples.append(Sample(f"{name}_count", base, buckets.get("+Inf", 0.0)))
        samples.append(Sample(f"{name}_sum", base, group["sum"]))
    return samples


# --------------------------------------------------------------------------
# The collector


def collect_from(
    reader: Reader,
    heartbeat_interval: float,
    now: datetime | None = None,
    zone: tzinfo | None = None,
) -> Iterator[Metric]:
    """Every figure of the store that ``reader`` reads, at ``now`` (the
    current time by default), with off-peak windows on ``zone``'s clock
    (None: the machine's local zone, as ``DCM_TIMEZONE`` unset)."""
    started = time.perf_counter()
    carry = read_carry(reader)
    for family in chain(_instances(reader), _session_figures(reader)):
        yield with_carry(family, carry)
    yield from _backlog(reader, heartbeat_interval, now or utcnow(), zone)
    yield GaugeMetricFamily(
        "dcm_metrics_collect_seconds",
        "Time this scrape spent reading the store.",
        value=time.perf_counter() - started,
    )


@contextmanager
def store_reader() -> Iterator[Reader]:
    """A reader of the configured store, in one read transaction: one
    snapshot, so a prune committing mid-scrape is seen whole or not at all
    (never its sessions both in the rows and in what it carried)."""
    from scheduler.store.db import dialect_name, transaction

    with transaction() as db:
        if dialect_name(db) == "postgresql":
            db.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield reader_of(db)


class StoreCollector(Collector):
    """A collector reading every figure from the store at each scrape.

    ``open_reader`` gives a reader for one scrape (the configured store by
    default); ``heartbeat_interval`` decides when a worker is live
    (``DCM_HEARTBEAT_INTERVAL`` by default); ``clock`` tells the time of a
    scrape, which decides the live workers and the open off-peak windows
    (``DCM_TIMEZONE``'s clock)."""

    def __init__(
        self,
        open_reader: Callable[[], AbstractContextManager[Reader]] = store_reader,
        heartbeat_interval: float | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.open_reader = open_reader
        self.heartbeat_interval = heartbeat_interval
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        from scheduler.config import get_settings

        settings = get_settings()
        interval = self.heartbeat_interval
        if interval is None:
            interval = settings.heartbeat_interval
        with self.open_reader() as reader:
            # Read everything before the first family leaves: one transaction.
            families = list(collect_from(reader, interval, self.clock(), settings.timezone))
        yield from families

    def describe(self) -> Iterator[Metric]:
        # Registering must not read the store.
        return iter(())
