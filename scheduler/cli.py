"""The ``dcm-scheduler`` command line (README, "Commands"): parses, calls the library, prints.

Every listing takes ``--json`` (stable shapes from :mod:`scheduler.queries`).
Exit status: 0 success, 1 a problem the command reports (invalid services,
unknown id), 2 wrong usage.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from scheduler.config import ConfigError, get_settings
from scheduler.redact import hide_secrets, mask
from scheduler.vocabulary import EVENT_NAME, LARGEST_LIMIT, JobStatus, Level, SessionStatus

app = typer.Typer(
    help="dcm-processor job scheduler: detect stable DICOM data, plan and run service jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
services_app = typer.Typer(help="Loaded services and their validation.", no_args_is_help=True)
app.add_typer(services_app, name="services")


def _console(stderr: bool = False) -> Console:
    """A console; when it is not a terminal (a pipe, a file) nothing is cut
    to a width, whatever COLUMNS says."""
    stream = sys.stderr if stderr else sys.stdout
    # No emoji codes: ":ok:" in a stored reason is text, not a picture.
    return Console(stderr=stderr, width=None if stream.isatty() else 1000, emoji=False)


console = _console()
errors = _console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "upstream_failed": "red",
    "partial": "yellow",
    "running": "cyan",
    "planning": "cyan",
    "queued": "blue",
    "cancelled": "magenta",
    "empty": "dim",
}
STATUS_MARK = {
    "succeeded": "✔",
    "failed": "✘",
    "upstream_failed": "⊘",
    "running": "▶",
    "queued": "…",
    "cancelled": "■",
}


def print_json(data: Any) -> None:
    from scheduler.queries import json_text

    sys.stdout.write(json_text(data))


def fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def styled(status: str) -> str:
    style = STATUS_STYLE.get(status, "")
    return f"[{style}]{status}[/{style}]" if style else status


# Columns whose values are short and read whole: ids, statuses, times.
UNBROKEN = frozenset(
    {"status", "state", "decision", "job id", "session", "phase", "attempts", "level", "rev"}
    | {"created", "finished", "last heartbeat", "age", "duration", "stage"}
)


def table(*columns: str, title: str | None = None) -> Table:
    """A listing: status and id columns are never cut or wrapped; long
    values (UIDs, reasons) wrap within their column instead."""
    grid = Table(title=title)
    for name in columns:
        if name in UNBROKEN:
            grid.add_column(name, no_wrap=True)
        else:
            grid.add_column(name, overflow="fold")
    return grid


def _fits(grid: Table, width: int) -> bool:
    """Whether ``grid`` fits in ``width`` columns with only long values
    folded: each column gets at least its content, or its header and 12
    cells when the content is longer (UIDs, reasons), which then folds.
    The minimum widths are set on the columns for Rich to keep."""
    needed = 1
    for column in grid.columns:
        header = Text.from_markup(str(column.header)).cell_len
        content = max([header] + [Text.from_markup(str(cell)).cell_len for cell in column.cells])
        column.min_width = content if column.no_wrap else min(content, max(header, 12))
        needed += 3 + column.min_width
    return needed <= width


def more_than_shown(shown: int, limit: int, what: str) -> None:
    """Say on stderr that a listing stopped at ``--limit``: a table cut
    silently reads as everything there is."""
    if shown >= limit:
        errors.print(f"{limit} {what} shown, there may be more: raise --limit to see them")


def print_table(grid: Table) -> None:
    """The table, or, in a terminal too narrow for it, one block per row
    (``column: value`` lines): values are never cut to fit."""
    if _fits(grid, console.width):
        console.print(grid)
        return
    if grid.title:
        console.print(f"[bold]{grid.title}[/bold]")
    headers = [str(column.header) for column in grid.columns]
    cells = [list(column.cells) for column in grid.columns]
    for row in range(grid.row_count):
        for header, column in zip(headers, cells, strict=True):
            console.print(f"[bold]{header}[/bold]: ", column[row], sep="", highlight=False)
        console.print()


def when(value: str | None) -> str:
    """A stored ISO time as a table shows it: to the second."""
    return value[:19].replace("T", " ") if value else ""


def printable(text: str) -> str:
    """``text`` with control and format characters escaped: a file name can
    hold a newline, a terminal escape or a right-to-left override, which
    must not forge a line of output. Spaces of other scripts (the
    ideographic space of a Japanese name, a no-break space) stay."""
    return "".join(
        char
        if char.isprintable() or unicodedata.category(char) == "Zs"
        else char.encode("unicode_escape").decode()
        for char in text
    )


def shown(value: Any) -> str:
    """Stored text that services or their data control (job and service
    names, errors, callback reasons, UIDs), as Rich markup that prints it
    as it is: what a worker raises may hold a terminal escape that clears
    the screen or sets the window title, or ``[red]`` that Rich would read
    as markup (README, "Failure modes"). ``--json`` keeps it unchanged."""
    return escape(printable("" if value is None else str(value)))


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def open_store() -> None:
    """Reading commands: the store must exist; nothing is created or upgraded."""
    from scheduler.store.reader import StoreNotReadyError, connect

    try:
        with connect(get_settings().database_url):
            pass
    except StoreNotReadyError as exc:
        raise fail(str(exc)) from exc


def short(identifier: str | None) -> str:
    return (identifier or "")[:8]


@app.callback()
def main_options() -> None:
    """Settings come from the environment (DCM_*, CELERY_*; see README)."""
    global console, errors
    console, errors = _console(), _console(stderr=True)  # this invocation's streams
    # Warnings to stderr; service problems and unconsumed channels are
    # printed by the commands themselves, from the registry and the trace.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for printed in ("scheduler.services", "scheduler.channels"):
        logging.getLogger(printed).setLevel(logging.ERROR)
    try:
        get_settings()
    except ConfigError as exc:
        raise fail(str(exc), 2) from exc


@app.command("init-db")
def init_db_command() -> None:
    """Create or upgrade the store schema to the newest migration."""
    from scheduler.store.db import init_db

    settings = get_settings()
    revision = init_db()
    console.print(f"store ready at revision {revision}: {mask(settings.database_url)}")


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Descend into folders.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Read DICOM headers (never pixel data) and record the instances."""
    from scheduler.ingest import Rejection, ingest_paths, iter_files
    from scheduler.store.db import init_db, transaction

    total = sum(1 for found in iter_files(paths, recursive) if not isinstance(found, Rejection))
    if total:  # nothing to record: no store is made for it
        init_db()
    with Progress(
        TextColumn("ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
        disable=as_json or total < 200 or not errors.is_terminal,
    ) as progress:
        task = progress.add_task("ingest", total=total)
        result = ingest_paths(
            transaction,
            paths,
            recursive=recursive,
            progress=lambda n: progress.advance(task, n),
            readers=os.cpu_count() or 1,
        )
    if as_json:
        print_json(result.as_dict())
    else:
        invalid = len(result.rejected) - result.not_dicom - result.unreadable
        console.print(
            f"recorded {result.recorded}, already known {result.known}, "
            f"not DICOM {result.not_dicom}, rejected {invalid}, unreadable {result.unreadable}"
        )
        for rejection in result.rejected:
            console.print(
                f"  skipped {printable(rejection.location)}: {printable(rejection.reason)}",
                highlight=False,
                markup=False,
            )
    if result.unreadable:
        raise typer.Exit(1)  # a path that does not exist, or could not be read


@services_app.command("list")
def services_list(as_json: JsonOption = False) -> None:
    """Services on DCM_SERVICES_PATH and their jobs."""
    from scheduler import queries
    from scheduler.registry import current_registry, folder_problems

    registry = current_registry()
    _folders, missing = folder_problems(get_settings().services_path, "on DCM_SERVICES_PATH")
    report = queries.services_report(registry, missing)
    if as_json:
        print_json(report)
        if report["problems"]:
            raise typer.Exit(1)
        return
    grid = table("service", "job", "phase", "events", "depends on", "channel", "callback")
    for service in registry.services:
        for job in service.jobs:
            grid.add_row(
                shown(f"{service.name} {service.version}".strip()),
                shown(job.job_name) + (" (disabled)" if job.disabled else ""),
                shown(job.phase),
                shown(", ".join(job.events)),
                shown(", ".join(job.depends_on)),
                shown(job.channel),
                shown(job.registry_entry or "-"),
            )
    print_table(grid)
    for problem in report["problems"]:
        errors.print(f"[red]problem:[/red] {shown(problem)}", highlight=False)
    if report["problems"]:
        raise typer.Exit(1)


@services_app.command("validate")
def services_validate(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Service folders or registry roots.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check service definitions; exit 1 when anything is wrong."""
    from scheduler.registry import folder_problems, load_registry

    settings = get_settings()
    folders, missing = folder_problems(
        [p.absolute() for p in paths] if paths else list(settings.services_path),
        "given" if paths else "on DCM_SERVICES_PATH",
    )
    registry = load_registry(
        folders,
        None if paths else settings.settings_file,
        default_events=settings.default_events,
    )
    problems = missing + [str(p) for p in registry.problems]
    if as_json:
        print_json(
            {
                "ok": not problems,
                "services": [s.name for s in registry.services],
                "problems": problems,
            }
        )
    else:
        for service in registry.services:
            console.print(f"[green]ok[/green] {shown(service.name)} ({len(service.jobs)} job(s))")
        for problem in problems:
            console.print(f"[red]problem:[/red] {shown(problem)}", highlight=False)
        if not registry.services and not problems:
            console.print("no services found in " + ", ".join(map(str, folders)))
    if problems:
        raise typer.Exit(1)


@app.command()
def detect(
    inline: Annotated[
        bool, typer.Option("--inline", help="Plan the new sessions in this process.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """One detection run now; prints what was claimed."""
    from scheduler import detection, messages, sessions
    from scheduler.store.db import init_db

    init_db()
    run = detection.detect()
    if inline:
        for session_id in run.sessions:
            sessions.plan_session(session_id)
    else:
        messages.send_plans(run.sessions)
    claimed: list[dict[str, Any]] = [
        {
            "level": c.level,
            "uid": c.uid,
            "event": c.event,
            "revision": c.revision,
            "session_id": c.session_id,
        }
        for c in run.claimed
    ]
    if as_json:
        print_json({"skipped": run.skipped, "claimed": claimed})
        return
    if run.skipped:
        console.print("another detection run holds the lock; nothing done")
        return
    if not claimed:
        console.print("no stable candidates")
    for c in claimed:
        what = f"session {short(c['session_id'])}" if c["session_id"] else "already planned"
        found = f"{c['level']} {c['uid']} rev {c['revision']}: {c['event']}"
        console.print(f"{shown(found)} → {what}")


def candidate(study: str | None, series: str | None, patient: str | None) -> tuple[str, str]:
    given = [
        (lvl, uid)
        for lvl, uid in ((Level.STUDY, study), (Level.SERIES, series), (Level.PATIENT, patient))
        if uid
    ]
    if len(given) != 1:
        raise fail("name exactly one of --study, --series, --patient", 2)
    return given[0]


StudyOption = Annotated[str | None, typer.Option("--study", help="StudyInstanceUID.")]
SeriesOption = Annotated[str | None, typer.Option("--series", help="SeriesInstanceUID.")]
PatientOption = Annotated[str | None, typer.Option("--patient", help="PatientID.")]


@app.command()
def plan(
    study: StudyOption = None,
    series: SeriesOption = None,
    patient: PatientOption = None,
    event: Annotated[str | None, typer.Option(help="Event (default <level>.stable).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan, write nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Plan one candidate now (idempotent: the same data is planned once)."""
    from scheduler import sessions
    from scheduler.headers import UnknownCandidateError
    from scheduler.store.db import init_db

    level, uid = candidate(study, series, patient)
    event = event or f"{level}.stable"
    if dry_run:
        open_store()
    else:
        init_db()
    try:
        if dry_run:
            result, _headers = sessions.decide_for(level, uid, event)
            document: dict[str, Any] = {
                "dry_run": True,
                "event": event,
                "level": level,
                "uid": uid,
                "jobs": result.job_names,
                "urgent": result.urgent,
                "trace": result.trace,
            }
        else:
            session_id = sessions.open_session(level, uid, event, manual=False)
            if session_id is None:
                console.print("this data was already planned for this event; nothing to do")
                return
            planned = sessions.plan_session(session_id)
            if planned is None:
                raise fail(f"session {session_id} could not be planned (see `show {session_id}`)")
            document = {
                "dry_run": False,
                "session_id": session_id,
                "event": event,
                "level": level,
                "uid": uid,
                "jobs": planned.plan.job_names,
                "urgent": planned.plan.urgent,
                "trace": planned.plan.trace,
            }
    except UnknownCandidateError as exc:
        raise fail(str(exc)) from exc
    trace: dict[str, Any] = document["trace"]
    jobs: list[str] = document["jobs"]
    if as_json:
        print_json(document)
        return
    print_trace(trace)
    if not dry_run:
        console.print(f"session {document['session_id']} planned with {len(jobs)} job(s)")


def print_trace(trace: dict[str, Any]) -> None:
    grid = table("job", "phase", "decision", "reason", title=f"plan for {trace.get('event')}")
    for name, entry in trace.get("jobs", {}).items():
        decision = (
            "[green]scheduled[/green]" if entry.get("scheduled") else "[dim]not scheduled[/dim]"
        )
        grid.add_row(
            shown(name),
            shown(entry.get("phase", "")),
            decision,
            shown(first_line(entry.get("reason"))),
        )
    print_table(grid)
    for reason in trace.get("urgent", []):
        console.print(f"[bold red]urgent:[/bold red] {shown(reason)}", highlight=False)
    for problem in trace.get("service_problems", []):
        errors.print(f"[red]service problem:[/red] {shown(problem)}", highlight=False)
    for warning in trace.get("warnings", []):
        errors.print(f"[yellow]warning:[/yellow] {shown(warning)}", highlight=False)


@app.command()
def trigger(
    event: Annotated[str, typer.Argument(help="Event name, e.g. reprocess.")],
    study: StudyOption = None,
    series: SeriesOption = None,
    patient: PatientOption = None,
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where",
            help="Cohort: FIELD=VALUE on a stored tag (* matches anything); repeatable.",
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Cohort: study date on or after (YYYY-MM-DD).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Cohort: study date on or before (YYYY-MM-DD).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(max=LARGEST_LIMIT, help="Cohort: at most this many sessions.")
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Cohort: sessions opened at most, e.g. 30/min, 2/s, 500/h.")
    ] = None,
    cohort_level: Annotated[
        Level, typer.Option("--level", help="Cohort: one session per study, series or patient.")
    ] = Level.STUDY,
    name: Annotated[
        str | None, typer.Option(help="Cohort name (default <event>-<date>-<time>).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Cohort: count the matches, open nothing.")
    ] = False,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Cohort: start it and return, no progress bar.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Start a new session for a resource with a custom event, or, with
    --where/--since/--until/--limit, a cohort run over every match."""
    from scheduler import sessions as session_flow
    from scheduler.headers import UnknownCandidateError
    from scheduler.store.db import init_db

    if where or since or until or limit is not None:
        if study or series or patient:
            raise fail("give --study/--series/--patient or cohort criteria, not both", 2)
        cohort = CohortRequest(event, cohort_level, where or [], since, until, limit, rate, name)
        start_cohort(cohort, dry_run=dry_run, no_wait=no_wait, as_json=as_json)
        return
    if dry_run or rate or name:
        raise fail(
            "--dry-run, --rate and --name are for cohorts: add --where, --since or --limit", 2
        )
    if not re.fullmatch(EVENT_NAME, event):
        raise fail(f"event {event!r}: use letters, digits and _ . : - (128 at most)", 2)
    level, uid = candidate(study, series, patient)
    init_db()
    try:
        planned = session_flow.trigger(event, level, uid)
    except UnknownCandidateError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print_json(planned.as_dict(event, level, uid))
        return
    print_trace(planned.plan.trace)
    console.print(
        f"session {planned.session_id} ({event}) planned with {len(planned.plan.jobs)} job(s)"
    )


@dataclass(frozen=True)
class CohortRequest:
    """A cohort run as ``trigger`` was given it."""

    event: str
    level: str
    where: list[str]
    since: str | None
    until: str | None
    limit: int | None
    rate: str | None
    name: str | None


def start_cohort(request: CohortRequest, *, dry_run: bool, no_wait: bool, as_json: bool) -> None:
    """``trigger --where …``: count (``--dry-run``) or start a cohort run,
    then follow it with a progress bar in a terminal."""
    from scheduler import cohorts
    from scheduler.store.db import init_db

    try:
        criteria = cohorts.Criteria(
            cohorts.parse_where(request.where),
            request.since and cohorts.parse_day(request.since, "--since"),
            request.until and cohorts.parse_day(request.until, "--until"),
            request.limit,
        )
        rate = cohorts.parse_rate(request.rate)
        if dry_run:
            open_store()
            found = cohorts.preview(request.level, criteria)
        else:
            init_db()
            started = cohorts.start(
                request.event, request.level, criteria, rate_per_min=rate, name=request.name
            )
    except cohorts.CohortExistsError as exc:
        raise fail(str(exc)) from exc
    except cohorts.CohortError as exc:
        raise fail(str(exc), 2) from exc
    if dry_run:
        if as_json:
            print_json(found.as_dict() | {"dry_run": True, "criteria": criteria.as_dict()})
            return
        console.print(f"{found.count} {request.level}(s) match; nothing opened (--dry-run)")
        for uid in found.first:
            console.print(f"  {shown(uid)}", highlight=False)
        if found.count > len(found.first):
            console.print(f"  … and {found.count - len(found.first)} more")
        return
    if as_json:
        print_json(started)
        return
    warn_without_beat()
    if no_wait or not console.is_terminal:
        console.print(cohort_line(started))
        return
    follow_cohort(started)


def warn_without_beat() -> None:
    """Cohort runs open their sessions on beat: say so when it is not running."""
    from scheduler.doctor import OK, check_beat

    beat = check_beat(get_settings())
    if beat.status != OK:
        errors.print(
            f"[yellow]warning:[/yellow] {beat.detail}; the cohort opens its sessions on beat: "
            f"{beat.fix}",
            highlight=False,
        )


def cohort_line(cohort: dict[str, Any]) -> str:
    counts = ", ".join(f"{s} {n}" for s, n in cohort["sessions"].items() if n)
    return (
        f"cohort {cohort['name']} ({cohort['event']}, {cohort['status']}): "
        f"opened {cohort['opened']}/{cohort['total']}, ended {cohort['ended']}"
        + (f" ({counts})" if counts else "")
    )


def follow_cohort(cohort: dict[str, Any]) -> None:
    """A progress bar of the cohort's ended sessions until it is done; Ctrl-C
    stops following, not the cohort."""
    import time

    from scheduler import cohorts

    name = cohort["name"]
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(name, total=cohort["total"])
            while True:
                progress.update(
                    task,
                    total=cohort["total"],
                    completed=cohort["ended"],
                    description=f"{name}: opened {cohort['opened']}/{cohort['total']}, ended",
                )
                if cohort["status"] in (cohorts.DONE, cohorts.CANCELLED):
                    break
                time.sleep(1.0)
                cohort = cohorts.summary(name)
    except KeyboardInterrupt:
        console.print(
            f"stopped following; cohort {name} keeps running "
            f"(dcm-scheduler cohorts; stop it with dcm-scheduler cancel --cohort {name})"
        )
        return
    console.print(cohort_line(cohort))


@app.command("cohorts")
def cohorts_command(as_json: JsonOption = False) -> None:
    """Cohort runs, newest first, with their sessions counted by status."""
    from scheduler import cohorts
    from scheduler.store.db import transaction

    open_store()
    with transaction() as db:
        rows = cohorts.list_cohorts(db)
    if as_json:
        print_json(rows)
        return
    grid = table(
        "cohort", "event", "level", "status", "opened", "total", *STATUS_COLUMNS, "created"
    )
    for row in rows:
        grid.add_row(
            row["name"],
            row["event"],
            row["level"],
            styled(row["status"]),
            str(row["opened"]),
            str(row["total"]),
            *(str(row["sessions"].get(s, 0)) for s in STATUS_COLUMNS),
            when(row["created_at"]),
        )
    print_table(grid)


STATUS_COLUMNS = ("planning", "running", "succeeded", "failed", "partial", "cancelled")


@app.command()
def retry(
    job_id: Annotated[str | None, typer.Argument(help="A failed job's id.")] = None,
    session: Annotated[
        str | None, typer.Option("--session", help="Retry every failed job of this session.")
    ] = None,
    cohort: Annotated[
        str | None,
        typer.Option("--cohort", help="Retry every failed job of this cohort run's sessions."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Re-run failed jobs and what depends on them, in the same session."""
    from scheduler import control
    from scheduler.store.db import init_db

    if [job_id, session, cohort].count(None) != 2:
        raise fail("give a JOB_ID, --session ID or --cohort NAME", 2)
    init_db()
    if cohort is not None:
        from scheduler import cohorts

        report_action(
            lambda: cohorts.retry_cohort(cohort),
            as_json,
            lambda done: (
                f"cohort {cohort}: re-queued {done.jobs} job(s) in {len(done.sessions)} session(s)"
            ),
        )
        return
    report_action(
        lambda: control.retry_jobs(job_id=job_id, session_id=session),
        as_json,
        lambda report: (
            f"session {report.session_id}: re-queued {', '.join(report.requeued)} "
            f"({report.dispatched} sent now, the rest when their dependencies succeed)"
        ),
    )


def report_action(action: Callable[[], Any], as_json: bool, said: Callable[[Any], str]) -> None:
    """Run an operator's action and print its report: JSON, or one line. No
    such session, job or cohort, or nothing to do: one line, exit 1."""
    from scheduler import control, queries

    try:
        report = action()
    except (queries.NotFoundError, control.NothingToDoError) as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print_json(report.as_dict())
    else:
        console.print(shown(said(report)), highlight=False)


@app.command()
def cancel(
    session_id: Annotated[
        str | None, typer.Argument(help="Session id (or a unique prefix).")
    ] = None,
    cohort: Annotated[
        str | None,
        typer.Option("--cohort", help="Stop opening this cohort run and cancel its sessions."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel what has not started and stop what runs."""
    from scheduler import control
    from scheduler.store.db import init_db

    if (session_id is None) == (cohort is None):
        raise fail("give a SESSION_ID or --cohort NAME", 2)
    init_db()
    if cohort is not None:
        from scheduler import cohorts

        report_action(
            lambda: cohorts.cancel_cohort(cohort),
            as_json,
            lambda stopped: (
                f"cohort {cohort} cancelled: {len(stopped.sessions)} open "
                f"session(s) cancelled, {stopped.not_opened} never opened"
            ),
        )
        return
    assert session_id is not None
    report_action(
        lambda: control.cancel_session(session_id),
        as_json,
        lambda report: (
            f"session {report.session_id} cancelled: "
            f"{len(report.cancelled)} job(s) not started"
            + (f", stopping {', '.join(report.stopped)}" if report.stopped else "")
        ),
    )


@app.command()
def prune(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="Sessions that ended longer ago than this: 90d, 12h, 30m, 2w or seconds.",
        ),
    ],
    outputs: Annotated[
        bool, typer.Option("--outputs", help="Also delete their output folders.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete ended sessions older than AGE, their jobs and the data only they used."""
    from scheduler import retention
    from scheduler.config import parse_age
    from scheduler.store.db import init_db

    try:
        age = parse_age(older_than, what="--older-than")
    except ConfigError as exc:
        raise fail(str(exc), 2) from exc
    init_db()
    try:
        report = retention.prune(age, outputs=outputs, dry_run=dry_run)
    except retention.PruneBusyError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print_json(report.as_dict())
    else:
        print_prune(report.as_dict())
    for problem in report.output_errors:
        errors.print(f"[red]error:[/red] not removed: {printable(problem)}", highlight=False)
    if report.output_errors:
        raise typer.Exit(1)


def print_prune(counts: dict[str, Any]) -> None:
    dry_run = counts["dry_run"]
    grid = table(
        "what",
        "would go" if dry_run else "removed",
        title=f"sessions ended before {when(counts['cutoff'])} UTC"
        + (" (dry run: nothing deleted)" if dry_run else ""),
    )
    for name in (
        *("sessions", "jobs", "dependencies", "leases"),
        *("patients", "studies", "series", "instances", "workers"),
    ):
        grid.add_row(name, str(counts[name]))
    for name, count in counts["other_rows"].items():
        grid.add_row(name, str(count))
    if counts["outputs"]:
        folders, orphans = counts["output_folders"], counts["orphan_folders"]
        size = counts["bytes_freed"]
        gone = f" ({orphans} of sessions already gone)" if orphans else ""
        grid.add_row("output folders", f"{folders}{gone}")
        grid.add_row("bytes freed", f"{size} ({human_bytes(size)})")
    print_table(grid)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@app.command()
def workers(as_json: JsonOption = False) -> None:
    """Celery workers seen, the channels they consume, their last heartbeat."""
    from scheduler import queries
    from scheduler.store.db import transaction

    open_store()
    with transaction() as db:
        rows = queries.list_workers(db)
    if as_json:
        print_json(rows)
        return
    grid = table("worker", "channels", "last heartbeat", "age", "state")
    for row in rows:
        state = "[green]live[/green]" if row["live"] else "[red]silent[/red]"
        grid.add_row(
            shown(row["hostname"]),
            ", ".join(
                f"{shown(c)} [yellow](paused)[/yellow]" if c in row["paused"] else shown(c)
                for c in row["channels"]
            ),
            when(row["last_heartbeat"]),
            f"{row['age_s']:.0f}s",
            state,
        )
    print_table(grid)
    if not rows:
        console.print(
            "no worker is running (one that stops leaves this list): start one with "
            "`celery -A scheduler worker`, or `dcm-scheduler run` on one machine"
        )
    print_paused()


def print_paused() -> None:
    """One line per paused channel (README, "Pausing a channel")."""
    from scheduler import queries
    from scheduler.store.db import transaction

    with transaction() as db:
        paused = queries.list_paused(db)
    for row in paused:
        reason = f": {shown(row['reason'])}" if row["reason"] else ""
        channel = shown(row["channel"])
        console.print(
            f"[yellow]channel {channel} paused[/yellow] since "
            f"{when(row['paused_at'])}{reason}; {row['queued']} job(s) queued "
            f"(`dcm-scheduler resume {channel}`)"
        )


ChannelArgument = Annotated[str, typer.Argument(help="The channel (queue) name, like gpu.")]


@app.command()
def pause(
    channel: ChannelArgument,
    reason: Annotated[
        str | None, typer.Option(help="Why, shown by workers, doctor and the dashboard.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Stop sending the jobs of a channel; running ones finish, queued ones wait."""
    from scheduler import channels
    from scheduler.store.db import init_db

    try:
        channels.check_channel(channel)
        channels.check_reason(reason)
    except channels.ChannelNameError as exc:
        raise fail(str(exc), 2) from exc
    init_db()
    report = channels.pause(channel, reason)
    if as_json:
        print_json(report.as_dict())
        return
    if not channels.is_used(channel):
        errors.print(
            f"[yellow]warning:[/yellow] no service job, stored job or worker uses channel "
            f"{channel!r}: a typo? (`dcm-scheduler workers` lists the channels)",
            highlight=False,
        )
    console.print(
        f"channel {channel} paused: {report.queued} queued job(s) wait; running ones finish "
        f"(`dcm-scheduler resume {channel}` sends them)"
    )


@app.command()
def resume(channel: ChannelArgument, as_json: JsonOption = False) -> None:
    """Send a paused channel's jobs again, in priority order."""
    from scheduler import channels
    from scheduler.store.db import init_db

    try:
        channels.check_channel(channel)
    except channels.ChannelNameError as exc:
        raise fail(str(exc), 2) from exc
    init_db()
    try:
        report = channels.resume(channel)
    except channels.NotPausedError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print_json(report.as_dict())
        return
    console.print(f"channel {channel} resumed: {report.sent} queued job(s) sent")


@app.command("sessions")
def sessions_command(
    status: Annotated[
        SessionStatus | None, typer.Option(help="Only sessions with this status.")
    ] = None,
    uid: Annotated[str | None, typer.Option(help="Only sessions of this UID.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=LARGEST_LIMIT, help="At most this many.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Scheduling sessions, newest first."""
    from scheduler import queries
    from scheduler.store.db import transaction

    open_store()
    with transaction() as db:
        rows = queries.list_sessions(db, status=status, uid=uid, limit=limit)
    if as_json:
        print_json(rows)
        return
    grid = table("session", "event", "level", "uid", "rev", "status", "", "created", "finished")
    for row in rows:
        grid.add_row(
            short(row["id"]),
            shown(row["event"]),
            shown(row["level"]),
            shown(row["uid"]),
            str(row["revision"]),
            styled(row["status"]),
            "[bold red]urgent[/bold red]" if row.get("urgent") else "",
            when(row["created_at"]),
            when(row["finished_at"]),
        )
    print_table(grid)
    more_than_shown(len(rows), limit, "sessions")


@app.command("jobs")
def jobs_command(
    session: Annotated[
        str | None, typer.Option("--session", help="Only this session's jobs.")
    ] = None,
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs with this status.")] = None,
    service: Annotated[
        str | None, typer.Option("--service", help="Only jobs of this service.")
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Only jobs run by this version of --service."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=LARGEST_LIMIT, help="At most this many.")] = 500,
    as_json: JsonOption = False,
) -> None:
    """Jobs, with their status, attempts and worker; with --service and
    --version, what one version of a service ran and where its outputs are."""
    from scheduler import queries
    from scheduler.store.db import transaction

    if version is not None and service is None:
        raise fail("--version needs --service: versions are numbered per service", code=2)
    open_store()
    try:
        with transaction() as db:
            session_id = queries.resolve_session_id(db, session) if session else None
            rows = queries.list_jobs(
                db,
                session_id=session_id,
                status=status,
                service=service,
                version=version,
                limit=limit,
            )
    except queries.NotFoundError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print_json(rows)
        return
    if service is not None:
        if not rows:
            raise fail(no_jobs_of(service, version, status))
        print_provenance(rows)
        return
    grid = table(
        "job id", "session", "job", "phase", "channel", "status", "attempts", "worker", "duration"
    )
    for row in rows:
        grid.add_row(
            short(row["id"]),
            short(row["session_id"]),
            shown(row["job_name"]),
            shown(row["phase"]),
            shown(row["channel"]),
            styled(row["status"]),
            str(row["attempts"]),
            shown(row["worker"]),
            seconds(row["duration_s"]),
        )
    print_table(grid)
    more_than_shown(len(rows), limit, "jobs")


def provenance_lines(jobs: list[dict[str, Any]]) -> list[str]:
    """Which code ran the session's jobs: one line per service version, hash
    and interpreter."""
    ran: dict[tuple[str, str, str, str], list[str]] = {}
    for job in jobs:
        key = (
            job["service"],
            job["service_version"],
            job["service_hash"],
            job["interpreter"] or "",
        )
        ran.setdefault(key, []).append(job["job_name"])
    lines = []
    for (service, version, content_hash, interpreter), names in ran.items():
        line = f"code: {service} {version or '(no version)'}"
        line += f" hash {content_hash[:12]}" if content_hash else ""
        line += f", python {interpreter}" if interpreter else ""
        lines.append(f"{line} — {', '.join(names)}")
    return lines


def no_jobs_of(service: str, version: str | None, status: str | None) -> str:
    """Why a recall found nothing: a mistyped version must not read as "that
    version ran nothing"."""
    from scheduler import queries
    from scheduler.store.db import transaction

    with transaction() as db:
        versions = queries.service_versions(db, service)
    what = f"no {status + ' ' if status else ''}jobs of service {service!r}"
    what += f" at version {version!r}" if version is not None else ""
    if not versions:
        return f"{what}: no job of that service was ever planned (service names: `services list`)"
    return f"{what}; versions with jobs: {', '.join(versions)}"


def print_provenance(rows: list[dict[str, Any]]) -> None:
    """Jobs of one service with the code that ran them and their outputs."""
    grid = table("job id", "session", "job", "version", "hash", "status", "finished", "outputs")
    for row in rows:
        grid.add_row(
            short(row["id"]),
            short(row["session_id"]),
            shown(row["job_name"]),
            shown(row["service_version"]),
            shown(row["service_hash"][:12]),
            styled(row["status"]),
            when(row["finished_at"]),
            shown(row["output_dir"]),
        )
    print_table(grid)


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}s"


@app.command()
def show(
    session_id: Annotated[str, typer.Argument(help="Session id (or a unique prefix).")],
    as_json: JsonOption = False,
) -> None:
    """A session's DAG with statuses, timings and the planning trace."""
    from scheduler import queries
    from scheduler.store.db import transaction

    open_store()
    try:
        with transaction() as db:
            document = queries.show_session(db, session_id)
    except queries.NotFoundError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print_json(document)
        return
    render_session(document)


def render_session(document: dict[str, Any]) -> None:
    from scheduler import queries

    console.print(
        f"session [bold]{document['id']}[/bold]  {shown(document['level'])} "
        f"{shown(document['uid'])}  event {shown(document['event'])}  "
        f"revision {document['revision']}  "
        f"status {styled(document['status'])}"
        + ("  [bold red]urgent[/bold red]" if document.get("urgent") else ""),
        highlight=False,
    )
    if document.get("error"):
        console.print(f"[red]{shown(document['error'])}[/red]", highlight=False)
    grid = table("stage", "job", "phase", "status", "attempts", "duration", "after")
    for index, stage in enumerate(queries.stages(document["jobs"]), start=1):
        for job in stage:
            mark = STATUS_MARK.get(job["status"], " ")
            grid.add_row(
                str(index),
                f"{mark} {shown(job['job_name'])}",
                shown(job["phase"]),
                styled(job["status"]),
                str(job["attempts"]),
                seconds(job["duration_s"]),
                shown(", ".join(job["depends_on"])),
            )
    if document["jobs"]:
        print_table(grid)
    for line in provenance_lines(document["jobs"]):
        console.print(printable(line), highlight=False, markup=False)
    for job in document["jobs"]:
        if job["error"]:
            console.print(
                f"[red]{shown(job['job_name'])}[/red]: {shown(first_line(job['error']))}",
                highlight=False,
            )
        if job.get("waiting"):
            console.print(
                f"[yellow]{shown(job['job_name'])}[/yellow]: waiting, {shown(job['waiting'])}",
                highlight=False,
            )
    trace = document.get("trace") or {}
    for left_out in trace.get("services_left_out", []):
        console.print(
            f"[red]service {shown(repr(left_out['service']))} left out[/red] "
            f"({shown(left_out['file'])}): " + shown("; ".join(left_out["problems"])),
            highlight=False,
        )
    skipped = {
        name: entry for name, entry in trace.get("jobs", {}).items() if not entry.get("scheduled")
    }
    if skipped:
        console.print("not scheduled:")
        for name, entry in skipped.items():
            console.print(
                f"  {shown(name)}: {shown(first_line(entry.get('reason')))}", highlight=False
            )
    for warning in trace.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {shown(warning)}", highlight=False)
    if any(job["error"] for job in document["jobs"]) or any(
        entry.get("traceback") for entry in skipped.values()
    ):
        console.print(f"(full errors and tracebacks: dcm-scheduler show {document['id']} --json)")


@app.command("run")
def run_command(
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Worker processes (default: one per CPU).")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show the worker's own output.")] = False,
    restarts: Annotated[
        int,
        typer.Option(
            min=0, help="Restarts of a dying worker allowed within ten minutes; then stop."
        ),
    ] = 5,
) -> None:
    """All-in-one on this machine: a supervised Celery worker with embedded beat."""
    from scheduler.allinone import run
    from scheduler.broker import url_problem

    # Refused here, once: the worker would die on it and be restarted in vain.
    problem = url_problem(get_settings().broker_url)
    if problem:
        errors.print(f"[red]error:[/red] {problem}", highlight=False)
        raise typer.Exit(2)
    raise typer.Exit(run(console, concurrency=concurrency, verbose=verbose, restarts=restarts))


@app.command()
def doctor(as_json: JsonOption = False) -> None:
    """Check store, broker, services, workers and Orthanc; say how to fix problems."""
    from scheduler.doctor import OK, PROBLEM, run_checks

    checks = run_checks()
    if as_json:
        print_json([c.as_dict() for c in checks])
    else:
        marks = {
            OK: "[green]ok[/green]",
            "warning": "[yellow]warning[/yellow]",
            PROBLEM: "[red]problem[/red]",
        }
        for check in checks:
            console.print(
                f"{marks[check.status]} {check.name}: {shown(check.detail)}", highlight=False
            )
            if check.fix:
                console.print(f"         fix: {shown(check.fix)}", highlight=False)
    if any(c.status == PROBLEM for c in checks):
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8765,
) -> None:
    """HTTP API, dashboard and dcm-processor's POST /stable-patient push."""
    from scheduler.api import serve as serve_api

    # Like the reading commands: a mistyped DCM_HOME must not serve (and
    # report to Prometheus) an empty new store, nor upgrade a shared one.
    open_store()
    problem = address_problem(host, port)
    if problem:
        raise fail(problem)
    serve_api(host, port)


def address_problem(host: str, port: int) -> str | None:
    """Why ``serve`` could not listen on ``host:port`` (in use, no such
    address, not allowed), found before the server starts and says it in
    five log lines."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


@app.command()
def demo(
    home: Annotated[
        Path | None,
        typer.Option(help="Folder for the demo's state (default: a new temporary one)."),
    ] = None,
    all_samples: Annotated[
        bool, typer.Option("--all-samples", help="Ingest every pydicom sample, odd ones too.")
    ] = False,
) -> None:
    """Run the example services on pydicom's sample files, start to finish."""
    from scheduler.demo import run_demo

    code = run_demo(home, console, all_samples=all_samples)
    raise typer.Exit(code)


def main() -> None:
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    try:
        app()
    except DBAPIError as exc:
        settings = get_settings()
        reason = str(exc.orig or exc).strip().splitlines()[0]
        errors.print(
            f"[red]error:[/red] the store at {mask(settings.database_url)} answered: "
            f"{hide_secrets(reason, settings.database_url)}",
            highlight=False,
        )
        sys.exit(1)
    except (SQLAlchemyError, OSError) as exc:
        errors.print(f"[red]error:[/red] {type(exc).__name__}: {exc}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
