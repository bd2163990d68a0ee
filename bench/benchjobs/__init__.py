"""The service the benchmarks run: workers and callbacks that do nothing.

Copied into a throwaway services folder by :func:`bench.common.write_service`
and imported from there, like any service.
"""

from __future__ import annotations

from typing import Any


def noop(
    job_name: str,
    headers: dict[str, Any],
    params: dict[str, Any],
    added_params: dict[str, Any],
    **kwargs: Any,
) -> Any:
    return None


def accept(
    job_name: str,
    headers: dict[str, Any],
    params: dict[str, Any],
    added_params: dict[str, Any],
    **kwargs: Any,
) -> Any:
    return True
