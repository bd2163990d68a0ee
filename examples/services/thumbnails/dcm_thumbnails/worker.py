"""Worker of the thumbnails job: one PNG per image series of the candidate.

For each image series (see :mod:`dcm_thumbnails.registry`) the middle instance
by InstanceNumber is rendered; when it cannot be (unreadable location, no pixel
data, no decoder installed for its transfer syntax) the other instances are
tried, nearest to the middle first, so the thumbnail still shows a
representative image. A series with no renderable instance is reported under
``skipped`` with the reasons; the job fails only when nothing was produced.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from dcm_thumbnails.locations import local_copy
from dcm_thumbnails.registry import image_series, thumbnail_path
from dcm_thumbnails.render import MAX_SIDE, NotRenderableError, render


class NoThumbnailError(RuntimeError):
    """Raised when not one series of the candidate could be rendered."""


def _instance_number(instance: dict[str, Any]) -> float:
    try:
        return float(str(instance.get("InstanceNumber")))
    except (TypeError, ValueError):
        return float("inf")  # unnumbered instances sort last, as in the headers


def instances_middle_first(series: dict[str, Any]) -> list[dict[str, Any]]:
    """The series' instances ordered by distance from the middle one."""
    ordered = sorted(
        series.get("instances") or [],
        key=lambda inst: (_instance_number(inst), str(inst.get("location", ""))),
    )
    middle = len(ordered) // 2
    by_distance = sorted(enumerate(ordered), key=lambda pair: abs(pair[0] - middle))
    return [instance for _, instance in by_distance]


def render_series(series: dict[str, Any], target: str, max_side: int, downloads: str) -> str | None:
    """Write the series' thumbnail to ``target``; return None, or why it could not."""
    reasons: list[str] = []
    for instance in instances_middle_first(series):
        location = instance.get("location")
        try:
            path = local_copy(location, downloads)
        except OSError as exc:
            reasons.append(f"{location}: cannot fetch: {exc}")
            continue
        if path is None:
            reasons.append(f"{location}: not a readable location")
            continue
        try:
            image = render(path, max_side)
        except NotRenderableError as exc:
            reasons.append(f"{path}: {exc}")
            continue
        except Exception as exc:  # an unreadable file is one more skipped instance
            reasons.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        image.save(target, format="PNG")
        return None
    return "no renderable instance: " + "; ".join(reasons)


def worker(
    jobName: str,  # name fixed by the dcm-processor worker signature
    headers: dict[str, Any],
    params: dict[str, Any],
    added_params: dict[str, Any],
    **kwargs: Any,
) -> dict[str, Any]:
    """Render every image series into ``output_dir/<seriesUID>.png``."""
    output_dir = str(kwargs["output_dir"])
    os.makedirs(output_dir, exist_ok=True)
    max_side = min(int(params.get("maxSide") or MAX_SIDE), MAX_SIDE)
    thumbnails: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="thumbnails-") as downloads:
        for series in image_series(headers):
            uid = str(series["SeriesInstanceUID"])
            target = thumbnail_path(output_dir, uid)
            failure = render_series(series, target, max_side, downloads)
            if failure is None:
                thumbnails[uid] = target
            else:
                skipped[uid] = failure
    if not thumbnails:
        raise NoThumbnailError(
            f"job {jobName}: no thumbnail could be produced; skipped series: {skipped or 'none'}"
        )
    return {"thumbnails": thumbnails, "skipped": skipped}
