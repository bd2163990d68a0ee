"""Figure 8: live latency while a cohort run works through the archive.

The production shape of figure 4 — a real ``celery -A scheduler beat``, a
planner worker (``-Q dcm.planning``) and a job worker (``-Q default``),
prefork ``-c 1`` each, subprocesses of this script, PostgreSQL and Redis;
stable age 1 s, detection interval 1 s, one no-op job per session — over a
store that also holds an archive of ``--archive`` studies of 20 instances
(figure 1's bulk load, all ``stable``, ``StudyDescription`` ``bench``).

Two phases in the same run, each recording ``--studies`` live studies of 20
instances 0.2–0.6 s apart (seeded): first with nothing else going on, then
once a cohort run of ``rerun`` over the whole archive (``cohorts.start``,
no rate limit: each beat tick opens what planning takes, at most 100) has
ended its first 20 sessions. Two warm-up studies go first. Latency of a
live study = its first job's ``started_at`` − the moment it became stable
(last instance + stable age). Figures: p50 and p95 of each
phase and the ratio of the p95s; the cohort's progress during the second
phase (sessions opened and ended) shows it was running, not waiting. The
cohort is then cancelled.

    python -m bench.cohort [--archive 10000] [--studies 40]
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from bench.common import (
    PRODUCTION_PARAMS,
    bench_store,
    emit,
    log,
    machine,
    median,
    percentile,
    production_shape,
    record_study,
)
from bench.detection import generate
from scheduler import testing

STABLE_AGE = 1.0
INTERVAL = 1.0
WARM_COHORT = 20


def record_archive(url: str, count: int) -> None:
    """``count`` studies of 20 instances (figure 1's bulk load), all stable."""
    from sqlalchemy import text

    from scheduler.store.db import get_engine

    with get_engine(url).begin() as connection:
        generate(connection, "postgresql", count, "all")
        connection.execute(
            text(
                "UPDATE studies SET state = 'stable', stable_fingerprint = fingerprint, "
                "revision = 1 WHERE state <> 'stable'"
            )
        )
        # The bulk load chose the ids: live data recorded next takes the ones after.
        for table in ("patients", "studies", "series", "instances"):
            connection.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
            )


def live_phase(uids: list[str], rng: random.Random) -> list[float]:
    """Record the live studies, wait for their first jobs; their latencies."""
    from sqlalchemy import func, select

    from scheduler.store.db import transaction
    from scheduler.store.models import Job, SchedulingSession, Study

    for uid in uids:
        record_study(uid)
        time.sleep(rng.uniform(0.2, 0.6))

    def first_starts() -> list[Any] | None:
        with transaction() as db:
            rows = db.execute(
                select(Study.last_received_at, func.min(Job.started_at))
                .join(SchedulingSession, SchedulingSession.uid == Study.study_uid)
                .join(Job, Job.session_id == SchedulingSession.id)
                .where(Study.study_uid.in_(uids), SchedulingSession.cohort.is_(None))
                .group_by(Study.id)
            ).all()
        started = [row for row in rows if row[1] is not None]
        return started if len(started) == len(uids) else None

    rows = testing.wait_until(first_starts, 300, "every live study's first job", interval=0.2)
    return [(started - last).total_seconds() - STABLE_AGE for last, started in rows]


def cohort_progress(name: str) -> dict[str, int]:
    from scheduler import cohorts

    summary = cohorts.summary(name)
    return {"opened": summary["opened"], "ended": summary["ended"], "total": summary["total"]}


def main() -> None:
    from scheduler import cohorts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=int, default=10_000)
    parser.add_argument("--studies", type=int, default=40)
    args = parser.parse_args()
    rng = random.Random(8)
    overrides = {"DCM_STABLE_AGE": str(STABLE_AGE), "DCM_DETECT_INTERVAL": str(INTERVAL)}
    with bench_store("dcm_bench_cohort", overrides) as (home, values, settings):
        job = {
            "jobName": "one",
            "workerEntry": testing.NOOP,
            "events": ["study.stable", "rerun"],
        }
        testing.noop_service(settings.services_path[0], [job])
        started = time.perf_counter()
        record_archive(values["DCM_DATABASE_URL"], args.archive)
        log(f"archive of {args.archive} studies in {time.perf_counter() - started:.1f}s")
        with production_shape(home, values):
            live_phase(["1.8.0.1", "1.8.0.2"], rng)  # warm-up: imports, fork servers
            alone = live_phase([f"1.8.1.{n}" for n in range(args.studies)], rng)
            log(f"without the cohort: p95 {percentile(alone, 95):.3f}s")
            started = time.perf_counter()
            cohort = cohorts.start(
                "rerun", "study", cohorts.Criteria({"StudyDescription": ["bench"]})
            )
            log(
                f"cohort {cohort['name']}: {cohort['total']} studies, started in "
                f"{time.perf_counter() - started:.2f}s"
            )
            # Live studies arrive once the cohort keeps both workers busy.
            testing.wait_until(
                lambda: cohort_progress(cohort["name"])["ended"] >= WARM_COHORT,
                300,
                "the cohort's first sessions to end",
                interval=0.2,
            )
            before = cohort_progress(cohort["name"])
            started = time.perf_counter()
            beside = live_phase([f"1.8.2.{n}" for n in range(args.studies)], rng)
            during = cohort_progress(cohort["name"])
            seconds = time.perf_counter() - started
            log(f"with the cohort: p95 {percentile(beside, 95):.3f}s; cohort {during}")
            cohorts.cancel_cohort(cohort["name"])
    params = {
        "archive_studies": args.archive,
        "live_studies": args.studies,
        "stable_age_s": STABLE_AGE,
        "detect_interval_s": INTERVAL,
        **PRODUCTION_PARAMS,
        **machine(),
    }
    progress = {
        "cohort_total": during["total"],
        "cohort_opened_during": during["opened"] - before["opened"],
        "cohort_ended_during": during["ended"] - before["ended"],
        "cohort_sessions_per_second": round((during["ended"] - before["ended"]) / seconds, 1),
    }
    emit("cohort.live_p50_alone", median(alone), "s", params, samples=sorted(alone))
    emit("cohort.live_p95_alone", percentile(alone, 95), "s", params)
    emit("cohort.live_p50_with_cohort", median(beside), "s", params, samples=sorted(beside))
    emit("cohort.live_p95_with_cohort", percentile(beside, 95), "s", params, **progress)
    emit(
        "cohort.live_p95_ratio",
        percentile(beside, 95) / percentile(alone, 95),
        "x",
        params,
        baseline={"name": "cohort.live_p95_alone", "value": percentile(alone, 95), "unit": "s"},
        **progress,
    )


if __name__ == "__main__":
    main()
