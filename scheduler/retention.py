"""Retention: pruning what ended long ago (README, "Retention").

:func:`prune` removes the sessions that ended (a final status) before a
cutoff, with their jobs, the edges between those jobs, every other row that
points at them and the ``plan:<session>`` lease, and optionally their output
folders under ``DCM_OUTPUT_DIR``. A session still ``planning`` or
``running``, or with a job ``queued`` or ``running`` (a retry under way), is
never touched: each batch re-checks that with the rows locked, so a retry or
a new attempt that races with the prune wins.

What was received goes with the sessions that used it, one study at a time:
a study's instance, series and study rows are deleted once no session is
left for the study, its series or its patient, nothing arrived for it since
the cutoff, and it is not waiting for detection at a configured level; a
patient goes once it has no study left. The same study arriving again is
then new data: new rows, revision 1, a session planned normally — never
late data of a session that no longer exists, never skipped as "already
known". A study still used by a kept session keeps its rows.

Output folders go after their rows are committed, so a session that a
racing retry kept never loses its outputs; with ``outputs`` a prune also
removes the folders named like a session id whose session is gone and that
nothing touched since the cutoff (left by a prune without ``outputs``, or
one stopped between its rows and its folders). Nothing is followed through
a symlink: a link is removed as a link.

Work is done in batches of short transactions, never one transaction for a
year of data, so live detection, planning and jobs wait for at most one
batch. A ``--dry-run`` reads the same batches and counts what would go.
The ``prune`` lease keeps two prunes (two beats, or beat and an operator)
from running at once.

Counters and histograms of ``/metrics`` never go down for a prune: each
batch adds what it deletes to the ``metric_carry`` table in the transaction
that deletes it (:func:`scheduler.metrics.carried_samples`; README,
"Metrics").
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, delete, exists, false, func, or_, select, true
from sqlalchemy.orm import Session

from scheduler.config import Settings, get_settings
from scheduler.ingest import fingerprint
from scheduler.leases import acquire, new_holder, release, renewing
from scheduler.metrics import INSTANCES_SAMPLE, SampleKey, carried_samples, labels_key
from scheduler.presence import live_after
from scheduler.sessions import lease_name
from scheduler.store.db import dialect_name, insert_for, rowcount, transaction
from scheduler.store.models import (
    Base,
    Instance,
    Job,
    JobDependency,
    Lease,
    MetricCarry,
    Patient,
    SchedulingSession,
    Series,
    Study,
    Worker,
    utcnow,
)
from scheduler.store.reader import reader_of
from scheduler.vocabulary import (
    OPEN_JOB_STATUSES,
    SESSION_FINAL_STATUSES,
    Level,
    ResourceState,
)

log = logging.getLogger(__name__)

PRUNE_LEASE = "prune"
PRUNE_LEASE_TTL = 120.0
# Sessions per transaction; studies per transaction (each with all its instances).
SESSION_BATCH = 200
STUDY_BATCH = 20
# Largest IN (...) list sent in one statement.
IN_CHUNK = 500
# Carried metric samples per statement (three parameters each).
CARRY_CHUNK = 300
# An output folder is named after its session id; anything else is left alone.
SESSION_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# What a session id looks like (a UUID): the only names an orphan folder may have.
SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Tables with a count of their own in the report; others go to ``other_rows``.
COUNTED = ("sessions", "jobs", "dependencies", "leases")


class PruneBusyError(RuntimeError):
    """Another prune holds the ``prune`` lease."""


@dataclass
class PruneReport:
    """What a prune removed, or with ``dry_run`` would remove."""

    older_than_s: float
    cutoff: datetime
    dry_run: bool
    outputs: bool
    sessions: int = 0
    jobs: int = 0
    dependencies: int = 0
    leases: int = 0
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    # Workers silent since before the cutoff (killed, or their host gone).
    workers: int = 0
    output_folders: int = 0
    # Of those, folders whose session was already gone.
    orphan_folders: int = 0
    bytes_freed: int = 0
    # Output folders that could not be removed, with the reason.
    output_errors: list[str] = field(default_factory=list)
    # Rows of other tables that pointed at pruned sessions or jobs, by table.
    other_rows: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "older_than_s": self.older_than_s,
            "cutoff": self.cutoff.isoformat().replace("+00:00", "Z"),
            "outputs": self.outputs,
            "sessions": self.sessions,
            "jobs": self.jobs,
            "dependencies": self.dependencies,
            "leases": self.leases,
            "patients": self.patients,
            "studies": self.studies,
            "series": self.series,
            "instances": self.instances,
            "workers": self.workers,
            "output_folders": self.output_folders,
            "orphan_folders": self.orphan_folders,
            "bytes_freed": self.bytes_freed,
            "output_errors": list(self.output_errors),
            "other_rows": dict(sorted(self.other_rows.items())),
        }


def prune(
    older_than: float,
    *,
    outputs: bool = False,
    dry_run: bool = False,
    settings: Settings | None = None,
    now: datetime | None = None,
) -> PruneReport:
    """Prune sessions that ended more than ``older_than`` seconds ago; see the
    module docstring. Raises :class:`PruneBusyError` when another prune runs."""
    settings = settings or get_settings()
    cutoff = (now or utcnow()) - timedelta(seconds=older_than)
    report = PruneReport(older_than, cutoff, dry_run, outputs)
    holder = new_holder()
    if not acquire(PRUNE_LEASE, PRUNE_LEASE_TTL, holder):
        raise PruneBusyError("another prune is running (the 'prune' lease is held); try later")
    try:
        with renewing(PRUNE_LEASE, holder, PRUNE_LEASE_TTL):
            _Pruner(report, settings).run()
    finally:
        release(PRUNE_LEASE, holder)
    return report


def _chunks(values: Iterable[Any], size: int = IN_CHUNK) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for value in values:
        chunk.append(value)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _referrers(target: str, skip: Sequence[str]) -> list[tuple[Table, Any]]:
    """Columns of other tables with a foreign key to ``target``'s id, so rows
    that tables added later keep about a session or a job go with it."""
    found = []
    for table in Base.metadata.sorted_tables:
        if table.name in skip:
            continue
        for key in table.foreign_keys:
            if key.column.table.name == target:
                found.append((table, key.parent))
    return found


class _Pruner:
    def __init__(self, report: PruneReport, settings: Settings) -> None:
        self.report = report
        self.settings = settings
        self.cutoff = report.cutoff
        self.dry_run = report.dry_run
        self.output_root = settings.output_dir
        # Studies that go (or would go), and patients to look at afterwards.
        self.gone_studies: set[int] = set()
        self.patients: set[int] = set()

    # ---------------------------------------------------------------- sessions

    def prunable(self) -> ColumnElement[bool]:
        open_job = exists().where(
            Job.session_id == SchedulingSession.id,
            Job.status.in_(OPEN_JOB_STATUSES),
        )
        return and_(
            SchedulingSession.status.in_(SESSION_FINAL_STATUSES),
            SchedulingSession.finished_at < self.cutoff,
            ~open_job,
        )

    def run(self) -> None:
        after = ""
        while True:
            # Keyset pages on the primary key: each page costs its own rows,
            # whatever was deleted before it.
            with transaction() as db:
                page = list(
                    db.scalars(
                        select(SchedulingSession.id)
                        .where(SchedulingSession.id > after, self.prunable())
                        .order_by(SchedulingSession.id)
                        .limit(SESSION_BATCH)
                    )
                )
            if not page:
                break
            after = page[-1]
            references = self.sessions_batch(page)
            self.resources(references)
        self.patients_left()
        self.silent_workers()
        if self.report.outputs:
            self.orphans()

    def silent_workers(self) -> None:
        """A worker that stopped cleanly leaves the list itself; one that was
        killed stays, silent, until its last heartbeat is older than the
        cutoff."""
        # Never one that is live, whatever the cutoff.
        silent = Worker.last_heartbeat < min(self.cutoff, live_after())
        with transaction() as db:
            if self.dry_run:
                self.report.workers = db.scalar(select(func.count()).where(silent)) or 0
            else:
                self.report.workers = rowcount(db.execute(delete(Worker).where(silent)))

    def sessions_batch(self, page: list[str]) -> set[tuple[str, str]]:
        """Delete (or count) one page of sessions; returns the (level, uid)
        of the resources they were about."""
        report = self.report
        with transaction() as db:
            query = select(SchedulingSession.id, SchedulingSession.level, SchedulingSession.uid)
            query = query.where(SchedulingSession.id.in_(page), self.prunable())
            if not self.dry_run and dialect_name(db) == "postgresql":
                # Locked, then re-checked by PostgreSQL: a retry that got
                # there first keeps its session.
                query = query.with_for_update(of=SchedulingSession)
            rows = db.execute(query).all()
            ids = [row[0] for row in rows]
            if not ids:
                return set()
            jobs = select(Job.id).where(Job.session_id.in_(ids))
            edges = or_(JobDependency.job_id.in_(jobs), JobDependency.depends_on_id.in_(jobs))
            leases = Lease.name.in_([lease_name(i) for i in ids])
            counted: list[tuple[str, Any, ColumnElement[bool]]] = [
                ("dependencies", JobDependency.__table__, edges),
                *(
                    (table.name, table, column.in_(jobs))
                    for table, column in _referrers("jobs", ("jobs", "job_dependencies"))
                ),
                ("jobs", Job.__table__, Job.session_id.in_(ids)),
                *(
                    (table.name, table, column.in_(ids))
                    for table, column in _referrers("sessions", ("jobs",))
                ),
                ("leases", Lease.__table__, leases),
                ("sessions", SchedulingSession.__table__, SchedulingSession.id.in_(ids)),
            ]
            if not self.dry_run:
                carry(db, carried_samples(reader_of(db), ids))
            for name, table, where in counted:
                count = db.scalar(select(func.count()).select_from(table).where(where)) or 0
                if name in COUNTED:
                    setattr(report, name, getattr(report, name) + count)
                elif count:
                    report.other_rows[name] = report.other_rows.get(name, 0) + count
                if not self.dry_run and count:
                    db.execute(delete(table).where(where))
        if report.outputs:
            for session_id in ids:
                self.output_folder(session_id)
        return {(row[1], row[2]) for row in rows}

    # ------------------------------------------------------------------ outputs

    def output_folder(self, session_id: str) -> None:
        """Remove ``DCM_OUTPUT_DIR/<session id>`` without following a symlink
        anywhere: a link in it is removed as a link, and the folder itself
        being a link removes only the link."""
        if not SESSION_FOLDER.fullmatch(session_id):
            return
        folder = self.output_root / session_id
        try:
            status = folder.lstat()
        except FileNotFoundError:
            return
        self.remove(folder, status)

    def remove(self, folder: Path, status: os.stat_result, orphan: bool = False) -> None:
        size = _size(folder)
        if not self.dry_run:
            try:
                if stat.S_ISDIR(status.st_mode):
                    # rmtree never follows symlinks: it unlinks them.
                    shutil.rmtree(folder)
                else:
                    folder.unlink()
            except OSError as exc:
                log.warning("could not remove the output folder %s: %s", folder, exc)
                self.report.output_errors.append(f"{folder}: {exc.strerror or exc}")
                return
        self.report.output_folders += 1
        self.report.orphan_folders += orphan
        self.report.bytes_freed += size

    def orphans(self) -> None:
        """Session folders whose session is gone (pruned without
        ``--outputs``, or a prune stopped between its rows and its folders),
        untouched since the cutoff. Only names that are session ids count."""
        try:
            with os.scandir(self.output_root) as listing:
                named = {e.name: e.path for e in listing if SESSION_ID.fullmatch(e.name)}
        except OSError:
            return
        for chunk in _chunks(sorted(named)):
            with transaction() as db:
                known = set(
                    db.scalars(select(SchedulingSession.id).where(SchedulingSession.id.in_(chunk)))
                )
            for name in chunk:
                if name in known:
                    continue
                folder = Path(named[name])
                try:
                    status = folder.lstat()
                except FileNotFoundError:
                    continue
                if status.st_mtime < self.cutoff.timestamp():
                    self.remove(folder, status, orphan=True)

    # ---------------------------------------------------------------- resources

    def resources(self, references: set[tuple[str, str]]) -> None:
        if not references:
            return
        with transaction() as db:
            studies = self.studies_of(db, references)
        studies -= self.gone_studies
        for chunk in _chunks(sorted(studies), STUDY_BATCH):
            with transaction() as db:
                self.studies_batch(db, chunk)

    def studies_of(self, db: Session, references: set[tuple[str, str]]) -> set[int]:
        by_level: dict[str, list[str]] = {level: [] for level in Level}
        for level, uid in references:
            if level in by_level:
                by_level[level].append(uid)
        found: set[int] = set()
        for uids in _chunks(by_level[Level.STUDY]):
            found.update(db.scalars(select(Study.id).where(Study.study_uid.in_(uids))))
        for uids in _chunks(by_level[Level.SERIES]):
            found.update(db.scalars(select(Series.study_pk).where(Series.series_uid.in_(uids))))
        for uids in _chunks(by_level[Level.PATIENT]):
            found.update(
                db.scalars(
                    select(Study.id)
                    .join(Patient, Study.patient_pk == Patient.id)
                    .where(Patient.patient_id.in_(uids))
                )
            )
            self.patients.update(db.scalars(select(Patient.id).where(Patient.patient_id.in_(uids))))
        return found

    def remaining(self) -> ColumnElement[bool]:
        """Sessions that keep a resource: after a real batch, every session
        still there; in a dry run, every session the prune would keep."""
        return true() if not self.dry_run else ~self.prunable()

    def waiting(self, model: Any, level: str, recent: bool = True) -> ColumnElement[bool]:
        """Rows that received something after the cutoff (with ``recent``), or
        wait for detection at a level that is detected."""
        busy: list[ColumnElement[bool]] = [false()]
        if recent:
            busy.append(model.last_received_at >= self.cutoff)
        if level in self.settings.detect_levels:
            busy.append(model.state == ResourceState.RECEIVING)
        return or_(*busy)

    def studies_batch(self, db: Session, pks: list[int]) -> None:
        lock = not self.dry_run and dialect_name(db) == "postgresql"
        # Series before studies before patients: the order every ingest locks in.
        series_query = select(
            Series.id, Series.series_uid, Series.study_pk, self.waiting(Series, Level.SERIES)
        ).where(Series.study_pk.in_(pks))
        study_query = (
            select(
                Study.id,
                Study.study_uid,
                Study.patient_pk,
                Patient.patient_id,
                or_(
                    self.waiting(Study, Level.STUDY),
                    # A patient takes other studies too: only a pending
                    # patient-level candidate holds this one.
                    self.waiting(Patient, Level.PATIENT, recent=False),
                ),
            )
            .join(Patient, Study.patient_pk == Patient.id)
            .where(Study.id.in_(pks))
        )
        if lock:
            series_query = series_query.with_for_update(of=Series)
            study_query = study_query.with_for_update(of=Study)
        series_rows = db.execute(series_query).all()
        study_rows = db.execute(study_query).all()
        keep = {pk for pk, _uid, _patient_pk, _pid, busy in study_rows if busy}
        keep.update(study_pk for _pk, _uid, study_pk, busy in series_rows if busy)
        used = or_(
            and_(
                SchedulingSession.level == Level.STUDY,
                SchedulingSession.uid.in_([row[1] for row in study_rows]),
            ),
            and_(
                SchedulingSession.level == Level.SERIES,
                SchedulingSession.uid.in_([row[1] for row in series_rows]),
            ),
            and_(
                SchedulingSession.level == Level.PATIENT,
                SchedulingSession.uid.in_(sorted({row[3] for row in study_rows})),
            ),
            false(),
        )
        kept_uids = set(
            db.execute(
                select(SchedulingSession.level, SchedulingSession.uid).where(used, self.remaining())
            ).all()
        )
        for pk, uid, _patient_pk, patient_id, _busy in study_rows:
            if (Level.STUDY, uid) in kept_uids or (Level.PATIENT, patient_id) in kept_uids:
                keep.add(pk)
        for _pk, uid, study_pk, _busy in series_rows:
            if (Level.SERIES, uid) in kept_uids:
                keep.add(study_pk)
        gone = [row[0] for row in study_rows if row[0] not in keep]
        if not gone:
            return
        self.gone_studies.update(gone)
        self.patients.update(row[2] for row in study_rows if row[0] in gone)
        gone_series = [row[0] for row in series_rows if row[2] in gone]
        report = self.report
        instances = Instance.series_pk.in_(gone_series)
        deleted = db.scalar(select(func.count()).select_from(Instance).where(instances)) or 0
        report.instances += deleted
        report.series += len(gone_series)
        report.studies += len(gone)
        if not self.dry_run:
            carry(db, {(INSTANCES_SAMPLE, labels_key({})): float(deleted)})
            db.execute(delete(Instance).where(instances))
            db.execute(delete(Series).where(Series.id.in_(gone_series)))
            db.execute(delete(Study).where(Study.id.in_(gone)))

    def patients_left(self) -> None:
        """Patients whose studies all went; a patient that keeps some has its
        counters and fingerprint recomputed from the instances it still has."""
        for chunk in _chunks(sorted(self.patients), STUDY_BATCH):
            with transaction() as db:
                self.patients_batch(db, chunk)

    def patients_batch(self, db: Session, pks: list[int]) -> None:
        lock = not self.dry_run and dialect_name(db) == "postgresql"
        query = select(Patient.id, Patient.patient_id, self.waiting(Patient, Level.PATIENT))
        query = query.where(Patient.id.in_(pks))
        if lock:
            query = query.with_for_update(of=Patient)
        rows = db.execute(query).all()
        # Studies that stay (a dry run deleted none: those it would are skipped).
        with_studies = {
            patient_pk
            for study_pk, patient_pk in db.execute(
                select(Study.id, Study.patient_pk).where(Study.patient_pk.in_(pks))
            )
            if study_pk not in self.gone_studies
        }
        kept_ids = set(
            db.scalars(
                select(SchedulingSession.uid).where(
                    SchedulingSession.level == Level.PATIENT,
                    SchedulingSession.uid.in_([row[1] for row in rows]),
                    self.remaining(),
                )
            )
        )
        gone = [
            pk
            for pk, patient_id, busy in rows
            if pk not in with_studies and patient_id not in kept_ids and not busy
        ]
        self.report.patients += len(gone)
        if self.dry_run:
            return
        if gone:
            db.execute(delete(Patient).where(Patient.id.in_(gone)))
        for pk in sorted(with_studies):
            _recount_patient(db, pk)


def carry(db: Session, samples: dict[SampleKey, float]) -> None:
    """Add ``samples`` to what ``metric_carry`` holds, in ``db``'s
    transaction (the one deleting the rows they came from)."""
    insert = insert_for(db)
    rows = [
        {"sample": sample, "labels": labels, "value": value}
        for (sample, labels), value in sorted(samples.items())
    ]
    # Zeros too: a histogram's empty buckets must stay once its rows are gone.
    for chunk in _chunks(rows, CARRY_CHUNK):
        statement = insert(MetricCarry).values(chunk)
        db.execute(
            statement.on_conflict_do_update(
                index_elements=["sample", "labels"],
                set_={"value": MetricCarry.value + statement.excluded.value},
            )
        )


def _recount_patient(db: Session, pk: int) -> None:
    """Count, first instance, fingerprint and newest instance of a patient
    from the instances it still holds; its state and last arrival stay."""
    members = db.execute(
        select(Instance.sop_uid, Instance.received_at, Instance.id)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.patient_pk == pk)
    ).all()
    patient = db.get(Patient, pk)
    if patient is None or not members:
        return
    count = len(members)
    if count == patient.instance_count:
        return
    patient.instance_count = count
    patient.fingerprint = fingerprint(uid for uid, _at, _id in members)
    patient.first_received_at = min(at for _uid, at, _id in members)
    patient.last_instance_id = max(instance for _uid, _at, instance in members)


def _size(path: Path) -> int:
    """Bytes of the files under ``path``, never following a symlink."""
    try:
        status = path.lstat()
    except OSError:
        return 0
    if not stat.S_ISDIR(status.st_mode):
        return status.st_size if stat.S_ISREG(status.st_mode) else 0
    total = 0
    for folder, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                entry = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if stat.S_ISREG(entry.st_mode):
                total += entry.st_size
    return total
