"""End to end: DICOM files → ingest → detect → every example service's job succeeds."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from scheduler.celery_app import app
from scheduler.cli import app as cli
from scheduler.testing import detect_and_send, environment_values, using_environment, wait_session

from .engine import jobs_by_name
from .support import EXAMPLES, worker_in_process


@pytest.fixture
def examples_live(tmp_path: Path, pg_url: str, redis_url: str):  # type: ignore[no-untyped-def]
    values = environment_values(tmp_path, pg_url, redis_url) | {
        "DCM_SERVICES_PATH": str(EXAMPLES),
        "DCM_STABLE_AGE": "0",
    }
    with worker_in_process(values) as settings:
        yield settings


def test_dicom_files_to_finished_jobs_with_outputs_on_disk(examples_live, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "test-SR.dcm"):
        shutil.copy(str(get_testdata_file(name)), incoming / name)

    result = CliRunner().invoke(cli, ["ingest", str(incoming)])
    assert "recorded 3" in result.output, result.output
    sessions = detect_and_send()
    assert len(sessions) == 3
    docs = [wait_session(s, timeout=120) for s in sessions]

    assert [d["status"] for d in docs] == ["succeeded"] * 3
    by_modality = {}
    for doc in docs:
        jobs = jobs_by_name(doc)
        assert all(j["status"] == "succeeded" for j in jobs.values()), jobs
        by_modality[tuple(sorted(jobs))] = jobs
    images = by_modality[("anonymize", "archive", "study-report", "thumbnails")]
    non_image = by_modality[("anonymize", "archive")]  # SR: the thumbnails callback declines

    anonymized = Path(images["anonymize"]["result"]["output"])
    assert list(anonymized.rglob("*.dcm"))
    thumbnails = list(images["thumbnails"]["result"]["thumbnails"].values())
    assert thumbnails and all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in thumbnails)
    report = Path(images["study-report"]["result"]["reports"][0])
    assert "<img" in report.read_text()
    archive = images["archive"]["result"]
    with zipfile.ZipFile(archive["path"]) as bundle:
        names = bundle.namelist()
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".html") for n in names)
    assert non_image["archive"]["result"]["outcomes"] == {"anonymize": "succeeded"}


def test_eager_mode_runs_detection_planning_and_jobs_inline(tmp_path: Path) -> None:
    from scheduler import tasks

    values = environment_values(tmp_path, f"sqlite:///{tmp_path / 'store.db'}") | {
        "DCM_SERVICES_PATH": str(EXAMPLES),
        "DCM_STABLE_AGE": "0",
    }
    with using_environment(values):
        app.conf.task_always_eager = True
        try:
            from scheduler.store.db import init_db

            init_db()
            result = CliRunner().invoke(cli, ["ingest", str(get_testdata_file("CT_small.dcm"))])
            assert result.exit_code == 0
            outcome = tasks.detect.delay().get()
        finally:
            app.conf.task_always_eager = False
        assert len(outcome["sessions"]) == 1
        doc = wait_session(outcome["sessions"][0], timeout=1)  # already done: eager
        assert doc["status"] == "succeeded"
        assert set(jobs_by_name(doc)) == {"anonymize", "thumbnails", "study-report", "archive"}
