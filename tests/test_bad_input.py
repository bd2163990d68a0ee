"""Bad input (README, "Failure modes"): a clear message where the operator looks; the rest keeps working."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from scheduler.ingest import fingerprint, ingest_paths, record_instances
from scheduler.store.db import transaction
from scheduler.store.models import Instance, Patient, Series, Study
from workers_bridge.process import OUTPUT_TAIL_BYTES, execute

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_truncated_dicom_is_rejected_with_its_reason_and_the_batch_goes_on(
    store_url: str, tmp_path: Path
) -> None:
    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[:400])  # cut inside the header
    (tmp_path / "whole.dcm").write_bytes(data)
    result = ingest_paths(
        functools.partial(transaction, store_url),
        [tmp_path / "truncated.dcm", tmp_path / "whole.dcm"],
    )
    assert result.recorded == 1
    [rejection] = result.rejected
    assert rejection.location.endswith("truncated.dcm")
    assert rejection.reason.startswith(("missing", "unreadable DICOM", "not DICOM"))


def test_a_file_cut_inside_its_pixel_data_is_rejected_as_truncated(
    store_url: str, tmp_path: Path
) -> None:
    # The header reads whole, so such a file was recorded as an instance.
    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "cut.dcm").write_bytes(data[:20_000])  # pixel data is 32,768 bytes from 6,300
    (folder / "pydicoms-own.dcm").write_bytes(
        Path(str(get_testdata_file("MR_truncated.dcm"))).read_bytes()
    )
    kept = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg.dcm", "JPEG2000.dcm", "rtplan.dcm"]
    for name in kept:  # whole files: native, compressed, written oddly, without pixel data
        (folder / name).write_bytes(Path(str(get_testdata_file(name))).read_bytes())
    result = ingest_paths(functools.partial(transaction, store_url), [folder])
    reasons = {Path(r.location).name: r.reason for r in result.rejected}
    assert reasons == {
        "cut.dcm": "truncated: the file ends 19068 bytes before the end of its pixel data",
        "pydicoms-own.dcm": "truncated: the file ends 62 bytes before the end of its pixel data",
    }
    assert result.recorded == len(kept)


def test_non_ascii_and_very_long_values_are_recorded_safely(store_url: str, tmp_path: Path) -> None:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientName = "Müller^Jürgen=山田^太郎"
    dataset.StudyDescription = "x" * 5000
    dataset.SeriesDescription = "contrast\x00\x00"
    dataset.save_as(tmp_path / "unicode.dcm")
    assert ingest_paths(functools.partial(transaction, store_url), [tmp_path]).recorded == 1
    with transaction(store_url) as db:
        patient = db.scalars(select(Patient)).one()
        study = db.scalars(select(Study)).one()
        series = db.scalars(select(Series)).one()
        assert patient.tags["PatientName"] == "Müller^Jürgen=山田^太郎"
        assert len(study.tags["StudyDescription"]) == 1024  # cut, not rejected
        assert series.tags["SeriesDescription"] == "contrast"
        json.dumps(study.tags, ensure_ascii=False)


def test_ten_thousand_instances_in_one_series(store_url: str) -> None:
    base = {"PatientID": "BIG", "StudyInstanceUID": "9.9", "SeriesInstanceUID": "9.9.1"}
    uids = [f"9.9.1.{n}" for n in range(10_000)]
    for start in range(0, len(uids), 1000):
        with transaction(store_url) as db:
            record_instances(
                db,
                [
                    base | {"SOPInstanceUID": uid, "location": f"/big/{uid}.dcm"}
                    for uid in uids[start : start + 1000]
                ],
            )
    with transaction(store_url) as db:
        series = db.scalars(select(Series)).one()
        assert series.instance_count == 10_000
        assert series.fingerprint == fingerprint(uids)
        assert db.scalars(select(Study.instance_count)).one() == 10_000
        assert len(list(db.scalars(select(Instance.id)))) == 10_000


def attempt(params: dict[str, Any], timeout: float = 30) -> Any:
    request = {
        "entry": "dcm_testjobs:work",
        "roots": [str(FIXTURES)],
        "job_name": "bad",
        "headers": {},
        "params": params,
        "added_params": {},
        "kwargs": {},
    }
    return execute(request, timeout=timeout)


def test_a_worker_returning_something_not_json_fails_with_a_clear_error() -> None:
    outcome = attempt({"not_json": True})
    assert not outcome.ok
    assert outcome.error.startswith("worker returned a value that is not JSON-serialisable (dict)")


def test_a_worker_calling_sys_exit_fails_the_attempt_not_the_worker() -> None:
    outcome = attempt({"exit": 3})
    assert (outcome.ok, outcome.error) == (False, "worker called sys.exit(3)")


def test_a_worker_printing_megabytes_keeps_only_a_bounded_tail() -> None:
    outcome = attempt({"print_bytes": 5_000_000, "raise": "after printing"})
    assert outcome.error.startswith("ValueError: after printing")
    assert "last line of output" in outcome.error
    assert "earlier bytes cut" in outcome.error
    assert len(outcome.error) < OUTPUT_TAIL_BYTES + 4000


def test_a_worker_printing_megabytes_still_succeeds() -> None:
    outcome = attempt({"print_bytes": 5_000_000, "value": 7})
    assert outcome.ok and outcome.result["value"] == 7


def test_a_worker_whose_entry_does_not_import_fails_with_the_reason() -> None:
    request = {
        "entry": "dcm_testjobs_missing:work",
        "roots": [str(FIXTURES)],
        "job_name": "x",
        "headers": {},
        "params": {},
        "added_params": {},
        "kwargs": {},
    }
    outcome = execute(request, timeout=30)
    assert outcome.error.startswith("cannot import workerEntry 'dcm_testjobs_missing:work'")


@pytest.mark.parametrize(
    "entry", ["os:system", "subprocess:run", "../outside:work", "os.path.join"]
)
def test_entries_outside_their_service_folder_are_rejected_at_validation(
    entry: str, tmp_path: Path
) -> None:
    from scheduler.registry import load_registry

    service = tmp_path / "svc"
    (service / "svc_pkg").mkdir(parents=True)
    (service / "svc_pkg" / "__init__.py").write_text("def work(*a, **k):\n    return 1\n")
    (service / "dcm-processor.json").write_text(
        json.dumps({"name": "svc", "jobs": [{"jobName": "j", "workerEntry": entry}]})
    )
    registry = load_registry([tmp_path])
    assert not registry.ok
    assert any("outside its service folder" in str(p) for p in registry.problems), registry.problems
