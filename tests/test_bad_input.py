"""Bad input (README, "Failure modes"): a clear message where the operator looks; the rest keeps working."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from sqlalchemy import select

from scheduler.dicom import NotDicomError, read_header
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


# pydicom's samples in each transfer syntax: explicit and implicit little
# endian, big endian, and compressed (encapsulated) pixel data.
CUT_SAMPLES = [
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG2000.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "SC_rgb_rle.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_rle_2frame.dcm",  # a Basic Offset Table: the check jumps to the last frame
    "liver_expb_1frame.dcm",
]


def cuts(path: Path) -> dict[str, int]:
    """Where to cut a sample: in its header and all through its pixel data."""
    data = path.read_bytes()
    with path.open("rb") as file:
        dataset = pydicom.dcmread(file, stop_before_pixels=True)
        pixels = file.tell()  # the reader stops at the pixel data's tag
    # The middle of the longest value in the header (raw elements know where they are).
    longest = max(
        (dataset.get_item(tag) for tag in dataset.keys()),  # noqa: SIM118 - keeps them raw
        key=lambda e: e.length if isinstance(e, RawDataElement) and e.length != 0xFFFFFFFF else 0,
    )
    # Where the pixel data ends: before the Data Set Trailing Padding element
    # some writers add after it, which may be cut (the image is whole).
    trailer = data.rfind(
        b"\xfc\xff\xfc\xff" if dataset.original_encoding[1] else b"\xff\xfc\xff\xfc"
    )
    end = trailer if trailer > pixels else len(data)
    found = {
        "inside a header value": longest.value_tell + longest.length // 2,
        "inside an element's tag": pixels - 6,
        "inside the pixel data's tag": pixels + 2,
        "inside the pixel data's header": pixels + 10,
        "after a quarter of the pixel data": pixels + (len(data) - pixels) // 4,
        "halfway through the pixel data": pixels + (len(data) - pixels) // 2,
        "one byte short": end - 1,
        "eight bytes short": end - 8,
    }
    delimiter = data.rfind(
        b"\xfe\xff\xdd\xe0" if dataset.original_encoding[1] else b"\xff\xfe\xe0\xdd"
    )
    if dataset.file_meta.TransferSyntaxUID.is_encapsulated:
        found["before the sequence delimiter"] = delimiter
        found["inside the sequence delimiter"] = delimiter + 5
    return found


@pytest.mark.parametrize("sample", CUT_SAMPLES)
def test_a_file_cut_anywhere_is_rejected_as_truncated_and_its_whole_copy_is_recorded(
    store_url: str, tmp_path: Path, sample: str
) -> None:
    # The header read stops before the pixel data and pydicom reads a file
    # that ends early as if it ended there: such files were recorded.
    data = Path(str(get_testdata_file(sample))).read_bytes()
    where = cuts(Path(str(get_testdata_file(sample))))
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name, at in where.items():
        (folder / f"{name}.dcm").write_bytes(data[:at])
    (folder / "whole.dcm").write_bytes(data)
    result = ingest_paths(functools.partial(transaction, store_url), [folder])
    reasons = {Path(r.location).stem: r.reason for r in result.rejected}
    assert sorted(reasons) == sorted(where)
    assert all(r.startswith("truncated: the file ends ") for r in reasons.values()), reasons
    assert result.recorded == 1
    with transaction(store_url) as db:
        assert db.scalars(select(Instance.location)).one().endswith("whole.dcm")


def test_truncation_reasons_say_where_the_file_ends(tmp_path: Path) -> None:
    data = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))).read_bytes()
    pixels = data.find(b"\xe0\x7f\x10\x00")
    delimiter = data.rfind(b"\xfe\xff\xdd\xe0")
    reasons = {}
    for name, at in {
        "tag": pixels + 2,
        "fragment": pixels + 1000,
        "delimiter": delimiter,
        "skipped value": 650,  # (0008,2111) Derivation Description, from 608 to 694
        "sequence": 800,  # (0008,2112) Source Image Sequence, from 706 to 898
        "read value": 1300,  # (0020,4000) Image Comments, from 1236 to 1504
    }.items():
        (tmp_path / name).write_bytes(data[:at])
        with pytest.raises(NotDicomError) as raised:
            read_header(tmp_path / name)
        reasons[name] = raised.value.reason
    assert reasons == {
        "tag": "truncated: the file ends inside an element's tag",
        "fragment": "truncated: the file ends 756 bytes before the end of an item of its pixel data",
        "delimiter": "truncated: the file ends before the delimiter that ends its pixel data",
        "skipped value": "truncated: the file ends 44 bytes before the end of element (0008,2111)",
        "sequence": "truncated: the file ends 98 bytes before the end of element (0008,2112)",
        "read value": "truncated: the file ends 204 bytes before the end of element (0020,4000)",
    }


@pytest.mark.parametrize("sample", ["CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "rtplan.dcm"])
def test_a_whole_file_with_trailing_padding_is_recorded(tmp_path: Path, sample: str) -> None:
    # Copy tools and media pad files: a sector's zeros, a space, a newline.
    data = Path(str(get_testdata_file(sample))).read_bytes()
    for name, tail in {
        "one zero": b"\0",
        "seven zeros": b"\0" * 7,
        "a hundred zeros": b"\0" * 100,
        "to a sector": b"\0" * (2048 - len(data) % 2048),
        "a space": b" ",
        "a newline": b"\r\n",
    }.items():
        (tmp_path / name).write_bytes(data + tail)
        assert read_header(tmp_path / name).sop_uid  # no NotDicomError


def test_bytes_after_the_pixel_data_that_are_no_element_are_refused(tmp_path: Path) -> None:
    # pydicom reads CT_small followed by 0xFF bytes as an empty data set:
    # every worker would find nothing in it.
    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    (tmp_path / "garbage.dcm").write_bytes(data + b"\xff" * 16)
    assert len(pydicom.dcmread(tmp_path / "garbage.dcm")) == 0
    with pytest.raises(NotDicomError) as raised:
        read_header(tmp_path / "garbage.dcm")
    assert raised.value.reason.startswith("truncated: the file ends ")
    assert "(FFFF,FFFF)" in raised.value.reason


def test_a_file_cut_after_its_pixel_data_is_recorded(tmp_path: Path) -> None:
    # CT_small ends with a Data Set Trailing Padding element after its pixel
    # data: losing part of it loses nothing of the image.
    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    assert data.rfind(b"\xfc\xff\xfc\xff") > data.find(b"\xe0\x7f\x10\x00")
    for short in (1, 8, 100):
        (tmp_path / f"{short}.dcm").write_bytes(data[:-short])
        assert read_header(tmp_path / f"{short}.dcm").sop_uid


def test_values_with_twelve_byte_headers_are_walked_as_such(tmp_path: Path) -> None:
    # SV and UV elements have a 12-byte header, as OB or UN do: read as 8
    # bytes, everything after them looked cut short.
    dataset = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    dataset.add_new(0x00720082, "SV", [-5, 6])
    dataset.add_new(0x0072007F, "UV", [7])
    dataset.save_as(tmp_path / "sv-uv.dcm")
    assert read_header(tmp_path / "sv-uv.dcm").sop_uid


def test_an_image_without_pixel_data_is_recorded(store_url: str, tmp_path: Path) -> None:
    # A file cut exactly where its pixel data begins reads as an image
    # written headers-only on purpose (pydicom's dicomdirtests images are):
    # its bytes cannot tell the two apart, and a whole file is never refused.
    data = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))).read_bytes()
    (tmp_path / "headers.dcm").write_bytes(data[: data.find(b"\xe0\x7f\x10\x00")])
    result = ingest_paths(functools.partial(transaction, store_url), [tmp_path / "headers.dcm"])
    assert (result.recorded, result.rejected) == (1, [])


@pytest.mark.parametrize("sample", ["rtplan.dcm", "test-SR.dcm", "rtdose.dcm", "rtstruct.dcm"])
def test_objects_that_may_have_no_pixel_data_are_recorded_whole(
    store_url: str, tmp_path: Path, sample: str
) -> None:
    (tmp_path / sample).write_bytes(Path(str(get_testdata_file(sample))).read_bytes())
    result = ingest_paths(functools.partial(transaction, store_url), [tmp_path / sample])
    assert (result.recorded, result.rejected) == (1, [])


def test_a_whole_copy_arriving_after_a_truncated_one_is_recorded(
    store_url: str, tmp_path: Path
) -> None:
    data = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))).read_bytes()
    (tmp_path / "partial").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "partial" / "1.dcm").write_bytes(data[: len(data) * 3 // 4])
    (tmp_path / "full" / "1.dcm").write_bytes(data)
    scope = functools.partial(transaction, store_url)
    assert ingest_paths(scope, [tmp_path / "partial"]).recorded == 0
    assert ingest_paths(scope, [tmp_path / "full"]).recorded == 1
    with transaction(store_url) as db:
        assert db.scalars(select(Instance.location)).one() == str(tmp_path / "full" / "1.dcm")


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


def test_an_offset_table_pointing_into_a_fragment_does_not_make_a_whole_file_cut(
    tmp_path: Path,
) -> None:
    # The check jumps to the last frame the Basic Offset Table names; when
    # the table is wrong and lands on bytes that read as an item of a huge
    # length, the whole file is walked item by item instead.
    import struct

    data = bytearray(Path(str(get_testdata_file("SC_rgb_rle_2frame.dcm"))).read_bytes())
    pixels = data.find(b"\xe0\x7f\x10\x00")
    table = pixels + 12  # the first item: the offset table
    (table_length,) = struct.unpack("<I", data[table + 4 : table + 8])
    first = table + 8 + table_length  # the first fragment's item
    inside = first + 8 + 64  # inside its data
    data[inside : inside + 8] = b"\xfe\xff\x00\xe0" + struct.pack("<I", 0x7FFFFFF0)
    data[table + 8 + table_length - 4 : table + 8 + table_length] = struct.pack(
        "<I", inside - first
    )
    (tmp_path / "misleading.dcm").write_bytes(bytes(data))
    assert read_header(tmp_path / "misleading.dcm").sop_uid
