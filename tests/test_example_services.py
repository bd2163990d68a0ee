"""The example services (README, "Writing a service") on real DICOM files shipped by pydicom.

Each service is imported the way the scheduler does it: its folder on
``sys.path`` and its entries resolved from ``dcm-processor.json``. The sample
files are copied into one study of one patient with identifying values the
anonymizer must remove and markup the report must escape.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

try:  # tests/ may or may not become a package; the helper is found either way
    from tests.example_headers import headers_from_files
except ImportError:
    from example_headers import headers_from_files

# test-SR.dcm ships a UID with a leading-zero component; pydicom warns on reading it.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")

SERVICES_DIR = Path(__file__).resolve().parent.parent / "examples" / "services"
SERVICE_FOLDERS = ("anonymize", "thumbnails", "study-report", "archive")

PATIENT_ID = "PID-0042-SECRET"
PATIENT_NAME = "O'Neil^Ann <b>"
BIRTH_DATE = "19700101"
STUDY_UID = generate_uid(entropy_srcs=["example-services-study"])
CT_DESCRIPTION = "Head & Neck <axial>"
# Values planted in every file that must not survive anonymization.
IDENTIFYING_BYTES = (b"PID-0042", b"O'Neil", b"OTHER-77", b"St. Elsewhere", b"House^Gregory")

# Series of the sample study: name -> (pydicom test file per instance, in the
# order they are written). InstanceNumbers follow the list, except for "ct",
# written out of order to show that the headers sort them.
SAMPLE_SERIES: dict[str, list[str]] = {
    "ct": ["CT_small.dcm", "CT_small.dcm", "CT_small.dcm"],
    "mr_middle_undecodable": [
        "MR_small.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small.dcm",
    ],
    "rtdose_multiframe": ["rtdose.dcm"],
    "rgb": ["examples_rgb_color.dcm"],
    "rgb_multiframe": ["SC_rgb_rle_2frame.dcm"],
    "ybr_multiframe": ["examples_ybr_color.dcm"],
    "undecodable": ["MR_small_jpeg_ls_lossless.dcm"],
    "sr": ["test-SR.dcm"],
}
CT_INSTANCE_NUMBERS = (3, 1, 2)
IMAGE_SERIES = [name for name in SAMPLE_SERIES if name != "sr"]
RENDERED_SERIES = [n for n in IMAGE_SERIES if n != "undecodable"]


# --- fixtures and helpers ---------------------------------------------------


@pytest.fixture
def services(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every example service folder on sys.path, as the scheduler resolves entries."""
    for folder in SERVICE_FOLDERS:
        monkeypatch.syspath_prepend(str(SERVICES_DIR / folder))


def definition(folder: str) -> dict[str, Any]:
    return json.loads((SERVICES_DIR / folder / "dcm-processor.json").read_text())


def entry(folder: str, key: str = "workerEntry") -> Callable[..., Any]:
    """The callable named by the service's only job, resolved like the scheduler does."""
    module_name, _, function = definition(folder)["jobs"][0][key].partition(":")
    return getattr(importlib.import_module(module_name), function)


def sample_file(name: str) -> str:
    """Path of a test file shipped inside pydicom (never downloaded)."""
    path = get_testdata_file(name)
    assert isinstance(path, str), f"pydicom does not ship {name}"
    return path


def series_uid(name: str) -> str:
    return generate_uid(entropy_srcs=["example-services-series", name])


def write_sample(source: str, target: Path, series: str, number: int) -> Path:
    """Copy a pydicom test file into the sample study with planted identifying values."""
    ds = pydicom.dcmread(sample_file(source))
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.OtherPatientIDs = "OTHER-77"
    ds.PatientAddress = "1 Main Street, Springfield"
    ds.InstitutionName = "St. Elsewhere"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.AccessionNumber = "ACC-991"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid(series)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["example-services", series, str(number)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    ds.SeriesNumber = list(SAMPLE_SERIES).index(series) + 1
    ds.private_block(0x0011, "EXAMPLE SITE", create=True).add_new(0x01, "LO", "private note")
    if series == "ct":
        ds.SeriesDescription = CT_DESCRIPTION
        # Distinct pixels per instance, so the test can tell which one was used.
        ds.PixelData = np.roll(ds.pixel_array, 20 * number, axis=1).tobytes()
    ds.save_as(target)
    return target


@pytest.fixture
def sample_study(tmp_path: Path) -> dict[str, list[Path]]:
    """Series name -> files of one study of one patient, in an incoming folder."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    study: dict[str, list[Path]] = {}
    for series, sources in SAMPLE_SERIES.items():
        numbers = CT_INSTANCE_NUMBERS if series == "ct" else range(1, len(sources) + 1)
        study[series] = [
            write_sample(source, incoming / f"{series}-{number}.dcm", series, number)
            for source, number in zip(sources, numbers, strict=True)
        ]
    return study


@pytest.fixture
def study_headers(sample_study: dict[str, list[Path]]) -> dict[str, Any]:
    return headers_from_files([p for paths in sample_study.values() for p in paths])


@pytest.fixture
def session_dir(tmp_path: Path) -> Path:
    path = tmp_path / "session"
    path.mkdir()
    return path


def job_kwargs(session_dir: Path, job_name: str, **extra: Any) -> dict[str, Any]:
    """The kwargs the workers bridge passes (README, "The worker"), output_dir already created."""
    output_dir = session_dir / job_name
    output_dir.mkdir(parents=True, exist_ok=True)
    return {
        "job_id": f"job-{job_name}",
        "session_id": "s-1",
        "event": "study.stable",
        "level": "study",
        "uid": STUDY_UID,
        "revision": 1,
        "session_dir": str(session_dir),
        "output_dir": str(output_dir),
        "results": {},
        **extra,
    }


def callback_kwargs(session_dir: Path, job_name: str) -> dict[str, Any]:
    """The kwargs the planner passes to a callback (no folder is created)."""
    return {
        "event": "study.stable",
        "session_id": "s-1",
        "level": "study",
        "uid": STUDY_UID,
        "revision": 1,
        "session_dir": str(session_dir),
        "output_dir": str(session_dir / job_name),
    }


def run_thumbnails(headers: dict[str, Any], session_dir: Path) -> dict[str, Any]:
    return entry("thumbnails")(
        "thumbnails", headers, {}, {}, **job_kwargs(session_dir, "thumbnails")
    )


def run_report(headers: dict[str, Any], session_dir: Path, thumbnails: Any) -> dict[str, Any]:
    kwargs = job_kwargs(session_dir, "study-report", results={"thumbnails": thumbnails})
    return entry("study-report")("study-report", headers, {}, {}, **kwargs)


def uri_only(headers: dict[str, Any]) -> dict[str, Any]:
    """The same headers with every instance known only as an Orthanc URI."""
    copy = json.loads(json.dumps(headers))
    for series in copy["series"]:
        for position, instance in enumerate(series["instances"]):
            instance["location"] = f"orthanc://instances/{position}"
    return copy


# --- definitions --------------------------------------------------------------


@pytest.mark.parametrize("folder", SERVICE_FOLDERS)
def test_every_definition_names_a_channel_timeout_description_and_resolvable_entries(
    services: None, folder: str
) -> None:
    service = definition(folder)
    assert service["name"] == folder and service["version"]
    for job in service["jobs"]:
        assert job["jobName"] == folder
        assert job["channel"] == "default" and job["timeout"] and job["description"]
        for key in ("workerEntry", "registryEntry"):
            if key in job:
                module_name, _, function = job[key].partition(":")
                assert callable(getattr(importlib.import_module(module_name), function))


def test_service_package_names_are_unique_and_prefixed() -> None:
    packages = [
        child.name
        for folder in SERVICE_FOLDERS
        for child in (SERVICES_DIR / folder).iterdir()
        if (child / "__init__.py").is_file()
    ]
    assert len(packages) == len(set(packages)) == len(SERVICE_FOLDERS)
    assert all(name.startswith("dcm_") for name in packages)


def test_headers_list_instances_by_instance_number(study_headers: dict[str, Any]) -> None:
    ct = next(s for s in study_headers["series"] if s["SeriesInstanceUID"] == series_uid("ct"))
    assert [i["InstanceNumber"] for i in ct["instances"]] == ["1", "2", "3"]
    assert study_headers["instance_count"] == sum(len(v) for v in SAMPLE_SERIES.values())


# --- anonymize ----------------------------------------------------------------


def test_anonymize_callback_schedules_only_when_an_instance_is_a_local_file(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    callback = entry("anonymize", "registryEntry")
    kwargs = callback_kwargs(session_dir, "anonymize")
    scheduled = callback("anonymize", study_headers, {}, {}, **kwargs)
    assert scheduled == (True, {"readableFiles": study_headers["instance_count"]})
    assert callback("anonymize", uri_only(study_headers), {}, {}, **kwargs) is False


def anonymize(headers: dict[str, Any], session_dir: Path, **params: Any) -> dict[str, Any]:
    kwargs = job_kwargs(session_dir, "anonymize")
    return entry("anonymize")("anonymize", headers, params, {}, **kwargs)


def test_anonymized_copies_carry_no_patient_identity(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    from dcm_anonymize.deidentify import pseudonym

    result = anonymize(study_headers, session_dir)
    outputs = sorted(Path(result["output"]).rglob("*.dcm"))
    assert result["files"] == len(outputs) == study_headers["instance_count"]
    for path in outputs:
        raw = path.read_bytes()
        assert not [marker for marker in IDENTIFYING_BYTES if marker in raw], path
        ds = pydicom.dcmread(path)
        assert ds.PatientID == pseudonym(PATIENT_ID) == ds.PatientName
        assert not ds.get("PatientBirthDate")
        assert "InstitutionName" not in ds and "OtherPatientIDs" not in ds
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
        assert not [elem for elem in ds if elem.tag.is_private]


def test_anonymize_remaps_uids_consistently_and_deterministically(
    services: None, study_headers: dict[str, Any], tmp_path: Path
) -> None:
    first = anonymize(study_headers, tmp_path / "first")
    second = anonymize(study_headers, tmp_path / "second")
    assert first["series"] == second["series"]  # same original, same new UID
    new_ct_series = first["series"][series_uid("ct")]
    assert new_ct_series.startswith("2.25.") and new_ct_series != series_uid("ct")

    ct_files = sorted((Path(first["output"]) / new_ct_series).glob("*.dcm"))
    assert len(ct_files) == 3
    studies = set()
    for path in Path(first["output"]).rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        studies.add(ds.StudyInstanceUID)
        assert path.parent.name == ds.SeriesInstanceUID
        assert path.stem == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert len(studies) == 1 and STUDY_UID not in studies


def test_anonymize_remaps_instance_uids_but_keeps_class_and_coding_scheme_uids(
    services: None,
) -> None:
    from dcm_anonymize.deidentify import Profile, deidentify, remap_uid
    from pydicom.dataset import Dataset

    private_class, scheme = "1.3.46.670589.11.0.0.12.1", "1.2.3.4.5.99"
    reference = Dataset()
    reference.ReferencedSOPClassUID = private_class
    reference.ReferencedSOPInstanceUID = "1.2.3.4.5.6"
    code = Dataset()
    code.CodingSchemeUID = scheme
    ds = Dataset()
    ds.SOPClassUID = private_class
    ds.SOPInstanceUID = "1.2.3.4.5.6"
    ds.ReferencedImageSequence = [reference]
    ds.ConceptNameCodeSequence = [code]
    ds.OperatorsName = "Tech^Tom"

    deidentify(ds, Profile(salt="site-secret"))

    assert ds.SOPClassUID == private_class == ds.ReferencedImageSequence[0].ReferencedSOPClassUID
    assert ds.ConceptNameCodeSequence[0].CodingSchemeUID == scheme
    assert ds.SOPInstanceUID == remap_uid("1.2.3.4.5.6", "site-secret")
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert len(ds.SOPInstanceUID) <= 64 and ds.OperatorsName == ""


def test_anonymized_copy_keeps_sop_class_and_pixels(
    services: None, sample_study: dict[str, list[Path]], session_dir: Path
) -> None:
    original = pydicom.dcmread(sample_study["ct"][0])
    result = anonymize(headers_from_files(sample_study["ct"][:1]), session_dir)
    (copy_path,) = Path(result["output"]).rglob("*.dcm")
    copy = pydicom.dcmread(copy_path)
    assert copy.SOPClassUID == original.SOPClassUID
    assert np.array_equal(copy.pixel_array, original.pixel_array)


def test_anonymize_reports_uri_instances_as_skipped_and_fails_with_no_local_file(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    from dcm_anonymize.worker import NothingAnonymizedError

    mixed = json.loads(json.dumps(study_headers))
    mixed["series"][0]["instances"].append({"location": "orthanc://instances/extra"})
    result = anonymize(mixed, session_dir)
    assert result["skipped"] == [
        {"location": "orthanc://instances/extra", "reason": "not a readable location"}
    ]
    with pytest.raises(NothingAnonymizedError, match="no file could be anonymized"):
        anonymize(uri_only(study_headers), session_dir)


# --- thumbnails ---------------------------------------------------------------


def test_thumbnails_callback_schedules_image_series_and_returns_their_png_paths(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    callback = entry("thumbnails", "registryEntry")
    scheduled, added = callback(
        "thumbnails", study_headers, {}, {}, **callback_kwargs(session_dir, "thumbnails")
    )
    assert scheduled is True
    expected = {
        series_uid(name): str(session_dir / "thumbnails" / f"{series_uid(name)}.png")
        for name in IMAGE_SERIES
    }
    assert added == {"outputs": expected}
    assert not (session_dir / "thumbnails").exists()  # callbacks write nothing


def test_thumbnails_callback_refuses_a_candidate_without_image_series(
    services: None, session_dir: Path
) -> None:
    files = [sample_file("test-SR.dcm"), sample_file("rtplan.dcm")]
    headers = headers_from_files(files)
    callback = entry("thumbnails", "registryEntry")
    kwargs = callback_kwargs(session_dir, "thumbnails")
    assert callback("thumbnails", headers, {}, {}, **kwargs) is False


@pytest.mark.parametrize(
    ("modality", "is_image"),
    [("CT", True), ("RTDOSE", True), ("SEG", True), (None, True), ("sr", False)]
    + [(m, False) for m in ("KO", "PR", "RTSTRUCT", "RTPLAN", "ECG", "DOC")],
)
def test_image_series_rule_is_a_deny_list_of_non_image_modalities(
    services: None, modality: str | None, is_image: bool
) -> None:
    from dcm_thumbnails.registry import is_image_series

    series: dict[str, Any] = {"SeriesInstanceUID": "1.2.3", "instances": [{"location": "/x"}]}
    if modality is not None:
        series["Modality"] = modality
    assert is_image_series(series) is is_image


def assert_real_thumbnail(path: str, mode: str | None = None) -> Image.Image:
    with Image.open(path) as image:
        image.load()
    assert image.format == "PNG"
    assert max(image.size) <= 256
    low_high = image.getextrema()
    bands = low_high if isinstance(low_high[0], tuple) else (low_high,)
    assert any(low < high for low, high in bands), f"{path} is uniform"
    if mode is not None:
        assert image.mode == mode
    return image


def test_thumbnails_worker_writes_small_non_uniform_pngs_for_every_decodable_series(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    result = run_thumbnails(study_headers, session_dir)
    assert set(result["thumbnails"]) == {series_uid(name) for name in RENDERED_SERIES}
    for name in RENDERED_SERIES:
        path = result["thumbnails"][series_uid(name)]
        assert path == str(session_dir / "thumbnails" / f"{series_uid(name)}.png")
        assert_real_thumbnail(path, mode="RGB" if "rgb" in name or "ybr" in name else "L")
    # 320x240 RGB is shrunk to fit 256 px, keeping its aspect ratio.
    assert assert_real_thumbnail(result["thumbnails"][series_uid("rgb")]).size == (256, 192)


def test_thumbnail_is_made_from_the_middle_instance_by_instance_number(
    services: None, sample_study: dict[str, list[Path]], session_dir: Path
) -> None:
    from dcm_thumbnails.render import render

    result = run_thumbnails(headers_from_files(sample_study["ct"]), session_dir)
    thumbnail = np.asarray(Image.open(result["thumbnails"][series_uid("ct")]))
    by_number = dict(zip(CT_INSTANCE_NUMBERS, sample_study["ct"], strict=True))
    assert np.array_equal(thumbnail, np.asarray(render(str(by_number[2]))))
    assert not np.array_equal(thumbnail, np.asarray(render(str(by_number[1]))))


def test_thumbnail_falls_back_to_another_instance_when_the_middle_cannot_be_decoded(
    services: None, sample_study: dict[str, list[Path]], session_dir: Path
) -> None:
    headers = headers_from_files(sample_study["mr_middle_undecodable"])
    result = run_thumbnails(headers, session_dir)
    assert_real_thumbnail(result["thumbnails"][series_uid("mr_middle_undecodable")])
    assert result["skipped"] == {}


def test_series_that_cannot_be_decoded_is_reported_as_skipped(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    result = run_thumbnails(study_headers, session_dir)
    undecodable = series_uid("undecodable")
    assert undecodable not in result["thumbnails"]
    assert "cannot decode pixel data" in result["skipped"][undecodable]
    assert not (session_dir / "thumbnails" / f"{undecodable}.png").exists()


def test_thumbnails_worker_fails_only_when_nothing_can_be_produced(
    services: None, sample_study: dict[str, list[Path]], session_dir: Path
) -> None:
    from dcm_thumbnails.worker import NoThumbnailError

    with pytest.raises(NoThumbnailError, match="no thumbnail could be produced"):
        run_thumbnails(headers_from_files(sample_study["undecodable"]), session_dir)


def test_monochrome1_is_shown_inverted(services: None) -> None:
    from dcm_thumbnails.render import read_middle_frame, to_uint8

    frame, ds = read_middle_frame(sample_file("CT_small.dcm"))
    normal = to_uint8(frame, ds)
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(to_uint8(frame, ds), 255 - normal)


# --- study-report -------------------------------------------------------------


def test_study_report_lists_each_series_and_links_its_thumbnail(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    thumbnails = run_thumbnails(study_headers, session_dir)
    result = run_report(study_headers, session_dir, thumbnails)
    report = session_dir / "study-report" / f"{STUDY_UID}.html"
    assert result == {"reports": [str(report)]}
    page = report.read_text(encoding="utf-8")

    rows = re.findall(r"<tr><td>(\d+)</td><td>([^<]*)</td>", page)
    assert [int(number) for number, _ in rows] == list(range(1, len(SAMPLE_SERIES) + 1))
    assert {modality for _, modality in rows} >= {"CT", "MR", "RTDOSE", "SR"}
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == sorted(f"../thumbnails/{series_uid(n)}.png" for n in RENDERED_SERIES)
    assert all((report.parent / source).is_file() for source in sources)
    assert "cannot decode pixel data" in page  # the skipped series says why


def test_study_report_escapes_every_header_value(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    run_report(study_headers, session_dir, run_thumbnails(study_headers, session_dir))
    page = (session_dir / "study-report" / f"{STUDY_UID}.html").read_text(encoding="utf-8")
    assert "Head &amp; Neck &lt;axial&gt;" in page and "<axial>" not in page
    assert "O&#x27;Neil^Ann &lt;b&gt;" in page and "<b>" not in page


def test_study_report_without_thumbnail_result_still_lists_the_series(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    run_report(study_headers, session_dir, thumbnails=None)
    page = (session_dir / "study-report" / f"{STUDY_UID}.html").read_text(encoding="utf-8")
    assert "<img" not in page
    assert len(re.findall(r"<tr><td>\d+</td>", page)) == len(SAMPLE_SERIES)


# --- archive ------------------------------------------------------------------


def test_archive_zips_the_other_outputs_and_its_checksum_matches(
    services: None, study_headers: dict[str, Any], session_dir: Path
) -> None:
    anonymize(study_headers, session_dir)
    run_report(study_headers, session_dir, run_thumbnails(study_headers, session_dir))
    outcomes = {"anonymize": "succeeded", "thumbnails": "succeeded", "study-report": "succeeded"}
    kwargs = job_kwargs(session_dir, "archive", outcomes=outcomes)
    (session_dir / "archive" / "leftover.txt").write_text("not archived")

    result = entry("archive")("archive", study_headers, {}, {}, **kwargs)

    archive = Path(result["path"])
    assert archive == session_dir / "archive" / "session-s-1.zip"
    assert result["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert result["outcomes"] == outcomes
    expected = sorted(
        p.relative_to(session_dir).as_posix()
        for p in session_dir.rglob("*")
        if p.is_file() and "archive" not in p.relative_to(session_dir).parts
    )
    with zipfile.ZipFile(archive) as zipped:
        assert zipped.testzip() is None
        assert sorted(zipped.namelist()) == expected
    assert result["files"] == len(expected)
    assert any(name.startswith("thumbnails/") for name in expected)
    assert any(name.startswith("study-report/") for name in expected)
    assert any(name.startswith("anonymize/") for name in expected)
    assert list((session_dir / "archive").glob("*.partial")) == []


def test_anonymize_takes_a_file_padded_with_zeros(
    services: None, tmp_path: Path, session_dir: Path
) -> None:
    # pydicom reads a sector's zeros after the last element as command
    # elements (group 0000), which no stored file may be written with.
    source = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    padded = tmp_path / "padded.dcm"
    padded.write_bytes(source + b"\0" * 512)
    assert any(tag.group == 0 for tag in pydicom.dcmread(padded).keys())  # noqa: SIM118
    result = anonymize(headers_from_files([padded]), session_dir)
    assert result["files"] == 1 and not result.get("skipped"), result
    [written] = Path(result["output"]).rglob("*.dcm")
    copy = pydicom.dcmread(written)
    assert not [tag for tag in copy.keys() if tag.group == 0]  # noqa: SIM118
    assert copy.pixel_array.shape == (128, 128)
