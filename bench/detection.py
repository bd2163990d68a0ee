"""Figure 1: detection scaling (one ``scheduler.detection.detect`` run).

An archive of 1,000 / 10,000 / 100,000 studies is generated directly with
set-based bulk INSERTs (``INSERT … SELECT`` over ``generate_series`` on
PostgreSQL, a recursive CTE on SQLite): one patient and two series per
study and 20 instances per study (10 per series) with tags and locations,
so the 100,000-study archive holds 2,000,000 instance rows. 100 studies,
spread over the id range, are candidates (``receiving``, last instance an
hour old); every other study is ``stable``. Statistics are refreshed
(``ANALYZE``) after loading, as autovacuum would.

One run claims the 100 candidates and creates their 100 ``planning``
sessions; between runs the candidates are put back to ``receiving`` and
the sessions deleted. The figure is the median of ``--runs`` runs after
one warm-up run, per size and backend, then the ratio largest/smallest.

    python -m bench.detection [--sizes 1000,10000,100000] [--backends postgresql,sqlite]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.common import (
    emit,
    log,
    machine,
    median,
    throwaway_database,
)
from scheduler import testing

CANDIDATES = 100
INSTANCES_PER_STUDY = 20
SERIES_PER_STUDY = 2
TARGET_MS = 50.0
TARGET_RATIO = 1.5


def _sqlite_time(moment: datetime) -> str:
    # How SQLAlchemy's DateTime stores a naive UTC value on SQLite.
    return moment.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def generate(connection: Any, dialect: str, studies: int, with_instances: str) -> None:
    """Bulk-load ``studies`` studies; candidates are every (studies/100)-th."""
    step = studies // CANDIDATES
    old = datetime.now(UTC) - timedelta(hours=1)
    older = datetime.now(UTC) - timedelta(days=30)
    per_series = INSTANCES_PER_STUDY // SERIES_PER_STUDY
    if dialect == "postgresql":
        series_of = "generate_series(1, :n) g"
        hexid = "md5(g::text) || md5((g + 1)::text)"
        tags = '\'{"PatientName": "BENCH^X", "PatientSex": "O"}\'::jsonb'
        study_tags = '\'{"StudyDescription": "bench", "StudyDate": "20240101"}\'::jsonb'
        series_tags = '\'{"Modality": "CT", "SeriesNumber": "1"}\'::jsonb'
        inst_tags = "jsonb_build_object('InstanceNumber', g::text)"
        stamp_old, stamp_older = ":old", ":older"
        values: dict[str, Any] = {"old": old, "older": older}
        cte = ""
    else:
        series_of = "g"
        hexid = "printf('%064d', g)"
        tags = '\'{"PatientName": "BENCH^X", "PatientSex": "O"}\''
        study_tags = '\'{"StudyDescription": "bench", "StudyDate": "20240101"}\''
        series_tags = '\'{"Modality": "CT", "SeriesNumber": "1"}\''
        inst_tags = "json_object('InstanceNumber', CAST(g AS TEXT))"
        stamp_old, stamp_older = ":old", ":older"
        values = {"old": _sqlite_time(old), "older": _sqlite_time(older)}
        cte = "WITH RECURSIVE g(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM g WHERE g < :n) "

    def run(sql: str, n: int) -> None:
        connection.execute(text(sql), {**values, "n": n, "step": step})

    resource = (
        "instance_count, first_received_at, last_received_at, state, fingerprint, "
        "stable_fingerprint, revision"
    )
    run(
        f"{cte}INSERT INTO patients (id, patient_id, tags, {resource}) "
        f"SELECT g, 'BENCH-P' || g, {tags}, {INSTANCES_PER_STUDY}, {stamp_older}, {stamp_older}, "
        f"'stable', {hexid}, {hexid}, 1 FROM {series_of}",
        studies,
    )
    # Candidates: receiving, never stable, last instance an hour ago.
    run(
        f"{cte}INSERT INTO studies (id, study_uid, patient_pk, tags, {resource}) "
        f"SELECT g, '1.2.826.0.1.3680043.10.' || g, g, {study_tags}, {INSTANCES_PER_STUDY}, "
        f"{stamp_older}, CASE WHEN g % :step = 0 THEN {stamp_old} ELSE {stamp_older} END, "
        f"CASE WHEN g % :step = 0 THEN 'receiving' ELSE 'stable' END, {hexid}, "
        f"CASE WHEN g % :step = 0 THEN NULL ELSE {hexid} END, "
        f"CASE WHEN g % :step = 0 THEN 0 ELSE 1 END FROM {series_of}",
        studies,
    )
    run(
        f"{cte}INSERT INTO series (id, series_uid, study_pk, tags, {resource}) "
        f"SELECT g, '1.2.826.0.1.3680043.11.' || g, (g + 1) / {SERIES_PER_STUDY}, {series_tags}, "
        f"{per_series}, {stamp_older}, {stamp_older}, 'stable', {hexid}, {hexid}, 1 "
        f"FROM {series_of}",
        studies * SERIES_PER_STUDY,
    )
    count = studies * INSTANCES_PER_STUDY
    if with_instances == "candidates":
        # Only the candidates' instances; counters of the others are set directly.
        where = f"WHERE ((g - 1) / {INSTANCES_PER_STUDY} + 1) % :step = 0"
    else:
        where = ""
    run(
        f"{cte}INSERT INTO instances (id, sop_uid, series_pk, tags, location, received_at) "
        f"SELECT g, '1.2.826.0.1.3680043.12.' || g, (g - 1) / {per_series} + 1, {inst_tags}, "
        f"'/archive/' || ((g - 1) / {INSTANCES_PER_STUDY} + 1) || '/' || g || '.dcm', "
        f"{stamp_older} FROM {series_of} {where}",
        count,
    )
    connection.execute(text("ANALYZE"))


def candidate_ids(studies: int) -> list[int]:
    step = studies // CANDIDATES
    return list(range(step, studies + 1, step))


def reset(studies: int) -> None:
    from scheduler.store.db import transaction

    ids = candidate_ids(studies)
    with transaction() as db:
        db.execute(text("DELETE FROM sessions"))
        db.execute(
            text(
                "UPDATE studies SET state = 'receiving', stable_fingerprint = NULL, revision = 0 "
                f"WHERE id IN ({','.join(map(str, ids))})"
            )
        )


def explain(studies: int) -> str:
    """The plan of detection's candidate query on PostgreSQL (first line)."""
    from scheduler.store.db import transaction

    with transaction() as db:
        cutoff = datetime.now(UTC) - timedelta(seconds=60)
        rows = db.execute(
            text(
                "EXPLAIN SELECT id, study_uid, fingerprint, stable_fingerprint, revision "
                "FROM studies WHERE state = 'receiving' AND last_received_at <= :c "
                "ORDER BY last_received_at LIMIT 1000"
            ),
            {"c": cutoff},
        ).all()
    return " | ".join(r[0].strip() for r in rows[:2])


def measure(backend: str, studies: int, runs: int, with_instances: str, folder: Path) -> float:
    from scheduler.detection import detect
    from scheduler.store.db import get_engine, init_db

    name = f"dcm_bench_detect_{studies}"
    sqlite_url = f"sqlite:///{folder / f'{name}.db'}"
    database = (
        throwaway_database(name) if backend == "postgresql" else contextlib.nullcontext(sqlite_url)
    )
    with database as url:
        values = testing.environment_values(folder / f"home-{backend}-{studies}", url, "memory://")
        with testing.using_environment(values) as settings:
            init_db(url)
            started = time.perf_counter()
            with get_engine(url).begin() as connection:
                generate(connection, backend, studies, with_instances)
            log(f"{backend} {studies} studies generated in {time.perf_counter() - started:.1f}s")
            timings = []
            for index in range(runs + 1):
                reset(studies)
                begin = time.perf_counter()
                run = detect(settings)
                elapsed = (time.perf_counter() - begin) * 1000
                assert len(run.sessions) == CANDIDATES, (len(run.claimed), len(run.sessions))
                if index:  # the first run warms caches up and is not counted
                    timings.append(elapsed)
            plan = explain(studies) if backend == "postgresql" else ""
        value = median(timings)
        emit(
            "detection.run",
            value,
            "ms",
            {
                "backend": backend,
                "studies": studies,
                "instances": studies * INSTANCES_PER_STUDY
                if with_instances == "all"
                else CANDIDATES * INSTANCES_PER_STUDY,
                "candidates": CANDIDATES,
                "runs": runs,
                "statistic": "median",
                **machine(),
            },
            target=f"<= {TARGET_MS:g} ms",
            met=value <= TARGET_MS,
            samples=[round(t, 2) for t in timings],
            **({"query_plan": plan} if plan else {}),
        )
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--instances",
        choices=["all", "candidates"],
        default="all",
        help="generate the instances of every study, or of the candidates only",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="dcm-bench-detect-") as tmp:
        for backend in args.backends.split(","):
            results = {n: measure(backend, n, args.runs, args.instances, Path(tmp)) for n in sizes}
            small, large = min(sizes), max(sizes)
            if small == large:
                continue
            ratio = results[large] / results[small]
            emit(
                "detection.scaling",
                ratio,
                "ratio",
                {"backend": backend, "studies": large, "candidates": CANDIDATES},
                baseline={
                    "name": "detection.run",
                    "studies": small,
                    "value": results[small],
                    "unit": "ms",
                },
                target=f"<= {TARGET_RATIO:g}x",
                met=ratio <= TARGET_RATIO,
            )


if __name__ == "__main__":
    main()
