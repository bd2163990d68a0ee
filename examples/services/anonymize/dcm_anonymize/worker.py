"""Worker of the anonymize job: write a de-identified copy of every candidate file.

Output layout: ``<output_dir>/<series UID>/<SOP instance UID>.dcm`` using the
new (remapped) UIDs, so the folder names themselves carry no original UID.
Files that cannot be read or are not local are listed in ``skipped`` with the
reason; the job fails only when it could not write a single file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import pydicom

from dcm_anonymize.deidentify import Profile, deidentify
from dcm_anonymize.locations import local_copy
from dcm_anonymize.registry import iter_instances


class NothingAnonymizedError(RuntimeError):
    """Raised when not one file of the candidate could be de-identified."""


def profile_from_params(params: dict[str, Any]) -> Profile:
    """The profile options from the job's static params."""
    return Profile(
        salt=str(params.get("salt") or ""),
        keep_uids=bool(params.get("keepUids", False)),
        keep_dates=bool(params.get("keepDates", True)),
    )


def _safe_name(uid: str) -> str:
    # UIDs are digits and dots, but a malformed file may carry anything.
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in uid) or "unknown"


def anonymize_file(path: str, output_dir: str, profile: Profile) -> tuple[str, str, str]:
    """De-identify one file; return (written path, new series UID, original series UID)."""
    # force: files written without a preamble are still DICOM (ingest takes them too).
    ds = pydicom.dcmread(path, force=True)
    original_series = str(ds.get("SeriesInstanceUID", ""))
    deidentify(ds, profile)
    series_uid = str(ds.get("SeriesInstanceUID", "")) or "unknown-series"
    sop_uid = str(ds.get("SOPInstanceUID", "")) or hashlib.sha256(path.encode()).hexdigest()
    folder = os.path.join(output_dir, _safe_name(series_uid))
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{_safe_name(sop_uid)}.dcm")
    ds.save_as(target, enforce_file_format=True)
    return target, series_uid, original_series


def worker(
    jobName: str,  # name fixed by the dcm-processor worker signature
    headers: dict[str, Any],
    params: dict[str, Any],
    added_params: dict[str, Any],
    **kwargs: Any,
) -> dict[str, Any]:
    """Anonymize every instance of the candidate into ``output_dir``."""
    output_dir = str(kwargs["output_dir"])
    os.makedirs(output_dir, exist_ok=True)
    profile = profile_from_params(params)
    written = 0
    series_map: dict[str, str] = {}
    skipped: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="anonymize-") as downloads:
        for _, instance in iter_instances(headers):
            location = instance.get("location")
            try:
                path = local_copy(location, downloads)
            except OSError as exc:
                skipped.append({"location": str(location), "reason": f"cannot fetch: {exc}"})
                continue
            if path is None:
                skipped.append({"location": str(location), "reason": "not a readable location"})
                continue
            try:
                _, new_series, original_series = anonymize_file(path, output_dir, profile)
            except Exception as exc:  # one bad file must not stop the batch
                skipped.append({"location": path, "reason": f"{type(exc).__name__}: {exc}"})
                continue
            written += 1
            series_map[original_series] = new_series
    if written == 0:
        raise NothingAnonymizedError(
            f"job {jobName}: no file could be anonymized ({len(skipped)} skipped): {skipped[:5]}"
        )
    return {"output": output_dir, "files": written, "series": series_map, "skipped": skipped}
