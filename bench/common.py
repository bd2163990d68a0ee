"""Helpers shared by the benchmark scripts.

Copies of the few test helpers the benchmarks need (pointing this process at
a store and a broker, throwaway PostgreSQL databases) — ``bench/`` never
imports ``tests/`` — plus the JSON-line output every script prints.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
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


# --- servers -----------------------------------------------------------------


def pg_url(name: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def create_database(name: str) -> str:
    """A new, empty PostgreSQL database (dropped first if left over)."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg_url(name)


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis() -> None:
    """Empty the benchmarks' Redis database (and only that one)."""
    redis.Redis.from_url(REDIS_URL).flushdb()


# --- environment --------------------------------------------------------------


def bench_environment(home: Path, database_url: str, broker_url: str = REDIS_URL) -> dict[str, str]:
    return {
        "DCM_HOME": str(home),
        "DCM_DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "DCM_SERVICES_PATH": str(home / "services"),
        "DCM_OUTPUT_DIR": str(home / "outputs"),
        "DCM_STABLE_AGE": "60",
        "DCM_DETECT_INTERVAL": "5",
        "DCM_DETECT_LEVELS": "study",
        "DCM_DEFAULT_EVENTS": "study.stable",
        "DCM_HEADER_FIELDS": "",
        "DCM_SETTINGS": "",
        "DCM_CALLBACK_TIMEOUT": "5",
        "DCM_HEARTBEAT_INTERVAL": "10",
    }


def apply_environment(values: dict[str, str]) -> Any:
    """Set DCM_* variables and make every cached piece follow them."""
    from scheduler.demo import use_environment

    return use_environment(values)


def environment(values: dict[str, str]) -> Any:
    """The environment ``values`` for a block, restored afterwards."""
    from scheduler.demo import using_environment

    return using_environment(values)


# --- services -----------------------------------------------------------------

NOOP = "benchjobs:noop"
ACCEPT = "benchjobs:accept"


def write_service(services: Path, jobs: list[dict[str, Any]], name: str = "bench") -> Path:
    """A service folder ``services/<name>`` with the no-op ``benchjobs`` package."""
    from scheduler.registry import forget_registry

    folder = services / name
    package = folder / "benchjobs"
    if not package.exists():
        shutil.copytree(BENCH / "benchjobs", package, ignore=shutil.ignore_patterns("__pycache__"))
    path = folder / "dcm-processor.json"
    path.write_text(json.dumps({"name": name, "version": "1", "jobs": jobs}, indent=2))
    forget_registry()
    return path


def diamond_jobs() -> list[dict[str, Any]]:
    """Six jobs: a pre job, a diamond (a → b, c → d) and a post job."""
    return [
        {"jobName": "pre", "workerEntry": NOOP, "phase": "pre"},
        {"jobName": "a", "workerEntry": NOOP},
        {"jobName": "b", "workerEntry": NOOP, "dependsOn": "a"},
        {"jobName": "c", "workerEntry": NOOP, "dependsOn": "a"},
        {"jobName": "d", "workerEntry": NOOP, "dependsOn": ["b", "c"]},
        {"jobName": "post", "workerEntry": NOOP, "phase": "post"},
    ]


# --- data ---------------------------------------------------------------------


def record_study(study_uid: str, instances: int = 20, *, patient: str | None = None) -> None:
    """Record one study of ``instances`` instances in two series, now."""
    from scheduler.ingest import record_instances
    from scheduler.store.db import transaction

    items = [
        {
            "PatientID": patient or f"P-{study_uid}",
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": f"{study_uid}.{n % 2 + 1}",
            "SOPInstanceUID": f"{study_uid}.{n % 2 + 1}.{n}",
            "Modality": "CT",
            "InstanceNumber": str(n),
            "location": f"/data/{study_uid}/{n}.dcm",
        }
        for n in range(instances)
    ]
    with transaction() as db:
        record_instances(db, items)


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
) -> subprocess.Popen[bytes]:
    """A real ``celery -A scheduler worker`` process, started from the repo root."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "scheduler",
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


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def worker_ready(hostname: str, timeout: float = 60.0) -> None:
    """Wait until the worker recorded its presence (its Presence bootstep ran)."""
    from sqlalchemy import select

    from scheduler.store.db import transaction
    from scheduler.store.models import Worker

    def seen() -> bool:
        with transaction() as db:
            return db.scalar(select(Worker.hostname).where(Worker.hostname == hostname)) is not None

    wait_for(seen, timeout, f"worker {hostname}", interval=0.1)
