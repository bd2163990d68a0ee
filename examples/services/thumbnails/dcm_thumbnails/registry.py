"""Which series get a thumbnail, and the registry callback that says so.

The rule is an explicit deny list: a series is an image series unless its
Modality is one of :data:`NON_IMAGE_MODALITIES`, the DICOM defined terms for
objects that carry no pixel data (reports, key-object selections, presentation
states, RT plans and structure sets, registrations, waveforms, documents,
measurements). RTDOSE and SEG are image series: dose grids and segmentations
carry pixel data, and an RTDOSE object with only DVHs is skipped by the worker
with its reason. A series whose Modality is absent (header fields can be
filtered) is kept too: the worker finds out from the files.
"""

from __future__ import annotations

import os
from typing import Any

NON_IMAGE_MODALITIES = frozenset(
    {
        "AR",  # autorefraction
        "ASMT",  # content assessment results
        "AU",  # audio
        "DOC",  # encapsulated document
        "ECG",
        "EPS",  # cardiac electrophysiology waveform
        "FID",  # spatial fiducials
        "HD",  # hemodynamic waveform
        "IOL",  # intraocular lens calculation
        "KER",  # keratometry
        "KO",  # key object selection
        "LEN",  # lensometry
        "M3D",  # 3D manufacturing model
        "PLAN",
        "PR",  # presentation state
        "REG",  # registration
        "RESP",  # respiratory waveform
        "RTPLAN",
        "RTRECORD",
        "RTSTRUCT",
        "RWV",  # real world value map
        "SMR",  # stereometric relationship
        "SR",  # structured report
        "SRF",  # subjective refraction
        "VA",  # visual acuity
    }
)


def modality_of(series: dict[str, Any]) -> str:
    """The series' Modality, upper-cased; empty when the header lacks it."""
    value = series.get("Modality")
    if isinstance(value, list):
        value = value[0] if value else ""
    return str(value or "").strip().upper()


def is_image_series(series: dict[str, Any]) -> bool:
    """True when the series has instances and is not a known non-image modality."""
    if not series.get("SeriesInstanceUID") or not series.get("instances"):
        return False
    return modality_of(series) not in NON_IMAGE_MODALITIES


def image_series(headers: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidate's image series, in header order."""
    return [s for s in headers.get("series") or [] if is_image_series(s)]


def thumbnail_path(output_dir: str, series_uid: str) -> str:
    """Where the thumbnail of a series is written: ``<output_dir>/<seriesUID>.png``."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in series_uid)
    return os.path.join(output_dir, f"{safe}.png")


def callback(
    jobName: str,  # name fixed by the dcm-processor callback signature
    headers: dict[str, Any],
    params: dict[str, Any],
    added_params: dict[str, Any],
    **kwargs: Any,
) -> bool | tuple[bool, dict[str, Any]]:
    """Schedule when the candidate has an image series; announce the output paths.

    Jobs planned later in the session (a report, a storage job) read the
    announced paths from ``added_params["thumbnails"]["outputs"]``.
    """
    series = image_series(headers)
    if not series:
        return False
    output_dir = str(
        kwargs.get("output_dir") or os.path.join(str(kwargs.get("session_dir", "")), jobName)
    )
    outputs = {
        s["SeriesInstanceUID"]: thumbnail_path(output_dir, s["SeriesInstanceUID"]) for s in series
    }
    return True, {"outputs": outputs}
