"""Figure 7: how long a read-only command takes, start-up included.

A monitoring script polls ``dcm-scheduler sessions --json`` every few
seconds, so the whole process counts: interpreter start, imports, reading
the store, printing. An initialised store (SQLite in a temporary folder,
or a throwaway PostgreSQL database) holds 50 sessions with 6 jobs each.
Each command runs 10 times (after one warm-up run, so the file cache is
warm); the figure is the median wall time. Compared in the same run with
the floor, ``python -c pass`` (the interpreter alone), and with the same
listing through the full CLI (``dcm-scheduler sessions``, a table: typer,
rich and the store's ORM).

    python -m bench.cli_startup [--runs 10] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    create_database,
    diamond_jobs,
    drop_database,
    emit,
    log,
    machine,
    manual_sessions,
    median,
    record_study,
)
from scheduler import testing

TARGET_S = 0.3
STUDY = "1.2.826.0.1.3680043.30.7"
SESSIONS = 50


def timed(command: list[str], env: dict[str, str], runs: int) -> list[float]:
    """Wall seconds of each of ``runs`` runs of ``command`` (after a warm-up)."""
    samples = []
    for attempt in range(runs + 1):
        begin = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, timeout=120)
        elapsed = time.perf_counter() - begin
        if done.returncode != 0:
            raise RuntimeError(f"{command} failed: {done.stderr.decode(errors='replace')}")
        if attempt:
            samples.append(elapsed)
    return samples


def store_with_sessions(folder: Path, url: str) -> dict[str, str]:
    """An initialised store at ``url`` holding SESSIONS planned sessions."""
    from scheduler.sessions import plan_session
    from scheduler.store.db import init_db

    # No worker consumes the jobs: planning says so once per job.
    logging.getLogger("scheduler").setLevel(logging.ERROR)

    values = testing.environment_values(folder, url, "memory://")
    # One services folder for every backend: a process imports a module once.
    values["DCM_SERVICES_PATH"] = str(folder.parent / "services")
    with testing.using_environment(values) as settings:
        init_db()
        testing.noop_service(settings.services_path[0], diamond_jobs())
        record_study(STUDY)
        for session_id in manual_sessions(STUDY, SESSIONS):
            plan_session(session_id)
    return values


def measure(backend: str, url: str, folder: Path, runs: int) -> None:
    values = store_with_sessions(folder, url)
    env = {**os.environ, **values}
    script = shutil.which("dcm-scheduler") or str(Path(sys.executable).parent / "dcm-scheduler")
    params = {"backend": backend, "sessions": SESSIONS, "runs": runs, "statistic": "median"}
    floor = median(timed([sys.executable, "-c", "pass"], env, runs))
    full = median(timed([script, "sessions"], env, runs))
    samples = timed([script, "sessions", "--json"], env, runs)
    value = median(samples)
    emit(
        "cli_startup.sessions_json",
        value,
        "s",
        params | machine(),
        baseline={"name": "cli_startup.full_cli_table", "value": round(full, 4), "unit": "s"},
        target=f"<= {TARGET_S} s",
        met=value <= TARGET_S,
        interpreter_s=round(floor, 4),
        beyond_interpreter_s=round(value - floor, 4),
        ratio_to_full_cli=round(value / full, 3),
        samples=[round(s, 4) for s in samples],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcm-bench-cli-") as tmp:
        for backend in args.backends.split(","):
            folder = Path(tmp) / backend
            log(f"{backend}: {SESSIONS} sessions, {args.runs} runs per command")
            if backend == "sqlite":
                measure(backend, f"sqlite:///{folder / 'store.db'}", folder, args.runs)
                continue
            name = "dcm_bench_cli_startup"
            try:
                measure(backend, create_database(name), folder, args.runs)
            finally:
                from scheduler.store.db import dispose_engines

                dispose_engines()
                drop_database(name)


if __name__ == "__main__":
    main()
