"""Registry callback of the anonymize job: schedule only when a file can be read.

The worker reads local paths, ``file://`` URLs and ``http(s)://`` URLs (the
instance files of the Orthanc source). Candidates known only by another kind
of URI cannot be copied, so scheduling the job would only produce a failure.
The callback looks at the form of each location, not at the filesystem: the
planner may run on a machine that does not mount the storage workers read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse


def readable(location: object) -> bool:
    """Whether the worker can read a file at this location."""
    if not isinstance(location, str) or not location:
        return False
    scheme = urlparse(location).scheme
    return scheme in ("file", "http", "https") or "://" not in location


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
    local = sum(1 for _, inst in iter_instances(headers) if readable(inst.get("location")))
    if local == 0:
        return False
    return True, {"readableFiles": local}
