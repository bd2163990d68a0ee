"""Registry callback of the anonymize job: schedule only when there is a local file.

Candidates known only by URI (for example ``orthanc://...`` instances that were
never written to disk) cannot be copied by this worker, so scheduling it would
only produce a failed job. The callback looks at the form of each location,
not at the filesystem: the planner may run on a machine that does not mount
the storage the workers read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlparse


def local_path(location: object) -> str | None:
    """The filesystem path of an instance location, or None for other URIs."""
    if not isinstance(location, str) or not location:
        return None
    if location.startswith("file://"):
        return unquote(urlparse(location).path)
    if "://" in location:
        return None
    return location


def iter_instances(headers: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(series, instance) pairs of the headers document, tolerating missing keys."""
    for series in headers.get("series") or []:
        for instance in series.get("instances") or []:
            yield series, instance


def callback(
    jobName: str,  # name fixed by the dcm-processor callback signature
    headers: dict[str, Any],
    params: dict[str, Any],
    added_params: dict[str, Any],
    **kwargs: Any,
) -> bool | tuple[bool, dict[str, Any]]:
    """Schedule when at least one instance has a local path; pass the count on."""
    local = sum(1 for _, inst in iter_instances(headers) if local_path(inst.get("location")))
    if local == 0:
        return False
    return True, {"localFiles": local}
