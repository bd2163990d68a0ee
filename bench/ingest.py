"""Figure 5: ingest throughput, from files on disk and from memory.

Files: copies of pydicom's ``CT_small.dcm`` and ``MR_small.dcm`` written
with pydicom under new Study/Series/SOP Instance UIDs: ``--studies`` studies
(one patient each) of two series of 50 instances, in
``<study>/<series>/<n>.dcm`` folders (5,000 files by default, freshly
written, so in the page cache). Recorded by
``scheduler.ingest.ingest_paths`` (what ``dcm-scheduler ingest`` calls: it
reads headers only, 500 files per transaction) into an empty store, and by
the CLI itself (``dcm-scheduler ingest --recursive``, a subprocess, so its
interpreter start-up is included). Also reported: reading the headers alone
(``scheduler.dicom.read_header``), to split parsing from recording.

Memory: ``scheduler.ingest.record_instances`` on dict items (tags +
location), 100 instances per study, 500 per transaction, into an empty
store.

Each figure is the median of ``--rounds`` rounds, each on an emptied store,
on PostgreSQL and on SQLite.

    python -m bench.ingest [--studies 50] [--memory-instances 20000] [--backends postgresql,sqlite]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    emit,
    log,
    machine,
    median,
    throwaway_database,
)
from scheduler import testing

TARGET_FILES = 1000.0
TARGET_MEMORY = 5000.0
PER_SERIES = 50
TABLES = "job_dependencies, jobs, sessions, instances, series, studies, patients"


def write_files(folder: Path, studies: int) -> int:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    sources = [pydicom.dcmread(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")]
    written = 0
    for s in range(studies):
        study_uid = generate_uid()
        for k, source in enumerate(sources):
            series_uid = generate_uid()
            target = folder / f"study{s:04d}" / f"series{k}"
            target.mkdir(parents=True)
            for n in range(PER_SERIES):
                sop_uid = generate_uid()
                source.PatientID = f"BENCH-{s}"
                source.StudyInstanceUID = study_uid
                source.SeriesInstanceUID = series_uid
                source.SOPInstanceUID = sop_uid
                source.file_meta.MediaStorageSOPInstanceUID = sop_uid
                source.InstanceNumber = n + 1
                source.save_as(target / f"{n:04d}.dcm", enforce_file_format=True)
                written += 1
    return written


def memory_items(count: int, salt: str) -> list[dict[str, Any]]:
    items = []
    for n in range(count):
        study = n // 100
        series = n // 50
        items.append(
            {
                "PatientID": f"BENCH-{salt}-{study}",
                "PatientName": "BENCH^MEMORY",
                "StudyInstanceUID": f"1.2.826.0.1.3680043.50.{salt}.{study}",
                "StudyDate": "20240101",
                "SeriesInstanceUID": f"1.2.826.0.1.3680043.51.{salt}.{series}",
                "Modality": "CT",
                "SeriesNumber": str(series % 2 + 1),
                "SOPInstanceUID": f"1.2.826.0.1.3680043.52.{salt}.{n}",
                "InstanceNumber": str(n % 50 + 1),
                "location": f"/data/{study}/{series}/{n}.dcm",
            }
        )
    return items


def empty_store(url: str) -> None:
    from sqlalchemy import text

    from scheduler.store.db import get_engine

    with get_engine(url).begin() as connection:
        if url.startswith("sqlite"):
            for table in TABLES.split(", "):
                connection.execute(text(f"DELETE FROM {table}"))
        else:
            connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))


def measure(backend: str, args: argparse.Namespace, files: Path, count: int, tmp: Path) -> None:
    from scheduler.dicom import read_header
    from scheduler.ingest import ingest_paths, iter_files, record_instances
    from scheduler.store.db import init_db, transaction

    name = "dcm_bench_ingest"
    sqlite_url = f"sqlite:///{tmp / 'ingest.db'}"
    database = (
        throwaway_database(name) if backend == "postgresql" else contextlib.nullcontext(sqlite_url)
    )
    with database as url:
        values = testing.environment_values(tmp / f"home-{backend}", url, "memory://")
        params = {"backend": backend, "statistic": "median", "rounds": args.rounds, **machine()}
        with testing.using_environment(values):
            init_db(url)
            # Files through the library (what the CLI calls).
            rates = []
            for _ in range(args.rounds):
                empty_store(url)
                begin = time.perf_counter()
                readers = os.cpu_count() or 1
                result = ingest_paths(transaction, [files], recursive=True, readers=readers)
                elapsed = time.perf_counter() - begin
                assert result.recorded == count, result.as_dict()
                rates.append(count / elapsed)
            value = median(rates)
            emit(
                "ingest.files_per_second",
                value,
                "instances/s",
                {**params, "files": count, "via": "scheduler.ingest.ingest_paths", "batch": 500},
                target=f">= {TARGET_FILES:g} instances/s",
                met=value >= TARGET_FILES,
                samples=[round(r, 1) for r in rates],
            )
            # The CLI, start-up included.
            cli_rates = []
            for _ in range(args.rounds):
                empty_store(url)
                begin = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "scheduler.cli", "ingest", "--recursive", str(files)],
                    cwd=tmp,
                    env={**os.environ, **values},
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                cli_rates.append(count / (time.perf_counter() - begin))
            value = median(cli_rates)
            emit(
                "ingest.cli_files_per_second",
                value,
                "instances/s",
                {**params, "files": count, "via": "dcm-scheduler ingest --recursive (subprocess)"},
                target=f">= {TARGET_FILES:g} instances/s",
                met=value >= TARGET_FILES,
                samples=[round(r, 1) for r in cli_rates],
            )
            # Reading headers alone (no store): what parsing costs.
            paths = list(iter_files([files], recursive=True))
            begin = time.perf_counter()
            for path in paths:
                read_header(path)
            emit(
                "ingest.read_headers_per_second",
                len(paths) / (time.perf_counter() - begin),
                "files/s",
                {"files": len(paths), "via": "scheduler.dicom.read_header", **machine()},
            )
            # In memory.
            mem_rates = []
            for round_ in range(args.rounds):
                empty_store(url)
                items = memory_items(args.memory_instances, str(round_))
                begin = time.perf_counter()
                recorded = 0
                for start in range(0, len(items), 500):
                    with transaction() as db:
                        recorded += record_instances(db, items[start : start + 500]).recorded
                elapsed = time.perf_counter() - begin
                assert recorded == len(items)
                mem_rates.append(len(items) / elapsed)
            value = median(mem_rates)
            emit(
                "ingest.memory_per_second",
                value,
                "instances/s",
                {
                    **params,
                    "instances": args.memory_instances,
                    "per_study": 100,
                    "batch": 500,
                    "via": "scheduler.ingest.record_instances",
                },
                target=f">= {TARGET_MEMORY:g} instances/s",
                met=value >= TARGET_MEMORY,
                samples=[round(r, 1) for r in mem_rates],
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--memory-instances", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="postgresql,sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcm-bench-ingest-") as tmp:
        files = Path(tmp) / "files"
        begin = time.perf_counter()
        count = write_files(files, args.studies)
        log(f"{count} files written in {time.perf_counter() - begin:.1f}s")
        for backend in args.backends.split(","):
            measure(backend, args, files, count, Path(tmp))


if __name__ == "__main__":
    main()
