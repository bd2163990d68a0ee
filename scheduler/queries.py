"""Read models of sessions, jobs and workers: the stable JSON shapes of
README, "Commands".

The CLI's ``--json`` output and the HTTP API both come from here, so the
documents are the same wherever an operator or a script reads them. Times
are ISO 8601 UTC. The queries are plain SQL run by a
:class:`~scheduler.store.reader.Reader`, so a reading command needs neither
the ORM nor SQLAlchemy; callers that hold a SQLAlchemy session pass it as it
is.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from scheduler.clock import iso, live_after, utcnow
from scheduler.store.reader import reader_of
from scheduler.vocabulary import Phase
from scheduler.windows import waiting_for


class NotFoundError(LookupError):
    """No session or job with that id."""


def duration(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


SESSION_COLUMNS = (
    "id, event, level, uid, revision, fingerprint, trigger, status, error, "
    "created_at, planned_at, finished_at, urgent, cohort"
)
JOB_COLUMNS = (
    "id, session_id, job_name, service, service_version, service_hash, phase, channel, "
    "priority, status, attempts, max_attempts, params, result, error, attempt_log, worker, "
    'created_at, dispatched_at, started_at, finished_at, jobs."window", '
    # What a queued job waits for (README, "Off-peak windows", "Pausing a channel").
    "(SELECT urgent FROM sessions WHERE sessions.id = jobs.session_id) AS session_urgent, "
    "(SELECT reason FROM paused_channels WHERE paused_channels.channel = jobs.channel) "
    "AS paused_reason, "
    "EXISTS (SELECT 1 FROM paused_channels WHERE paused_channels.channel = jobs.channel) "
    "AS channel_paused"
)


def json_text(document: Any) -> str:
    """A listing or document as ``--json`` prints it."""
    return json.dumps(document, indent=2, default=str) + "\n"


def session_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "event": row["event"],
        "level": row["level"],
        "uid": row["uid"],
        "revision": row["revision"],
        "fingerprint": row["fingerprint"],
        "trigger": row["trigger"] or None,
        "status": row["status"],
        "error": row["error"],
        "created_at": iso(row["created_at"]),
        "planned_at": iso(row["planned_at"]),
        "finished_at": iso(row["finished_at"]),
        # README, "Urgent studies first" and "Cohort runs".
        "urgent": bool(row["urgent"]),
        "cohort": row["cohort"],
    }


def job_json(
    row: Mapping[str, Any], dependencies: Sequence[Mapping[str, str]] = ()
) -> dict[str, Any]:
    """A job's document; ``dependencies`` as :func:`dependencies_of` gives them."""
    return {
        "id": row["id"],
        "session_id": row["session_id"],
        "job_name": row["job_name"],
        "service": row["service"],
        "service_version": row["service_version"],
        "service_hash": row["service_hash"],
        "phase": row["phase"],
        "channel": row["channel"],
        "priority": row["priority"],
        "status": row["status"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "depends_on": [d["job_name"] for d in dependencies],
        "dependencies": [dict(d) for d in dependencies],
        "params": row["params"],
        "result": row["result"],
        "error": row["error"],
        "attempt_log": [_attempt_entry(entry) for entry in row["attempt_log"] or ()],
        "worker": row["worker"],
        "created_at": iso(row["created_at"]),
        "dispatched_at": iso(row["dispatched_at"]),
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
        "duration_s": duration(row["started_at"], row["finished_at"]),
        **ran_in(row["attempt_log"] or ()),
        "window": row["window"],
        "waiting": waiting(row),
    }


def waiting(row: Mapping[str, Any], now: datetime | None = None) -> str | None:
    """What holds a queued job back from being sent, in words: its paused
    channel, or its off-peak window while closed (urgent sessions ignore
    windows); None when nothing does."""
    if row["status"] != "queued":
        return None
    if row["channel_paused"]:
        reason = f" ({row['paused_reason']})" if row["paused_reason"] else ""
        return f"channel {row['channel']} paused{reason}"
    if not row["window"] or row["session_urgent"]:
        return None
    from scheduler.config import get_settings

    return waiting_for(row["window"], now or utcnow(), get_settings().timezone)


def ran_in(attempt_log: Sequence[dict[str, Any]]) -> dict[str, str | None]:
    """The interpreter and output folder of the job's latest attempt that
    recorded them (attempts run by earlier versions did not)."""
    where: dict[str, str | None] = {"interpreter": None, "output_dir": None}
    for entry in reversed(attempt_log):
        if entry.get("output_dir"):
            where["interpreter"] = entry.get("python")
            where["output_dir"] = entry["output_dir"]
            break
    return where


def _attempt_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """An attempt-log entry with its times in the one ISO form (entries
    written by earlier versions end in ``+00:00``)."""
    return {
        key: value.replace("+00:00", "Z")
        if key.endswith("_at") and isinstance(value, str)
        else value
        for key, value in entry.items()
    }


def dependencies_of(source: Any, job_ids: Sequence[str]) -> dict[str, list[dict[str, str]]]:
    """job id → the jobs it depends on, each ``{"job_name", "kind"}``.

    ``kind`` is ``implicit`` for an edge the phase rules add (README,
    "Writing a service": a main job needs every pre job, a post job waits
    for every pre and main job to end) and ``declared`` for the job's own
    ``dependsOn``. A main job that also declares a pre job it needs anyway
    shows that edge as ``implicit``: the store keeps one edge, which means
    the same either way.
    """
    if not job_ids:
        return {}
    rows = reader_of(source).rows(
        "SELECT d.job_id, d.requires_success, j.phase, u.job_name, u.phase AS upstream_phase "
        "FROM job_dependencies d JOIN jobs u ON u.id = d.depends_on_id "
        "JOIN jobs j ON j.id = d.job_id "
        "WHERE d.job_id IN (:ids) ORDER BY u.created_seq",
        ids=list(job_ids),
    )
    found: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        implicit = not row["requires_success"] or (
            row["phase"] == Phase.MAIN and row["upstream_phase"] == Phase.PRE
        )
        kind = "implicit" if implicit else "declared"
        found[row["job_id"]].append({"job_name": row["job_name"], "kind": kind})
    return found


def list_sessions(
    source: Any,
    *,
    status: str | None = None,
    uid: str | None = None,
    event: str | None = None,
    since: datetime | None = None,
    q: str | None = None,
    cohort: str | None = None,
    urgent: bool | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Sessions, newest first (``sessions --json``). ``source``: a reader or
    a SQLAlchemy session. ``q`` finds sessions by a part of their UID, or of
    the patient ID or name, study UID, description or accession number of
    the data they are about (case-insensitive); ``cohort`` keeps a cohort
    run's sessions, ``urgent`` the urgent (True) or the other (False) ones."""
    where, params = _filters(status=status, uid=uid, event=event, cohort=cohort)
    if urgent is not None:
        where.append("urgent = :urgent")
        params["urgent"] = urgent
    if since:
        where.append("created_at >= :since")
        params["since"] = _bindable_time(since, source)
    if q and q.strip():
        where.append(_matching_data(reader_of(source).dialect))
        params["q"] = "%" + _escape_like(q.strip().lower()) + "%"
    rows = reader_of(source).rows(
        f"SELECT {SESSION_COLUMNS} FROM sessions{_where(where)} "
        "ORDER BY created_at DESC LIMIT :limit OFFSET :offset",
        limit=limit,
        offset=offset,
        **params,
    )
    return [session_json(row) for row in rows]


def list_jobs(
    source: Any,
    *,
    session_id: str | None = None,
    status: str | None = None,
    job_name: str | None = None,
    service: str | None = None,
    version: str | None = None,
    limit: int = 500,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Jobs: a session's in the order they were planned, or all, newest first.
    ``service`` and ``version`` find what one version of a service ran (and
    where its outputs are) when that version is recalled."""
    reader = reader_of(source)
    where, params = _filters(
        session_id=session_id,
        status=status,
        job_name=job_name,
        service=service,
        service_version=version,
    )
    order = "created_seq" if session_id else "created_at DESC, created_seq"
    rows = reader.rows(
        f"SELECT {JOB_COLUMNS} FROM jobs{_where(where)} "
        f"ORDER BY {order} LIMIT :limit OFFSET :offset",
        limit=limit,
        offset=offset,
        **params,
    )
    deps = dependencies_of(reader, [row["id"] for row in rows])
    return [job_json(row, deps.get(row["id"], ())) for row in rows]


def service_versions(source: Any, service: str) -> list[str]:
    """The versions of ``service`` that have jobs, in the order first planned."""
    rows = reader_of(source).rows(
        "SELECT service_version, MIN(created_at) AS first FROM jobs WHERE service = :service "
        "GROUP BY service_version ORDER BY first",
        service=service,
    )
    return [row["service_version"] for row in rows]


def get_job(source: Any, job_id: str) -> dict[str, Any]:
    """One job's document (``GET /api/jobs/ID``)."""
    reader = reader_of(source)
    rows = reader.rows(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id", id=job_id)
    if not rows:
        raise NotFoundError(f"no job {job_id!r}")
    return job_json(rows[0], dependencies_of(reader, [job_id]).get(job_id, ()))


def show_session(source: Any, session_id: str) -> dict[str, Any]:
    """The session with its ``trace`` and ``jobs`` (``show --json``)."""
    reader = reader_of(source)
    full = resolve_session_id(reader, session_id)
    [row] = reader.rows(
        f"SELECT {SESSION_COLUMNS}, trace, added_params FROM sessions WHERE id = :id", id=full
    )
    document = session_json(row)
    document["trace"] = row["trace"]
    document["added_params"] = row["added_params"]
    document["jobs"] = list_jobs(reader, session_id=full)
    return document


def resolve_session_id(source: Any, given: str) -> str:
    """The full id of a session given by id or by a unique prefix (operators
    paste the short ids the tables print)."""
    reader = reader_of(source)
    if reader.rows("SELECT id FROM sessions WHERE id = :id", id=given):
        return given
    if len(given) < 4:
        raise NotFoundError(
            f"no session {given!r} (give the full id, or at least its first 4 characters)"
        )
    prefix = _escape_like(given) + "%"
    ids = [
        row["id"]
        for row in reader.rows(
            "SELECT id FROM sessions WHERE id LIKE :prefix ESCAPE '\\' LIMIT 2", prefix=prefix
        )
    ]
    if len(ids) != 1:
        raise NotFoundError(
            f"no session {given!r}" if not ids else f"session id {given!r} is ambiguous"
        )
    return str(ids[0])


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _matching_data(dialect: str) -> str:
    """The condition of ``list_sessions(q=…)``: the session's UID, or the
    patient, study or series it is about, matches ``:q`` (a ``LIKE`` pattern
    in lower case). A patient's session matches its studies' fields too."""

    def tag(table: str, name: str) -> str:
        if dialect == "postgresql":
            return f"{table}.tags->>'{name}'"
        return f"json_extract({table}.tags, '$.{name}')"

    def like(column: str) -> str:
        return f"LOWER(COALESCE({column}, '')) LIKE :q ESCAPE '\\'"

    patient = " OR ".join(like(c) for c in ("p.patient_id", tag("p", "PatientName")))
    study = " OR ".join(
        like(c)
        for c in ("st.study_uid", tag("st", "StudyDescription"), tag("st", "AccessionNumber"))
    )
    return (
        f"({like('uid')} OR uid IN ("
        f"SELECT p.patient_id FROM patients p WHERE {patient} "
        "UNION SELECT p.patient_id FROM patients p JOIN studies st ON st.patient_pk = p.id "
        f"WHERE {study} "
        "UNION SELECT st.study_uid FROM studies st JOIN patients p ON p.id = st.patient_pk "
        f"WHERE {patient} OR {study} "
        "UNION SELECT se.series_uid FROM series se JOIN studies st ON st.id = se.study_pk "
        f"JOIN patients p ON p.id = st.patient_pk WHERE {patient} OR {study}))"
    )


def _filters(**values: Any) -> tuple[list[str], dict[str, Any]]:
    """``column = :column`` for each value given."""
    given = {name: str(value) for name, value in values.items() if value}
    return [f"{name} = :{name}" for name in given], given


def _where(conditions: list[str]) -> str:
    return " WHERE " + " AND ".join(conditions) if conditions else ""


def _bindable_time(value: datetime, source: Any) -> Any:
    """A time as the store compares it: SQLite keeps naive UTC text."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    if reader_of(source).dialect == "sqlite":
        return aware.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
    return aware


def stages(jobs: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Jobs grouped by depth in the DAG: stage n only needs stages before it."""
    by_name = {job["job_name"]: job for job in jobs}
    depth: dict[str, int] = {}

    def level(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name in depth:
            return depth[name]
        parents = [p for p in by_name[name]["depends_on"] if p in by_name and p not in seen]
        depth[name] = 1 + max((level(p, seen | {name}) for p in parents), default=-1)
        return depth[name]

    grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        grouped[level(job["job_name"])].append(job)
    return [grouped[key] for key in sorted(grouped)]


def list_workers(source: Any, heartbeat_interval: float | None = None) -> list[dict[str, Any]]:
    """Workers seen, newest heartbeat first, with their age and liveness."""
    if heartbeat_interval is None:
        from scheduler.config import get_settings

        heartbeat_interval = get_settings().heartbeat_interval
    now = utcnow()
    threshold = live_after(heartbeat_interval, now)
    reader = reader_of(source)
    rows = reader.rows(
        "SELECT hostname, channels, pid, started_at, last_heartbeat FROM workers "
        "ORDER BY last_heartbeat DESC"
    )
    paused = {row["channel"] for row in reader.rows("SELECT channel FROM paused_channels")}
    return [
        {
            "hostname": row["hostname"],
            "channels": sorted(row["channels"] or ()),
            "pid": row["pid"],
            "started_at": iso(row["started_at"]),
            "last_heartbeat": iso(row["last_heartbeat"]),
            "age_s": round((now - row["last_heartbeat"]).total_seconds(), 1),
            "live": row["last_heartbeat"] >= threshold,
            # Its channels an operator paused (README, "Pausing a channel").
            "paused": sorted(paused.intersection(row["channels"] or ())),
        }
        for row in rows
    ]


def list_paused(source: Any) -> list[dict[str, Any]]:
    """The paused channels (README, "Pausing a channel"), oldest pause first:
    ``channel``, ``paused_at``, ``reason`` and ``queued`` (its jobs that wait)."""
    rows = reader_of(source).rows(
        "SELECT p.channel, p.paused_at, p.reason, "
        "(SELECT COUNT(*) FROM jobs WHERE jobs.channel = p.channel AND jobs.status = 'queued') "
        "AS queued FROM paused_channels p ORDER BY p.paused_at, p.channel"
    )
    return [
        {
            "channel": row["channel"],
            "paused_at": iso(row["paused_at"]),
            "reason": row["reason"],
            "queued": int(row["queued"]),
        }
        for row in rows
    ]


def list_channels(source: Any) -> list[dict[str, Any]]:
    """Every channel a worker consumes, a job waits on or runs on, or an
    operator paused (``GET /api/channels``), by name: ``channel``, ``paused``,
    ``paused_at``, ``reason``, ``queued`` and ``running`` (its jobs)."""
    reader = reader_of(source)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"queued": 0, "running": 0})
    for row in reader.rows(
        "SELECT channel, status, COUNT(*) AS n FROM jobs "
        "WHERE status IN ('queued', 'running') GROUP BY channel, status"
    ):
        counts[row["channel"]][row["status"]] = int(row["n"])
    consumed = {
        channel
        for row in reader.rows("SELECT channels FROM workers")
        for channel in row["channels"] or ()
    }
    paused = {row["channel"]: row for row in list_paused(reader)}
    return [
        {
            "channel": channel,
            "paused": channel in paused,
            "paused_at": paused[channel]["paused_at"] if channel in paused else None,
            "reason": paused[channel]["reason"] if channel in paused else None,
            **counts[channel],
        }
        for channel in sorted(consumed | set(counts) | set(paused))
    ]


# Percentiles on SQLite are computed here over each job's newest runs, at most this many.
PERCENTILE_SAMPLE = 10_000


def service_stats(source: Any, since: datetime | None = None) -> list[dict[str, Any]]:
    """How each job of each service did (``GET /api/services/stats``): jobs
    that ran to an end (``succeeded`` or ``failed``) and finished at or after
    ``since``, by job name and service. Each entry: ``runs``, ``succeeded``,
    ``failed``, ``success_rate`` (0–1), ``p50_s`` and ``p95_s`` (duration of
    the last attempt, interpolated as PostgreSQL's ``percentile_cont``),
    ``last_version`` and ``last_failure`` (``finished_at``, ``session_id``,
    ``job_id``, ``error``: its first line) or null."""
    reader = reader_of(source)
    where = "status IN ('succeeded', 'failed') AND finished_at IS NOT NULL"
    params: dict[str, Any] = {}
    if since:
        where += " AND finished_at >= :since"
        params["since"] = _bindable_time(since, reader)
    ranked = (
        "SELECT job_name, service, service_version, status, session_id, id, error, "
        "started_at, finished_at, ROW_NUMBER() OVER (PARTITION BY job_name, service, "
        "status ORDER BY finished_at DESC, id) AS newest "
        f"FROM jobs WHERE {where}"
    )
    counts = reader.rows(
        "SELECT job_name, service, COUNT(*) AS runs, "
        "SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END) AS succeeded "
        f"FROM jobs WHERE {where} GROUP BY job_name, service ORDER BY service, job_name",
        **params,
    )
    newest = reader.rows(f"SELECT * FROM ({ranked}) ranked WHERE newest = 1", **params)
    last: dict[tuple[str, str], dict[str, Any]] = {}
    failures: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(newest, key=lambda r: r["finished_at"]):
        key = (row["job_name"], row["service"])
        last[key] = row
        if row["status"] == "failed":
            failures[key] = row
    percentiles = _duration_percentiles(reader, where, params)
    stats = []
    for row in counts:
        key = (row["job_name"], row["service"])
        runs, succeeded = int(row["runs"]), int(row["succeeded"] or 0)
        failure = failures.get(key)
        p50, p95 = percentiles.get(key, (None, None))
        stats.append(
            {
                "job_name": row["job_name"],
                "service": row["service"],
                "runs": runs,
                "succeeded": succeeded,
                "failed": runs - succeeded,
                "success_rate": round(succeeded / runs, 4),
                "p50_s": p50,
                "p95_s": p95,
                "last_version": last[key]["service_version"] if key in last else None,
                "last_failure": None
                if failure is None
                else {
                    "finished_at": iso(failure["finished_at"]),
                    "session_id": failure["session_id"],
                    "job_id": failure["id"],
                    "error": (failure["error"] or "").strip().split("\n")[0],
                },
            }
        )
    return stats


def _duration_percentiles(
    reader: Any, where: str, params: dict[str, Any]
) -> dict[tuple[str, str], tuple[float | None, float | None]]:
    """(job name, service) → the median and 95th percentile of durations."""
    timed = f"{where} AND started_at IS NOT NULL"
    if reader.dialect == "postgresql":
        seconds = "EXTRACT(EPOCH FROM (finished_at - started_at))::float8"
        rows = reader.rows(
            f"SELECT job_name, service, "
            f"percentile_cont(0.5) WITHIN GROUP (ORDER BY {seconds}) AS p50, "
            f"percentile_cont(0.95) WITHIN GROUP (ORDER BY {seconds}) AS p95 "
            f"FROM jobs WHERE {timed} GROUP BY job_name, service",
            **params,
        )
        return {
            (row["job_name"], row["service"]): (_seconds(row["p50"]), _seconds(row["p95"]))
            for row in rows
        }
    rows = reader.rows(
        "SELECT job_name, service, started_at, finished_at FROM ("
        "SELECT job_name, service, started_at, finished_at, ROW_NUMBER() OVER "
        "(PARTITION BY job_name, service ORDER BY finished_at DESC) AS newest "
        f"FROM jobs WHERE {timed}) ranked WHERE newest <= :sample",
        sample=PERCENTILE_SAMPLE,
        **params,
    )
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        durations[(row["job_name"], row["service"])].append(
            (row["finished_at"] - row["started_at"]).total_seconds()
        )
    return {
        key: (_seconds(percentile(values, 0.5)), _seconds(percentile(values, 0.95)))
        for key, values in durations.items()
    }


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` percentile with linear interpolation between the two
    nearest values, as PostgreSQL's ``percentile_cont``."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def _seconds(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def services_report(registry: Any, problems: Sequence[str] = ()) -> dict[str, Any]:
    """The loaded services with their jobs, the broken ones, and every
    problem (``services list --json`` and ``GET /api/services``);
    ``problems`` come first (folders of the services path that are missing)."""
    return {
        "services": [
            {
                "name": service.name,
                "version": service.version,
                "source": str(service.source),
                "legacy": service.legacy,
                "jobs": [job_definition_json(job) for job in service.jobs],
            }
            for service in registry.services
        ],
        "broken": sorted(registry.broken),
        "problems": [*problems, *(str(problem) for problem in registry.problems)],
    }


def job_definition_json(job: Any) -> dict[str, Any]:
    """A loaded job definition (the ``services list --json`` shape)."""
    return {
        "job_name": job.job_name,
        "phase": job.phase,
        "events": list(job.events),
        "depends_on": list(job.depends_on),
        "channel": job.channel,
        "worker_entry": job.worker_entry,
        "registry_entry": job.registry_entry,
        "sort_position": job.sort_position,
        "priority": job.priority,
        "timeout_s": job.timeout_s,
        "retries": job.retries,
        "disabled": job.disabled,
    }
