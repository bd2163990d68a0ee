"""Ingest (README, "Commands"): headers only, bulk, idempotent, counts right at every level."""

from __future__ import annotations

import functools
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import func, select
from typer.testing import CliRunner

from scheduler.cli import app as cli
from scheduler.ingest import Rejection, fingerprint, ingest_paths, record_instances
from scheduler.store.db import transaction
from scheduler.store.models import Instance, Patient, Series, Study, utcnow

SAMPLES = Path(str(get_testdata_file("CT_small.dcm"))).parent
# pydicom reads these whole, ingest rejects them as truncated (README,
# "Failure modes"): samples cut on purpose.
CUT_SAMPLES = {"MR_truncated.dcm", "rtplan_truncated.dcm"}


def pydicom_reference(root: Path) -> dict[str, set[str]]:
    """What pydicom itself reads from the sample files, less those cut short: UIDs per level."""
    found: dict[str, set[str]] = {
        "patients": set(),
        "studies": set(),
        "series": set(),
        "sops": set(),
    }
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        dataset = None
        for force in (False, True):
            try:
                dataset = pydicom.dcmread(path, defer_size="1 KB", force=force)
                break
            except Exception:
                continue
        if dataset is None or path.name in CUT_SAMPLES:
            continue
        uids = [dataset.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if not all(uids):
            continue
        found["patients"].add(str(dataset.get("PatientID") or ""))
        found["studies"].add(str(uids[0]))
        found["series"].add(str(uids[1]))
        found["sops"].add(str(uids[2]))
    return found


def counts(url: str) -> dict[str, int]:
    with transaction(url) as db:
        return {
            "patients": db.scalar(select(func.count()).select_from(Patient)) or 0,
            "studies": db.scalar(select(func.count()).select_from(Study)) or 0,
            "series": db.scalar(select(func.count()).select_from(Series)) or 0,
            "sops": db.scalar(select(func.count()).select_from(Instance)) or 0,
        }


def test_ingest_of_all_pydicom_samples_matches_what_pydicom_reads(store_url: str) -> None:
    reference = pydicom_reference(SAMPLES)
    result = ingest_paths(functools.partial(transaction, store_url), [SAMPLES], recursive=True)
    assert counts(store_url) == {k: len(v) for k, v in reference.items()}
    assert result.recorded == len(reference["sops"])
    with transaction(store_url) as db:
        assert set(db.scalars(select(Instance.sop_uid))) == reference["sops"]


def test_reingest_records_nothing_new(store_url: str) -> None:
    scope = functools.partial(transaction, store_url)
    first = ingest_paths(scope, [SAMPLES], recursive=True)
    again = ingest_paths(scope, [SAMPLES], recursive=True)
    assert again.recorded == 0
    assert again.known == first.recorded + first.known
    assert counts(store_url)["sops"] == first.recorded


def test_bad_files_are_reported_with_reason_and_skipped(store_url: str, tmp_path: Path) -> None:
    tmp_path = tmp_path / "incoming"
    tmp_path.mkdir()
    (tmp_path / "notes.txt").write_text("this is not an image\n")
    (tmp_path / "empty.dcm").write_bytes(b"")
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del dataset.SOPInstanceUID
    dataset.save_as(tmp_path / "no-sop.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "good.dcm")

    result = ingest_paths(functools.partial(transaction, store_url), [tmp_path])

    reasons = {Path(r.location).name: r.reason for r in result.rejected}
    assert reasons["notes.txt"].startswith("not DICOM")
    assert reasons["empty.dcm"] == "empty file"
    assert reasons["no-sop.dcm"] == "missing SOPInstanceUID"
    assert result.recorded == 1  # the batch went on past the bad files
    assert result.not_dicom == 2


def test_counters_timestamps_and_fingerprint_at_every_level(store_url: str) -> None:
    base = {"PatientID": "P", "StudyInstanceUID": "1.1"}
    t0 = utcnow()
    with transaction(store_url) as db:
        record_instances(
            db,
            [
                base
                | {"SeriesInstanceUID": "1.1.1", "SOPInstanceUID": "1.1.1.2", "location": "/a"},
                base
                | {"SeriesInstanceUID": "1.1.1", "SOPInstanceUID": "1.1.1.1", "location": "/b"},
            ],
            now=t0,
        )
    t1 = t0 + timedelta(seconds=5)
    with transaction(store_url) as db:
        result = record_instances(
            db,
            [
                base
                | {"SeriesInstanceUID": "1.1.2", "SOPInstanceUID": "1.1.2.1", "location": "/c"},
                base
                | {"SeriesInstanceUID": "1.1.1", "SOPInstanceUID": "1.1.1.1", "location": "/b"},
            ],
            now=t1,
        )
    assert (result.recorded, result.known) == (1, 1)
    with transaction(store_url) as db:
        study = db.scalar(select(Study))
        patient = db.scalar(select(Patient))
        series = {x.series_uid: x for x in db.scalars(select(Series))}
        assert study is not None and patient is not None
        for resource in (study, patient):
            assert resource.instance_count == 3
            assert resource.first_received_at == t0
            assert resource.last_received_at == t1
            assert resource.fingerprint == fingerprint(["1.1.1.1", "1.1.1.2", "1.1.2.1"])
        assert series["1.1.1"].instance_count == 2
        assert series["1.1.1"].last_received_at == t0  # untouched by the second batch
        assert series["1.1.1"].fingerprint == fingerprint(["1.1.1.2", "1.1.1.1"])


def test_new_instance_turns_a_stable_resource_back_to_receiving(store_url: str) -> None:
    tags = {"PatientID": "P", "StudyInstanceUID": "2.1", "SeriesInstanceUID": "2.1.1"}
    with transaction(store_url) as db:
        record_instances(db, [tags | {"SOPInstanceUID": "2.1.1.1"}])
    with transaction(store_url) as db:
        for model in (Patient, Study, Series):
            for row in db.scalars(select(model)):
                row.state = "stable"
    with transaction(store_url) as db:
        record_instances(db, [tags | {"SOPInstanceUID": "2.1.1.1"}])  # known: no change
    with transaction(store_url) as db:
        assert db.scalar(select(Study.state)) == "stable"
    with transaction(store_url) as db:
        record_instances(db, [tags | {"SOPInstanceUID": "2.1.1.2"}])
    with transaction(store_url) as db:
        assert {db.scalar(select(m.state)) for m in (Patient, Study, Series)} == {"receiving"}


def test_pydicom_datasets_are_recorded_with_main_tags(store_url: str) -> None:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    with transaction(store_url) as db:
        assert record_instances(db, [dataset]).recorded == 1
    with transaction(store_url) as db:
        series = db.scalar(select(Series))
        instance = db.scalar(select(Instance))
        assert series is not None and instance is not None
        assert series.tags["Modality"] == "CT"
        assert instance.location.endswith("CT_small.dcm")
        json.dumps(instance.tags)  # JSON-safe values only


def test_numbers_json_has_not_are_left_out_and_the_instance_recorded(store_url: str) -> None:
    # PostgreSQL refused the whole batch for an infinite SliceThickness.
    import warnings

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the odd values, and keeps them
        dataset.SliceThickness = "inf"
        dataset.SpacingBetweenSlices = "-inf"
        dataset.PixelSpacing = ["nan", "0.5"]
    with transaction(store_url) as db:
        assert record_instances(db, [dataset]).recorded == 1
    with transaction(store_url) as db:
        instance = db.scalar(select(Instance))
        assert instance is not None
        tags = {**instance.series.tags, **instance.tags}
        assert "SliceThickness" not in tags and "SpacingBetweenSlices" not in tags
        json.dumps(tags, allow_nan=False)


def test_cli_ingest_prints_counts_and_reasons(env: object, tmp_path: Path) -> None:
    tmp_path = tmp_path / "incoming"
    tmp_path.mkdir()
    (tmp_path / "junk.txt").write_text("x")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "recorded 1, already known 0, not DICOM 1, rejected 0" in result.output
    assert "junk.txt" in result.output
    again = CliRunner().invoke(cli, ["ingest", str(tmp_path), "--json"])
    assert json.loads(again.output)["known"] == 1


@pytest.mark.parametrize("recursive", [False, True])
def test_cli_ingest_descends_only_with_recursive(
    env: object, tmp_path: Path, recursive: bool
) -> None:
    nested = tmp_path / "in" / "deep"
    nested.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), nested / "ct.dcm")
    args = ["ingest", str(tmp_path / "in"), "--json"] + (["--recursive"] if recursive else [])
    result = CliRunner().invoke(cli, args)
    assert json.loads(result.output)["recorded"] == (1 if recursive else 0)


def test_concurrent_ingests_into_one_series_keep_exact_counts(store_url: str) -> None:
    import threading

    base = {"PatientID": "P", "StudyInstanceUID": "3.1", "SeriesInstanceUID": "3.1.1"}

    def ingest(offset: int) -> None:
        for n in range(30):
            with transaction(store_url) as db:
                record_instances(
                    db, [base | {"SOPInstanceUID": f"3.1.1.{offset}.{n}.{k}"} for k in range(20)]
                )

    threads = [threading.Thread(target=ingest, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with transaction(store_url) as db:
        uids = list(db.scalars(select(Instance.sop_uid)))
        assert len(uids) == 2400
        for model in (Series, Study, Patient):
            row = db.scalars(select(model)).one()
            assert (row.instance_count, row.fingerprint) == (2400, fingerprint(uids))


def test_header_readers_record_what_one_process_records(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import scheduler.ingest

    incoming = tmp_path / "incoming"
    shutil.copytree(SAMPLES, incoming)
    (incoming / "notes.txt").write_text("not an image\n")
    monkeypatch.setattr(scheduler.ingest, "PARALLEL_MIN_FILES", 1)
    scope = functools.partial(transaction, store_url)
    result = ingest_paths(scope, [incoming], recursive=True, readers=2)
    reference = pydicom_reference(SAMPLES)
    assert counts(store_url) == {k: len(v) for k, v in reference.items()}
    assert result.recorded == len(reference["sops"])
    files = list(scheduler.ingest.iter_files([incoming], recursive=True))
    alone = [r for r in scheduler.ingest._read_all(files, 1) if isinstance(r, Rejection)]
    assert result.rejected == alone  # same reasons, same order
    assert "notes.txt" in {Path(r.location).name for r in alone}


def test_a_broken_reader_pool_leaves_the_rest_to_this_process(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    import scheduler.ingest

    class DyingPool:
        """Parses the first chunk, then its readers are gone."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.submitted = 0

        def submit(self, function: Any, chunk: list[Path]) -> concurrent.futures.Future[Any]:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self.submitted += 1
            if self.submitted == 1:
                future.set_result(function(chunk))
            else:
                future.set_exception(BrokenProcessPool("a reader was killed"))
            return future

        def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
            pass

    monkeypatch.setattr(scheduler.ingest, "READER_CHUNK", 2)
    monkeypatch.setattr(scheduler.ingest, "PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", DyingPool)
    scope = functools.partial(transaction, store_url)
    result = ingest_paths(scope, [SAMPLES], recursive=True, readers=2)
    assert result.recorded == len(pydicom_reference(SAMPLES)["sops"])


def test_header_readers_parse_only_a_little_ahead_of_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Readers outpace the one writer: without a bound, a large archive would be
    # parsed into memory whole before it is recorded.
    import concurrent.futures

    import scheduler.ingest

    pools: list[Any] = []

    class CountingPool:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.submitted = 0
            pools.append(self)

        def submit(self, function: Any, chunk: list[Path]) -> concurrent.futures.Future[Any]:
            self.submitted += 1
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_result(function(chunk))
            return future

        def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
            self.cancelled = cancel_futures

    monkeypatch.setattr(scheduler.ingest, "PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(scheduler.ingest, "READER_CHUNK", 1)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountingPool)
    files = [tmp_path / f"missing-{n}.dcm" for n in range(50)]
    reads = scheduler.ingest._read_all(files, readers=2)
    first = next(reads)
    assert isinstance(first, Rejection) and first.location == str(files[0])
    assert pools[0].submitted <= 4  # two chunks per reader
    reads.close()  # the writer failed: what is queued is cancelled
    assert pools[0].cancelled
    assert pools[0].submitted <= 4


def test_folders_are_walked_through_symlinks_and_odd_entries_are_reported(tmp_path: Path) -> None:
    import os
    import shutil

    from pydicom.data import get_testdata_file

    import scheduler.ingest

    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    top, elsewhere = tmp_path / "top", tmp_path / "elsewhere"
    top.mkdir()
    elsewhere.mkdir()
    shutil.copyfile(source, elsewhere / "1.dcm")
    (top / "linked").symlink_to(elsewhere, target_is_directory=True)
    (top / "loop").symlink_to(top, target_is_directory=True)  # must not walk forever
    (top / "dangling.dcm").symlink_to(tmp_path / "gone.dcm")
    os.mkfifo(top / "pipe.dcm")
    found = list(scheduler.ingest.iter_files([top], recursive=True))
    files = [f for f in found if isinstance(f, Path)]
    problems = {Path(r.location).name: r for r in found if isinstance(r, Rejection)}
    assert [f.name for f in files] == ["1.dcm"]
    assert problems["dangling.dcm"].reason == "broken symlink"
    assert problems["pipe.dcm"].reason.startswith("not a regular file")
    assert all(r.unreadable for r in problems.values())


def test_a_path_that_cannot_even_be_looked_at_is_reported(tmp_path: Path) -> None:
    import scheduler.ingest

    [rejection] = list(scheduler.ingest.iter_files([tmp_path / ("a" * 300)], recursive=False))
    assert isinstance(rejection, Rejection) and rejection.unreadable
    assert "File name too long" in rejection.reason


def test_a_tree_deeper_than_pythons_recursion_limit_is_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import sys

    import scheduler.ingest

    monkeypatch.chdir(tmp_path)
    depth = sys.getrecursionlimit() + 100
    for _ in range(depth):
        os.mkdir("d")
        os.chdir("d")
    Path("x.dcm").write_text("not really")
    try:
        monkeypatch.chdir(tmp_path)
        [found] = list(scheduler.ingest.iter_files([tmp_path], recursive=True))
        assert isinstance(found, Path) and found.name == "x.dcm"
        assert len(found.relative_to(tmp_path).parts) == depth + 1
    finally:  # pytest's own clean-up recurses once per level: take it down here
        os.chdir(tmp_path / ("d/" * depth))
        os.remove("x.dcm")
        for _ in range(depth):
            os.chdir("..")
            os.rmdir("d")
        monkeypatch.chdir(tmp_path)
