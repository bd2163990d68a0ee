"""Build the scheduler's headers document from DICOM files, for the example-service tests.

The shape follows README's headers document (patient, studies, series with instances sorted by
InstanceNumber then location, seriesIds, dcmpath, instance_count). It reads
headers only (``stop_before_pixels``) and lets the service tests run without a
store; it is not the scheduler's own header builder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

PATIENT_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "PatientAge")
STUDY_TAGS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
SERIES_TAGS = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
)
INSTANCE_TAGS = ("SOPInstanceUID", "InstanceNumber")


def json_value(value: Any) -> Any:
    """A pydicom value as JSON: multi-values as lists of strings, the rest as strings."""
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return str(value)


def main_tags(ds: Dataset, keywords: Iterable[str]) -> dict[str, Any]:
    """The listed tags present (and non-empty) in ``ds``."""
    tags = {}
    for keyword in keywords:
        value = ds.get(keyword)
        if value is not None and value != "":
            tags[keyword] = json_value(value)
    return tags


def _instance_key(instance: dict[str, Any]) -> tuple[float, str]:
    try:
        number = float(instance.get("InstanceNumber", ""))
    except ValueError:
        number = float("inf")
    return number, instance["location"]


def headers_from_files(paths: Iterable[str | os.PathLike[str]], level: str = "study") -> dict:
    """The headers document of a candidate made of ``paths``, at ``level``."""
    locations = [os.path.abspath(os.fspath(p)) for p in paths]
    patient: dict[str, Any] = {}
    studies: dict[str, dict[str, Any]] = {}
    series: dict[str, dict[str, Any]] = {}
    for location in locations:
        ds = pydicom.dcmread(location, stop_before_pixels=True)
        patient = patient or main_tags(ds, PATIENT_TAGS)
        study = studies.setdefault(
            str(ds.StudyInstanceUID), {**main_tags(ds, STUDY_TAGS), "series": []}
        )
        one_series = series.setdefault(
            str(ds.SeriesInstanceUID), {**main_tags(ds, SERIES_TAGS), "instances": []}
        )
        if one_series["SeriesInstanceUID"] not in study["series"]:
            study["series"].append(one_series["SeriesInstanceUID"])
        one_series["instances"].append({**main_tags(ds, INSTANCE_TAGS), "location": location})

    for one_series in series.values():
        one_series["instances"].sort(key=_instance_key)
        one_series["instance_count"] = len(one_series["instances"])
    for study in studies.values():
        study["instance_count"] = sum(series[uid]["instance_count"] for uid in study["series"])

    uids = {"series": next(iter(series), ""), "study": next(iter(studies), "")}
    return {
        "level": level,
        "uid": uids.get(level, patient.get("PatientID", "")),
        "id": patient.get("PatientID", ""),
        "patient": patient,
        "studies": list(studies.values()),
        "series": list(series.values()),
        "seriesIds": list(series),
        "dcmpath": os.path.commonpath([os.path.dirname(p) for p in locations]),
        "instance_count": len(locations),
    }
