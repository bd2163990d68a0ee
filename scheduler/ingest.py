"""Recording received instances in the store (README, "Commands").

:func:`record_instances` records a batch in the caller's transaction with
``INSERT … ON CONFLICT DO NOTHING`` at every level, so re-recording an
instance, or two ingests racing on the same study, is a no-op rather than an
error. It then refreshes, for every series, study and patient that received
something new, the counters, timestamps, ``fingerprint`` and ``state``: a new
instance in a ``stable`` resource turns it back to ``receiving``.
:func:`ingest_paths` is the file-system front end used by the CLI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from scheduler.dicom import InstanceItem, NotDicomError, item_from_dataset, item_from_mapping
from scheduler.dicom import read_header as read_header
from scheduler.store.db import insert_for
from scheduler.store.models import Instance, Patient, Series, Study, utcnow
from scheduler.vocabulary import ResourceState

BATCH_SIZE = 500

log = logging.getLogger(__name__)


@dataclass
class Rejection:
    location: str
    reason: str
    # Nothing could be read there: a missing path, a folder or file without
    # permission. Not DICOM, or DICOM without its UIDs, is not unreadable.
    unreadable: bool = False


@dataclass
class IngestResult:
    recorded: int = 0
    known: int = 0
    not_dicom: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    def add(self, other: IngestResult) -> None:
        self.recorded += other.recorded
        self.known += other.known
        self.not_dicom += other.not_dicom
        self.rejected.extend(other.rejected)

    @property
    def unreadable(self) -> int:
        return sum(1 for rejection in self.rejected if rejection.unreadable)

    def as_dict(self) -> dict[str, Any]:
        return {
            "recorded": self.recorded,
            "known": self.known,
            "not_dicom": self.not_dicom,
            "unreadable": self.unreadable,
            "rejected": [{"location": r.location, "reason": r.reason} for r in self.rejected],
        }


def fingerprint(sop_uids: Iterable[str]) -> str:
    """Hash of the sorted SOPInstanceUIDs of a resource."""
    digest = hashlib.sha256()
    for uid in sorted(sop_uids):
        digest.update(uid.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _to_item(raw: InstanceItem | Dataset | dict[str, Any]) -> InstanceItem:
    if isinstance(raw, InstanceItem):
        return raw
    if isinstance(raw, Dataset):
        location = str(getattr(raw, "filename", "") or "")
        return item_from_dataset(raw, location=location)
    tags = {k: v for k, v in raw.items() if k not in ("location", "source_id")}
    return item_from_mapping(tags, str(raw.get("location", "")), raw.get("source_id"))


def _insert_ignore(db: Session, model: Any, rows: list[dict[str, Any]], key: str) -> list[Any]:
    """Insert rows whose ``key`` is not present yet; returns the keys inserted."""
    if not rows:
        return []
    # Many instances share a patient, study or series: one row per key.
    unique: dict[Any, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(row[key], row)
    rows = list(unique.values())
    insert = insert_for(db)
    statement = insert(model).on_conflict_do_nothing(index_elements=[key])
    column = getattr(model, key)
    return list(db.scalars(statement.returning(column), rows))


def _ids(db: Session, column: Any, keys: Iterable[str]) -> dict[str, int]:
    keys = list(set(keys))
    if not keys:
        return {}
    model = column.class_
    rows = db.execute(select(column, model.id).where(column.in_(keys)))
    return {key: pk for key, pk in rows}


def _new_resource(now: datetime, tags: dict[str, Any]) -> dict[str, Any]:
    return {
        "tags": tags,
        "instance_count": 0,
        "first_received_at": now,
        "last_received_at": now,
        "state": ResourceState.RECEIVING,
        "fingerprint": "",
        "revision": 0,
    }


def record_instances(
    db: Session,
    items: Iterable[InstanceItem | Dataset | dict[str, Any]],
    *,
    now: datetime | None = None,
) -> IngestResult:
    """Record instances in one transaction (the caller's); see the module docstring.

    Items are :class:`InstanceItem`, pydicom datasets, or dicts of tags plus
    ``location`` (and optionally ``source_id``). An item lacking a required
    UID is rejected with its reason; the others are recorded.
    """
    now = now or utcnow()
    result = IngestResult()
    batch: dict[str, InstanceItem] = {}
    for raw in items:
        try:
            item = _to_item(raw)
        except NotDicomError as exc:
            result.rejected.append(Rejection(exc.location, exc.reason))
            continue
        if item.sop_uid in batch:
            result.known += 1
        else:
            batch[item.sop_uid] = item
    if not batch:
        return result

    present = set(_ids(db, Instance.sop_uid, batch))
    result.known += len(present)
    # One order for every ingest, so concurrent ones take locks alike.
    fresh = sorted(
        (item for uid, item in batch.items() if uid not in present),
        key=lambda i: (i.patient_id, i.study_uid, i.series_uid, i.sop_uid),
    )
    if not fresh:
        return result

    _insert_ignore(
        db,
        Patient,
        [{"patient_id": i.patient_id, **_new_resource(now, i.patient_tags)} for i in fresh],
        "patient_id",
    )
    patients = _ids(db, Patient.patient_id, (i.patient_id for i in fresh))
    _insert_ignore(
        db,
        Study,
        [
            {"study_uid": i.study_uid, "patient_pk": patients[i.patient_id]}
            | _new_resource(now, i.study_tags)
            for i in fresh
        ],
        "study_uid",
    )
    studies = _ids(db, Study.study_uid, (i.study_uid for i in fresh))
    _insert_ignore(
        db,
        Series,
        [
            {"series_uid": i.series_uid, "study_pk": studies[i.study_uid]}
            | _new_resource(now, i.series_tags)
            for i in fresh
        ],
        "series_uid",
    )
    series = _ids(db, Series.series_uid, (i.series_uid for i in fresh))
    touched_series = {series[i.series_uid] for i in fresh}
    touched_studies = {studies[i.study_uid] for i in fresh}
    touched_patients = {patients[i.patient_id] for i in fresh}
    # Lock every resource that gains instances before adding any (series,
    # studies, patients, each in key order, as every ingest does): another
    # ingest into them waits for this one to commit, so a resource's instances
    # are committed in id order and "id <= last_instance_id" is exactly the
    # set its fingerprint covers. A detector skips locked rows.
    for model, pks in (
        (Series, touched_series),
        (Study, touched_studies),
        (Patient, touched_patients),
    ):
        _lock(db, model, pks)
    rows = [
        {
            "sop_uid": i.sop_uid,
            "series_pk": series[i.series_uid],
            "tags": i.instance_tags,
            "location": i.location,
            "source_id": i.source_id,
            "received_at": now,
        }
        for i in fresh
    ]
    # A concurrent ingest may have recorded some of them first.
    result.recorded = len(_insert_ignore(db, Instance, rows, "sop_uid"))
    result.known += len(fresh) - result.recorded

    _refresh(db, Series, Instance.series_pk, touched_series, now, joins=())
    _refresh(db, Study, Series.study_pk, touched_studies, now, joins=(Series,))
    _refresh(db, Patient, Study.patient_pk, touched_patients, now, joins=(Series, Study))
    return result


def _lock(db: Session, model: Any, pks: set[int]) -> None:
    # NO KEY UPDATE: compatible with the KEY SHARE locks our own FK inserts take.
    db.execute(
        select(model.id).where(model.id.in_(pks)).order_by(model.id).with_for_update(key_share=True)
    )


def _refresh(
    db: Session,
    model: Any,
    owner: Any,
    pks: set[int],
    now: datetime,
    joins: Sequence[Any],
) -> None:
    """Recompute count, first/last received, fingerprint and the newest
    instance; back to ``receiving``. The rows were locked before this
    ingest added instances (:func:`record_instances`), so the recount sees
    every committed instance and no other ingest changes them meanwhile."""
    query = select(owner, Instance.sop_uid, Instance.received_at, Instance.id).select_from(Instance)
    if joins:
        query = query.join(Series, Instance.series_pk == Series.id)
    if Study in joins:
        query = query.join(Study, Series.study_pk == Study.id)
    uids: dict[int, list[str]] = {pk: [] for pk in pks}
    first: dict[int, datetime] = {}
    newest: dict[int, int] = {}
    for pk, uid, received, instance_id in db.execute(query.where(owner.in_(pks))):
        uids[pk].append(uid)
        if pk not in first or received < first[pk]:
            first[pk] = received
        newest[pk] = max(newest.get(pk, 0), instance_id)
    for pk, members in uids.items():
        db.execute(
            update(model)
            .where(model.id == pk)
            .values(
                instance_count=len(members),
                first_received_at=first.get(pk, now),
                last_received_at=now,
                fingerprint=fingerprint(members),
                last_instance_id=newest.get(pk),
                state=ResourceState.RECEIVING,
            )
        )


def iter_files(paths: Iterable[Path], recursive: bool) -> Iterator[Path | Rejection]:
    """Files named directly, and the files in named folders (deeply with
    ``recursive``, through symlinked folders, each folder once); a
    :class:`Rejection` for each path that cannot be read: missing, a broken
    symlink, not a regular file, a folder without permission."""
    for path in paths:
        try:
            is_folder = path.is_dir()
        except OSError as error:  # a name too long, a loop of symlinks …
            yield Rejection(str(path), f"cannot read: {error.strerror or error}", True)
            continue
        if is_folder:
            yield from _folder_files(path, recursive)
        else:
            yield _file_or_rejection(path)


def _file_or_rejection(path: Path) -> Path | Rejection:
    try:
        status = path.stat()
    except FileNotFoundError:
        reason = "broken symlink" if path.is_symlink() else "no such file or folder"
        return Rejection(str(path), reason, unreadable=True)
    except OSError as error:
        return Rejection(str(path), f"cannot read: {error.strerror or error}", True)
    if not stat.S_ISREG(status.st_mode):
        return Rejection(str(path), "not a regular file (a device, pipe or socket)", True)
    return path


def _folder_files(folder: Path, recursive: bool) -> Iterator[Path | Rejection]:
    """A walk with a stack of its own (no recursion: any depth), through
    symlinked folders, each folder once (a link back up the tree is no loop)."""
    problems: list[Rejection] = []
    found: list[Path | Rejection] = []
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            status = current.stat()
            key = (status.st_dev, status.st_ino)
            if key in seen:
                continue
            seen.add(key)
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            reason = f"cannot read folder: {error.strerror or error}"
            problems.append(Rejection(str(current), reason, unreadable=True))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                is_folder = entry.is_dir()  # through a symlink too
            except OSError:
                is_folder = False
            if is_folder:
                if recursive:
                    stack.append(path)
            else:
                found.append(_file_or_rejection(path))
    yield from problems
    yield from sorted(found, key=lambda item: str(getattr(item, "location", item)))


# Below this many files a pool of header readers costs more to start than it saves.
PARALLEL_MIN_FILES = 1000


def _read_one(path: Path) -> InstanceItem | Rejection:
    if not path.exists():
        return Rejection(str(path), "no such file or folder", unreadable=True)
    try:
        return read_header(path)
    except NotDicomError as exc:
        return Rejection(exc.location, exc.reason, exc.reason.startswith("cannot read file"))


def _read_chunk(paths: list[Path]) -> list[InstanceItem | Rejection]:
    return [_read_one(path) for path in paths]


READER_CHUNK = 64


def _read_all(files: list[Path], readers: int) -> Iterator[InstanceItem | Rejection]:
    """Headers of ``files`` in order; parsed by ``readers`` processes when > 1.

    Parsing a header costs about as much as recording it, so the readers
    parse while this process writes. ``forkserver``: the readers are never
    forks of a process holding store connections or threads. At most two
    chunks per reader are parsed ahead of the writer, so memory stays bounded
    and an error in the writer stops the readers within a chunk. If the pool
    breaks (a reader killed, a caller's script without a ``__main__`` guard),
    the files not read yet are read here.
    """
    if readers <= 1 or len(files) < PARALLEL_MIN_FILES:
        yield from map(_read_one, files)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["scheduler.dicom"])
    chunks = [files[n : n + READER_CHUNK] for n in range(0, len(files), READER_CHUNK)]
    done = 0  # chunks yielded
    pool = ProcessPoolExecutor(readers, mp_context=context)
    try:
        ahead: deque[Future[list[InstanceItem | Rejection]]] = deque()
        for chunk in chunks:
            ahead.append(pool.submit(_read_chunk, chunk))
            if len(ahead) >= 2 * readers:
                yield from ahead.popleft().result()
                done += 1
        while ahead:
            yield from ahead.popleft().result()
            done += 1
    except BrokenProcessPool as exc:
        log.warning("header readers failed (%s); reading the remaining files here", exc)
        for chunk in chunks[done:]:
            yield from map(_read_one, chunk)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ingest_paths(
    transaction: Callable[[], Any],
    paths: Sequence[Path],
    *,
    recursive: bool = False,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
    readers: int = 1,
) -> IngestResult:
    """Read headers of every file and record them, one transaction per batch.

    A file that is not DICOM or lacks a UID is reported and skipped; the
    batch goes on. ``progress`` is called with the number of files done.
    ``readers`` processes parse headers for runs of ``PARALLEL_MIN_FILES`` or
    more (the CLI uses one per CPU; the default, 1, starts no process).
    """
    total = IngestResult()
    items: list[InstanceItem] = []

    def flush() -> None:
        if items:
            with transaction() as db:
                total.add(record_instances(db, items))
            items.clear()

    files: list[Path] = []
    for found in iter_files(paths, recursive):
        if isinstance(found, Rejection):
            total.rejected.append(found)
        else:
            files.append(found)
    for read in _read_all(files, readers):
        if isinstance(read, Rejection):
            total.rejected.append(read)
            if read.reason.startswith(("not DICOM", "empty file")):
                total.not_dicom += 1
        else:
            items.append(read)
        if progress:
            progress(1)
        if len(items) >= batch_size:
            flush()
    flush()
    return total
