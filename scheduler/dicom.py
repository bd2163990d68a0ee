"""Reading DICOM headers into store items, never pixel data.

An :class:`InstanceItem` is what the store records for one instance: the four
identifying UIDs, the main tags of each level (the same idea as Orthanc's
MainDicomTags) as JSON-safe values, and where the file lives. Files come from
disk (:func:`read_header`), from pydicom datasets or from plain dicts of tags
(:func:`item_from_dataset`, :func:`item_from_mapping`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from scheduler.truncation import cut_reason

PATIENT_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
STUDY_TAGS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
)
SERIES_TAGS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "ProtocolName",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "ContrastBolusAgent",
    "PerformedProcedureStepDescription",
    # Constant over a series in practice; rules select thin-slice series on it.
    "SliceThickness",
)
INSTANCE_TAGS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ImageType",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "AcquisitionNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "ImageComments",
)
ALL_TAGS = PATIENT_TAGS + STUDY_TAGS + SERIES_TAGS + INSTANCE_TAGS
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

# Tag values longer than this are cut: main tags are for routing decisions,
# not for carrying free-text reports through every callback and job row.
MAX_VALUE_LENGTH = 1024


class NotDicomError(ValueError):
    """A file is not DICOM or lacks what the store needs; ``reason`` says which."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


@dataclass
class InstanceItem:
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    location: str
    patient_tags: dict[str, Any] = field(default_factory=dict)
    study_tags: dict[str, Any] = field(default_factory=dict)
    series_tags: dict[str, Any] = field(default_factory=dict)
    instance_tags: dict[str, Any] = field(default_factory=dict)
    source_id: str | None = None


def json_value(value: Any) -> Any:
    """A JSON-safe form of a DICOM element value (None when it has none)."""
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = [json_value(v) for v in value]
        return [v for v in items if v is not None] or None
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no NaN or infinity
    if isinstance(value, bytes):
        return None
    if isinstance(value, PersonName):
        value = str(value)
    text = str(value).replace("\x00", "").strip()
    if not text:
        return None
    return text[:MAX_VALUE_LENGTH]


def _pick(source: Mapping[str, Any], keywords: Iterable[str]) -> dict[str, Any]:
    tags: dict[str, Any] = {}
    for keyword in keywords:
        value = json_value(source.get(keyword))
        if value is not None:
            tags[keyword] = value
    return tags


def item_from_mapping(
    tags: Mapping[str, Any], location: str = "", source_id: str | None = None
) -> InstanceItem:
    """Build an item from ``{keyword: value}`` (values already plain or DICOM)."""
    missing = [uid for uid in REQUIRED_UIDS if not json_value(tags.get(uid))]
    if missing:
        raise NotDicomError(location or "<item>", "missing " + ", ".join(missing))
    return InstanceItem(
        sop_uid=str(json_value(tags["SOPInstanceUID"])),
        series_uid=str(json_value(tags["SeriesInstanceUID"])),
        study_uid=str(json_value(tags["StudyInstanceUID"])),
        patient_id=str(json_value(tags.get("PatientID")) or ""),
        location=location,
        patient_tags=_pick(tags, PATIENT_TAGS),
        study_tags=_pick(tags, STUDY_TAGS),
        series_tags=_pick(tags, SERIES_TAGS),
        instance_tags=_pick(tags, INSTANCE_TAGS),
        source_id=source_id,
    )


def item_from_dataset(dataset: Dataset, location: str = "") -> InstanceItem:
    return item_from_mapping(_plain_tags(dataset), location=location)


_WANTED = frozenset(ALL_TAGS)


def _plain_tags(dataset: Dataset) -> dict[str, Any]:
    """``{keyword: value}`` of the wanted elements present, sequences skipped.

    One pass over the elements the dataset holds (``read_header`` reads only
    the wanted ones) instead of a keyword lookup per wanted tag, which costs
    more than reading the file. A value pydicom cannot convert is left out.
    """
    tags: dict[str, Any] = {}
    for tag in list(dataset.keys()):
        try:
            element = dataset[tag]
        except Exception:  # noqa: BLE001 - a corrupt value is treated as absent
            continue
        keyword = element.keyword
        if keyword in _WANTED and element.VR != "SQ":
            tags[keyword] = element.value
    return tags


def read_header(path: Path) -> InstanceItem:
    """Read one file's header; :class:`NotDicomError` says why it cannot be recorded."""
    location = str(path.absolute())
    try:
        if path.stat().st_size == 0:
            raise NotDicomError(location, "empty file")
        dataset = _read(path)
    except NotDicomError:
        raise
    except OSError as exc:
        raise NotDicomError(location, f"cannot read file: {exc.strerror or exc}") from exc
    return item_from_dataset(dataset, location=location)


def _read(path: Path) -> Dataset:
    location = str(path.absolute())
    with path.open("rb") as file:
        try:
            dataset = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=list(ALL_TAGS))
        except InvalidDicomError:
            dataset = None
        except Exception as exc:  # pydicom raises many types on truncated/corrupt files
            error = f"{type(exc).__name__}: {exc}"
            if file.tell() >= os.fstat(file.fileno()).st_size:
                # pydicom ran out of bytes (mostly inside a sequence): its own
                # words do not say the file was cut.
                reason = f"truncated: the file ends before pydicom read it whole ({error})"
            else:
                reason = f"unreadable DICOM ({error})"
            raise NotDicomError(location, reason) from exc
        if dataset is None:
            # Files written without the 128-byte preamble are still DICOM;
            # accept them only when a forced read finds the identifying UIDs.
            try:
                file.seek(0)
                dataset = pydicom.dcmread(
                    file, stop_before_pixels=True, force=True, specific_tags=list(ALL_TAGS)
                )
            except Exception:  # noqa: BLE001 - any failure here just means "not DICOM"
                dataset = None
            if dataset is None or dataset.get("SOPInstanceUID") is None:
                raise NotDicomError(location, "not DICOM (no DICM preamble and no readable header)")
        cut = cut_reason(file, dataset)
    if cut:
        raise NotDicomError(location, cut)
    return dataset
