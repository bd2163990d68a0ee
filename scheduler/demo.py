"""``dcm-scheduler demo``: the whole flow on a fresh embedded setup.

A new folder holds an SQLite store and a filesystem broker; the example
services shipped with the package are the registry; pydicom's sample files
are ingested; detection runs with a one-second stable age; an in-process
Celery worker runs the planning tasks and the jobs until every session has
ended. Then it prints the sessions, the jobs and where the outputs are.
Nothing outside the demo folder is touched, and no server is needed.
"""

from __future__ import annotations

import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

DEMO_TIMEOUT = 600.0


def example_services_dir() -> Path:
    """The example services: installed with the package, or in the checkout."""
    try:
        packaged = Path(str(resources.files("scheduler.examples") / "services"))
        if packaged.is_dir():
            return packaged
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "examples" / "services"


# A varied set of pydicom's sample files that the example services handle
# completely: CT, MR and CR studies with several series, colour ultrasound,
# a segmentation, and non-image objects (SR, RT plan, ECG) for which the
# thumbnails callback declines, so the trace shows a job not scheduled.
DEMO_SAMPLES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "dicomdirtests/77654033",
    "dicomdirtests/98892003",
    "examples_rgb_color.dcm",
    "examples_jpeg2k.dcm",
    "examples_ybr_color.dcm",
    "liver_1frame.dcm",
    "test-SR.dcm",
    "rtplan.dcm",
    "waveform_ecg.dcm",
)


def demo_samples(all_samples: bool) -> list[Path]:
    root = sample_files_dir()
    if all_samples:
        return [root]
    return [root / name for name in DEMO_SAMPLES if (root / name).exists()]


def sample_files_dir() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        raise RuntimeError("pydicom's sample files are not installed")
    return Path(str(path)).parent


def embedded_environment(home: Path) -> dict[str, str]:
    """The settings of a fresh single-machine setup in ``home``."""
    return {
        "DCM_HOME": str(home),
        "DCM_DATABASE_URL": f"sqlite:///{home / 'store.db'}",
        "CELERY_BROKER_URL": "",  # the embedded broker (Celery reads this variable itself)
        "DCM_SERVICES_PATH": str(example_services_dir()),
        "DCM_STABLE_AGE": "1",
        "DCM_DETECT_INTERVAL": "0.5",
        "DCM_DETECT_LEVELS": "study",
        "DCM_DEFAULT_EVENTS": "study.stable",
        "DCM_HEADER_FIELDS": "",
        "DCM_SETTINGS": "",
        "DCM_OUTPUT_DIR": str(home / "outputs"),
    }


def run_demo(home: Path | None, console: Console, *, all_samples: bool = False) -> int:
    from scheduler import detection, messages, queries
    from scheduler.ingest import ingest_paths
    from scheduler.planning import evaluation_order
    from scheduler.registry import current_registry
    from scheduler.store.db import init_db, transaction
    from scheduler.store.models import SchedulingSession, Study
    from scheduler.testing import embedded_worker, use_environment
    from scheduler.vocabulary import DEFAULT_CHANNEL, PLANNING_QUEUE, ResourceState, SessionStatus

    if home is not None and home.exists() and (not home.is_dir() or any(home.iterdir())):
        # A live DCM_HOME would get the samples, and its `run` would process them.
        console.print(
            f"[red]error:[/red] {home} is not an empty folder: the demo needs a fresh one "
            "(leave --home out for a new temporary folder)",
            highlight=False,
        )
        return 2
    home = (home or Path(tempfile.mkdtemp(prefix="dcm-scheduler-demo-"))).absolute()
    home.mkdir(parents=True, exist_ok=True)
    settings = use_environment(embedded_environment(home))
    console.print(f"demo folder: {home}")
    console.print(f"services:    {', '.join(str(p) for p in settings.services_path)}")
    init_db()
    registry = current_registry()
    console.print("jobs:        " + ", ".join(f"{j.job_name} ({j.phase})" for j in registry.jobs()))
    for problem in registry.problems:
        console.print(f"[red]service problem:[/red] {problem}")

    result = ingest_paths(transaction, demo_samples(all_samples), recursive=True)
    console.print(
        f"ingested pydicom sample files: recorded {result.recorded} instances, "
        f"skipped {len(result.rejected)} files (not DICOM or missing UIDs)"
    )
    deadline = time.monotonic() + DEMO_TIMEOUT
    with embedded_worker([PLANNING_QUEUE, DEFAULT_CHANNEL], concurrency=4):
        while time.monotonic() < deadline:
            run = detection.detect()
            messages.send_plans(run.sessions)
            with transaction() as db:
                receiving = db.scalar(
                    select(func.count())
                    .select_from(Study)
                    .where(Study.state == ResourceState.RECEIVING)
                )
                counts = dict(
                    db.execute(
                        select(SchedulingSession.status, func.count()).group_by(
                            SchedulingSession.status
                        )
                    ).all()
                )
            open_sessions = counts.get(SessionStatus.PLANNING, 0) + counts.get(
                SessionStatus.RUNNING, 0
            )
            progress = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            console.print(
                f"  studies still receiving: {receiving}; sessions: {progress or 'none yet'}",
                highlight=False,
            )
            if not receiving and counts and not open_sessions:
                break
            time.sleep(settings.detect_interval)
        else:
            console.print("[red]the demo did not finish in time[/red]")
            return 1

    with transaction() as db:
        sessions = queries.list_sessions(db, limit=1000)
        jobs = queries.list_jobs(db, limit=10000)
    print_summary(console, sessions, jobs, [d.job_name for d in evaluation_order(registry.jobs())])
    console.print(f"outputs:     {settings.output_dir}")
    console.print(f"look around: DCM_HOME={home} dcm-scheduler sessions | jobs | show SESSION_ID")
    failed = [j for j in jobs if j["status"] != "succeeded"]
    # Every sample of the default set is handled completely; with all of
    # pydicom's samples some files cannot be decoded, and the jobs say so.
    return 1 if failed and not all_samples else 0


def print_summary(
    console: Console,
    sessions: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    order: list[str] | None = None,
) -> None:
    """One row per session, one column per job: the DAG outcome at a glance.
    The columns follow ``order`` (the job names as planning evaluates them),
    then any other job by name, whichever session was planned first."""
    from collections import Counter

    by_session: dict[str, dict[str, dict[str, Any]]] = {}
    for job in jobs:
        by_session.setdefault(job["session_id"], {})[job["job_name"]] = job
    seen = {job["job_name"] for job in jobs}
    names = [name for name in dict.fromkeys(order or ()) if name in seen]
    names += sorted(seen.difference(names))
    table = Table("session", "study", "status", *names)
    marks = {
        "succeeded": "[green]✔[/green]",
        "failed": "[red]✘[/red]",
        "upstream_failed": "[red]⊘[/red]",
        "cancelled": "■",
    }
    for session in sorted(sessions, key=lambda s: s["uid"]):
        mine = by_session.get(session["id"], {})
        cells = [
            marks.get(mine[n]["status"], mine[n]["status"]) if n in mine else "[dim]-[/dim]"
            for n in names
        ]
        uid = session["uid"] if len(session["uid"]) <= 30 else "…" + session["uid"][-29:]
        table.add_row(session["id"][:8], uid, session["status"], *cells)
    console.print(table)
    console.print("✔ succeeded  ✘ failed  ⊘ upstream failed  - not scheduled (see `show`)")
    session_counts = Counter(s["status"] for s in sessions)
    job_counts = Counter(j["status"] for j in jobs)
    console.print(
        f"{len(sessions)} sessions: "
        + ", ".join(f"{v} {k}" for k, v in sorted(session_counts.items()))
        + f"; {len(jobs)} jobs: "
        + ", ".join(f"{v} {k}" for k, v in sorted(job_counts.items()))
    )
    for job in jobs:
        if job["status"] != "succeeded":
            first = (job["error"] or "").splitlines()[0][:200] if job["error"] else ""
            console.print(
                f"[red]{job['job_name']} {job['status']}[/red] in session "
                f"{job['session_id'][:8]}: {first}",
                highlight=False,
            )
