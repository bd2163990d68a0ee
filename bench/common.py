"""Helpers shared by the benchmark scripts: the JSON-line output every
script prints, the benchmarks' servers, store and worker processes.

Pointing this process at a store and a broker, throwaway databases, the
no-op service, recording studies and waiting come from
:mod:`scheduler.testing`, as for the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from scheduler import testing
from scheduler.config import Settings

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("DCM_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
# The issue fixes Redis database 0 for the benchmarks; the tests use 1-15.
REDIS_URL = os.environ.get("DCM_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def emit(
    name: str,
    value: float,
    unit: str,
    params: dict[str, Any] | None = None,
    *,
    baseline: dict[str, Any] | None = None,
    target: str | None = None,
    met: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Print one figure as one JSON line (and return it)."""
    line: dict[str, Any] = {
        "name": name,
        "value": round(value, 4) if isinstance(value, float) else value,
        "unit": unit,
        "params": params or {},
    }
    if baseline is not None:
        line["baseline"] = baseline
    if target is not None:
        line["target"] = target
    if met is not None:
        line["met"] = met
    line.update(extra)
    print(json.dumps(line), flush=True)
    return line


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version()}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil
    return float(ordered[min(rank, len(ordered)) - 1])


def log(message: str) -> None:
    """Progress on stderr, so stdout stays one JSON line per figure."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- CPU time ----------------------------------------------------------------
# Wall times on a shared machine move by a third between runs of the same
# code; CPU times far less, so the scripts report where the CPU went too.


def cpu_seconds_of(pid: int | None = None, *, reaped_children: bool = False) -> float:
    """User + system CPU seconds of a process (this one by default), with
    those of its children it has already waited for when asked; 0 once gone."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    own = times.user + times.system
    return own + (times.children_user + times.children_system if reaped_children else 0.0)


def live_descendants_cpu_seconds() -> float:
    """CPU seconds of this process's live descendants (callback hosts, fork
    servers), each its own time only."""
    import psutil

    return sum(cpu_seconds_of(child.pid) for child in psutil.Process().children(recursive=True))


def postgres_cpu_seconds(database: str) -> float:
    """CPU seconds of the PostgreSQL backends serving ``database`` now."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        command = " ".join(proc.info["cmdline"] or [])
        if command.startswith("postgres:") and f" {database} " in f"{command} ":
            total += cpu_seconds_of(proc.pid)
    return total


def redis_cpu_seconds() -> float:
    """CPU seconds of the benchmarks' Redis server, when it runs on this
    machine (0 otherwise)."""
    import psutil

    port = redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs.get("port", 6379)
    for proc in psutil.process_iter(["name", "cmdline"]):
        command = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] == "redis-server" and f":{port}" in command:
            return cpu_seconds_of(proc.pid)
    return 0.0


# --- servers -----------------------------------------------------------------


def create_database(name: str) -> str:
    """A new, empty PostgreSQL database (dropped first if left over)."""
    return testing.create_database(PG_ADMIN_URL, name)


def drop_database(name: str) -> None:
    testing.drop_database(PG_ADMIN_URL, name)


@contextmanager
def throwaway_database(name: str) -> Iterator[str]:
    """A new PostgreSQL database ``name`` (its URL), dropped when the block
    ends, however it ends: a run stopped with Ctrl-C leaves nothing behind."""
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


def flush_redis() -> None:
    """Empty the benchmarks' Redis database (and only that one)."""
    redis.Redis.from_url(REDIS_URL).flushdb()


@contextmanager
def flushed_redis() -> Iterator[None]:
    """The benchmarks' Redis database emptied before the block and after it,
    however it ends."""
    flush_redis()
    try:
        yield
    finally:
        flush_redis()


@contextmanager
def bench_store(
    name: str, overrides: dict[str, str] | None = None, *, broker: str = REDIS_URL
) -> Iterator[tuple[Path, dict[str, str], Settings]]:
    """One run of a benchmark: a new PostgreSQL database ``name`` and a
    throwaway folder, this process pointed at them and at ``broker`` (the
    settings ``overrides`` on top), the store created; the benchmarks' Redis
    database, when it is the broker, emptied before and after, and the
    database dropped after. Yields the folder, the settings' environment
    values and the settings."""
    from scheduler.store.db import init_db

    flushed = flushed_redis() if broker == REDIS_URL else contextlib.nullcontext()
    with (
        throwaway_database(name) as url,
        flushed,
        tempfile.TemporaryDirectory(prefix=f"{name.replace('_', '-')}-") as tmp,
    ):
        home = Path(tmp)
        values = testing.environment_values(home, url, broker) | (overrides or {})
        with testing.using_environment(values) as settings:
            init_db(url)
            yield home, values, settings


# --- services and sessions ------------------------------------------------------


def diamond_jobs() -> list[dict[str, Any]]:
    """Six jobs: a pre job, a diamond (a → b, c → d) and a post job."""
    noop = testing.NOOP
    return [
        {"jobName": "pre", "workerEntry": noop, "phase": "pre"},
        {"jobName": "a", "workerEntry": noop},
        {"jobName": "b", "workerEntry": noop, "dependsOn": "a"},
        {"jobName": "c", "workerEntry": noop, "dependsOn": "a"},
        {"jobName": "d", "workerEntry": noop, "dependsOn": ["b", "c"]},
        {"jobName": "post", "workerEntry": noop, "phase": "post"},
    ]


def record_study(study_uid: str, instances: int = 20) -> None:
    """One study of ``instances`` instances in two series, recorded now."""
    testing.record_study(study_uid, instances, patient=f"P-{study_uid}", series=2)


def manual_sessions(study_uid: str, count: int) -> list[str]:
    """``count`` new ``planning`` sessions of one study (manual triggers)."""
    from scheduler.sessions import open_session

    ids = []
    for _ in range(count):
        session_id = open_session("study", study_uid, "study.stable", manual=True)
        assert session_id is not None
        ids.append(session_id)
    return ids


# --- worker subprocesses -----------------------------------------------------


def celery_worker(
    queues: str,
    *,
    concurrency: int = 1,
    pool: str = "prefork",
    hostname: str = "bench@%h",
    include: str | None = None,
    env: dict[str, str] | None = None,
    logfile: Path | None = None,
    extra: Sequence[str] = (),
    app: str = "scheduler",
) -> subprocess.Popen[bytes]:
    """A real ``celery -A <app> worker`` process, started from the repo root."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-Q",
        queues,
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-n",
        hostname,
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]
    if include:
        command += ["-I", include]
    output = open(logfile, "ab") if logfile else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT,
    )


def celery_beat(home: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A real ``celery -A scheduler beat``, its schedule file and log in ``home``."""
    with open(home / "beat.log", "ab") as beat_log:
        return subprocess.Popen(
            testing.celery_command(
                "beat", "--loglevel", "WARNING", "-s", str(home / "beat-schedule")
            ),
            cwd=REPO,
            env={**os.environ, **env},
            stdout=beat_log,
            stderr=subprocess.STDOUT,
        )


# How :func:`production_shape` runs the scheduler, in each figure's params.
PRODUCTION_PARAMS = {
    "beat": "celery -A scheduler beat (subprocess)",
    "workers": "planner -Q dcm.planning and jobs -Q default, prefork -c 1 each",
    "store": "postgresql",
    "broker": "redis",
}


@contextmanager
def production_shape(home: Path, values: dict[str, str]) -> Iterator[None]:
    """The production shape of docker-compose, subprocesses of this one: a
    planner worker (``-Q dcm.planning``) and a job worker (``-Q default``),
    prefork ``-c 1`` each, both ready, then ``celery -A scheduler beat``;
    logs in ``home``. All are stopped, last started first, when the block ends."""
    processes: list[subprocess.Popen[bytes]] = []
    hosts = {"dcm.planning": "planner", "default": "jobs"}
    try:
        for queue, host in hosts.items():
            processes.append(
                celery_worker(
                    queue,
                    hostname=f"bench-{host}@localhost",
                    env=values,
                    logfile=home / f"{host}.log",
                )
            )
        for host in hosts.values():
            worker_ready(f"bench-{host}@localhost")
        processes.append(celery_beat(home, values))
        yield
    finally:
        for process in reversed(processes):
            stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL if it does not stop."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def worker_ready(hostname: str, timeout: float = 60.0) -> None:
    """Wait until the worker recorded its presence (its Presence bootstep ran)."""
    from sqlalchemy import select

    from scheduler.store.db import transaction
    from scheduler.store.models import Worker

    def seen() -> bool:
        with transaction() as db:
            return db.scalar(select(Worker.hostname).where(Worker.hostname == hostname)) is not None

    testing.wait_until(seen, timeout, f"worker {hostname}", interval=0.1)
