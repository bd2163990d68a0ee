"""The benchmark scripts refuse options they cannot measure before they
create a database or start a worker (bench/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("pools", ["", ",", "solo,gevent", "threads"])
def test_the_overhead_benchmark_refuses_pools_it_does_not_measure(pools: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.overhead", "--pools", pools],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "--pools takes a comma list of solo, prefork" in run.stderr
    assert run.stdout == ""  # no figure printed
