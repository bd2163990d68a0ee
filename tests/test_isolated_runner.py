"""Jobs with a `python` interpreter run in a subprocess of that virtualenv (README, "Writing a service")."""

from __future__ import annotations

import platform
import subprocess
import sys
import sysconfig
from datetime import timedelta
from pathlib import Path

import pytest

from scheduler.config import Settings
from scheduler.registry import load_registry
from scheduler.store.models import utcnow
from scheduler.testing import detect_and_send, record_study, wait_session

from .conftest import Define
from .engine import jobs_by_name

ENTRY = "dcm_testjobs:in_venv"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real second virtualenv holding a module the scheduler does not have."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "onlyinvenv.py").write_text('MARKER = "from the service virtualenv"\n')
    assert Path(purelib) != Path(sysconfig.get_paths()["purelib"])
    return python


def test_the_scheduler_itself_cannot_import_the_venv_module() -> None:
    with pytest.raises(ImportError):
        __import__("onlyinvenv")


def test_validation_does_not_import_a_venv_worker(
    define: Define, services_root: Path, venv: Path
) -> None:
    define([{"jobName": "isolated", "workerEntry": ENTRY, "python": str(venv)}])
    registry = load_registry([services_root])
    assert registry.ok, registry.problems
    assert registry.job("isolated").python == str(venv)


def test_a_job_runs_under_its_own_interpreter(live: Settings, define: Define, venv: Path) -> None:
    define([{"jobName": "isolated", "workerEntry": ENTRY, "python": str(venv)}])
    record_study("40.1", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    job = jobs_by_name(wait_session(session_id))["isolated"]
    assert job["status"] == "succeeded", job["error"]
    assert job["result"] == {
        "marker": "from the service virtualenv",
        "executable": str(venv),
        "uid": "40.1",
    }
    # Its provenance names the interpreter that ran it.
    assert job["interpreter"] == f"{platform.python_version()} {venv}"


def test_timeout_kills_the_subprocess_and_output_tail_is_kept(
    live: Settings, define: Define, venv: Path
) -> None:
    define(
        [
            {
                "jobName": "stuck",
                "workerEntry": ENTRY,
                "python": str(venv),
                "timeout": 1,
                "params": {"hang": True},
            },
            {
                "jobName": "broken",
                "workerEntry": ENTRY,
                "python": str(venv),
                "params": {"raise": "no GPU here"},
            },
        ]
    )
    record_study("40.2", now=utcnow() - timedelta(seconds=1))
    [session_id] = detect_and_send()
    jobs = jobs_by_name(wait_session(session_id))
    stuck, broken = jobs["stuck"], jobs["broken"]
    assert stuck["status"] == "failed"
    assert stuck["error"].startswith("timeout: the attempt ran longer than its timeout of 1s")
    assert f"hello from {venv}" in stuck["error"]  # the output tail
    assert broken["error"].startswith("RuntimeError: no GPU here")
    assert f"hello from {venv}" in broken["error"]
