"""The Orthanc source (README, "Following Orthanc") against a real Orthanc fed by dcmtk's storescu."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from scheduler.config import Settings
from scheduler.orthanc import follow_changes
from scheduler.store.db import transaction
from scheduler.store.models import Instance, utcnow
from scheduler.testing import (
    detect_and_send,
    environment_values,
    free_port,
    wait_session,
    wait_until,
)

from .conftest import require
from .engine import jobs_by_name
from .support import EXAMPLES, worker_in_process

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


class OrthancServer:
    def __init__(self, folder: Path) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "dcm-scheduler-test",
                    "StorageDirectory": str(folder / "storage"),
                    "IndexDirectory": str(folder / "index"),
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "DicomAet": "ORTHANC",
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "Plugins": [],
                }
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [ORTHANC, str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def up() -> bool:
            assert self.process is not None and self.process.poll() is None, "Orthanc exited"
            try:
                return httpx.get(f"{self.url}/system", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, what="Orthanc to answer")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def send(self, *files: str) -> None:
        """A real DICOM C-STORE association, as a modality would do it."""
        subprocess.run(
            ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(self.dicom_port), *files],
            check=True,
            capture_output=True,
            timeout=60,
        )


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    require(
        Path(ORTHANC).exists() and bool(shutil.which("storescu")),
        "Orthanc and dcmtk (apt-get install orthanc dcmtk)",
    )
    server = OrthancServer(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def instances_recorded() -> int:
    with transaction() as db:
        return db.scalar(select(func.count()).select_from(Instance)) or 0


def test_sent_files_are_recorded_and_a_restart_resumes_without_duplicates_or_gaps(
    orthanc: OrthancServer, env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler.testing import use_environment

    monkeypatch.setenv("DCM_ORTHANC_URL", orthanc.url)
    settings = use_environment({})
    orthanc.send(str(get_testdata_file("CT_small.dcm")))
    first = follow_changes(settings)
    assert (first.recorded, first.error) == (1, None)
    with transaction() as db:
        instance = db.scalars(select(Instance)).one()
        assert instance.location == f"{orthanc.url}/instances/{instance.source_id}/file"
        assert instance.series.tags["Modality"] == "CT"

    orthanc.send(str(get_testdata_file("MR_small.dcm")))
    # "Restart": a fresh process state reads the saved Seq from the store.
    again = follow_changes(use_environment({}))
    assert (again.recorded, again.known) == (1, 0)
    assert again.seq > first.seq
    assert follow_changes(settings).recorded == 0
    assert instances_recorded() == 2


def test_orthanc_down_is_reported_and_nothing_is_lost(
    env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from scheduler.testing import use_environment

    monkeypatch.setenv("DCM_ORTHANC_URL", f"http://user:secret@127.0.0.1:{free_port()}")
    report = follow_changes(use_environment({}))
    assert report.error is not None and "unavailable" in report.error
    assert "secret" not in report.error
    assert report.seq == 0 and instances_recorded() == 0


def test_files_sent_to_orthanc_are_planned_and_their_jobs_run(
    orthanc: OrthancServer, tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    values = environment_values(tmp_path, pg_url, redis_url) | {
        "DCM_SERVICES_PATH": str(EXAMPLES),
        "DCM_STABLE_AGE": "0",
        "DCM_ORTHANC_URL": orthanc.url,
    }
    with worker_in_process(values) as settings:
        orthanc.send(str(get_testdata_file("CT_small.dcm")))
        assert follow_changes(settings).recorded == 1
        with transaction() as db:
            db.execute(  # make the study old enough to be stable
                Instance.__table__.update().values(received_at=utcnow() - timedelta(seconds=5))
            )
        [session_id] = detect_and_send()
        doc = wait_session(session_id, timeout=120)
    jobs = jobs_by_name(doc)
    assert doc["status"] == "succeeded", {n: j["error"] for n, j in jobs.items()}
    assert set(jobs) == {"anonymize", "thumbnails", "study-report", "archive"}
    thumbnail = next(iter(jobs["thumbnails"]["result"]["thumbnails"].values()))
    assert Path(thumbnail).read_bytes()[:4] == b"\x89PNG"


def test_an_instance_deleted_before_it_is_read_is_skipped_not_a_stall(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler.testing import use_environment

    def orthanc_api(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/changes":
            return httpx.Response(
                200,
                json={
                    "Changes": [
                        {"ChangeType": "NewInstance", "ID": "gone", "Seq": 1},
                        {"ChangeType": "NewInstance", "ID": "here", "Seq": 2},
                    ],
                    "Done": True,
                    "Last": 2,
                },
            )
        if request.url.path == "/instances/gone/simplified-tags":
            return httpx.Response(404, json={"Message": "Unknown resource"})
        return httpx.Response(
            200,
            json={
                "PatientID": "P",
                "StudyInstanceUID": "1.1",
                "SeriesInstanceUID": "1.1.1",
                "SOPInstanceUID": "1.1.1.1",
                "Modality": "CT",
                "ReferencedSeriesSequence": [],
            },
        )

    monkeypatch.setenv("DCM_ORTHANC_URL", "http://orthanc.test")
    settings = use_environment({})
    with httpx.Client(transport=httpx.MockTransport(orthanc_api)) as client:
        report = follow_changes(settings, client=client)
    assert (report.recorded, report.seq, report.error) == (1, 2, None)
    assert report.rejected == ["http://orthanc.test/instances/gone: gone (404)"]
