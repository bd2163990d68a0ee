"""Beat in production: it starts where nothing was written yet, and the
store knows whether it is alive (doctor)."""

from __future__ import annotations

from pathlib import Path

from scheduler.beat import BEAT_LEASE
from scheduler.store.db import transaction
from scheduler.store.models import Lease, utcnow
from scheduler.testing import environment_values, using_environment, wait_until

from .processes import CeleryProcess


def test_beat_starts_without_its_home_folder_and_renews_its_lease(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    home = tmp_path / "not" / "created" / "yet"
    values = environment_values(tmp_path, pg_url, redis_url) | {"DCM_HOME": str(home)}
    with using_environment(values) as settings:
        beat = CeleryProcess("beat", log=tmp_path / "beat.log").start()
        try:

            def alive() -> bool:
                with transaction() as db:
                    row = db.get(Lease, BEAT_LEASE)
                    return row is not None and row.expires_at > utcnow()

            wait_until(alive, timeout=60, what="beat to record that it is alive")
            assert beat.process is not None and beat.process.poll() is None, beat.log_text()
            assert (settings.home / "celerybeat-schedule").exists() or any(
                settings.home.glob("celerybeat-schedule*")
            )
        finally:
            beat.stop()
