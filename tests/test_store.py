"""The store: migrations to head from empty, every table usable, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import inspect, select

from scheduler.config import Settings
from scheduler.store.db import get_engine, init_db, transaction
from scheduler.store.models import (
    Base,
    Instance,
    Job,
    JobDependency,
    Lease,
    Patient,
    SchedulingSession,
    Series,
    Service,
    Study,
    Worker,
)
from scheduler.store.schema import SCHEMA_HEAD


def test_migration_creates_every_model_table(store_url: str) -> None:
    tables = set(inspect(get_engine(store_url)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_init_db_is_idempotent(store_url: str) -> None:
    assert init_db(store_url) == init_db(store_url) == SCHEMA_HEAD


def test_the_schema_the_code_checks_for_is_the_newest_migration() -> None:
    from alembic.script import ScriptDirectory

    from scheduler.store.db import alembic_config

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head == SCHEMA_HEAD


def test_the_columns_of_the_models_match_the_migrated_schema(store_url: str) -> None:
    inspector = inspect(get_engine(store_url))
    for name, table in Base.metadata.tables.items():
        migrated = {column["name"] for column in inspector.get_columns(name)}
        assert set(table.columns.keys()) == migrated, name


def test_every_table_round_trips_a_row(store_url: str) -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    resource = {"first_received_at": now, "last_received_at": now, "fingerprint": "f"}
    with transaction(store_url) as db:
        patient = Patient(patient_id="P1", tags={"PatientName": "Doe^J"}, **resource)
        study = Study(study_uid="1.2", patient=patient, **resource)
        series = Series(series_uid="1.2.3", study=study, **resource)
        db.add(Instance(sop_uid="1.2.3.4", series=series, location="/x.dcm", received_at=now))
        db.add(Service(name="svc", definition={"jobs": []}))
        db.add(Worker(hostname="w@h", channels={"default": True}))
        db.add(Lease(name="detect", holder="me", expires_at=now))
        session = SchedulingSession(event="study.stable", level="study", uid="1.2", headers={})
        db.add(session)
        db.flush()
        a = Job(session_id=session.id, job_name="a", service="svc", worker_entry="m:f")
        b = Job(session_id=session.id, job_name="b", service="svc", worker_entry="m:f")
        db.add_all([a, b])
        db.flush()
        db.add(JobDependency(job_id=b.id, depends_on_id=a.id))
    with transaction(store_url) as db:
        instance = db.scalar(select(Instance))
        assert instance is not None
        assert instance.series.study.patient.tags == {"PatientName": "Doe^J"}
        assert instance.received_at == now  # aware UTC on both backends
        assert db.scalar(select(Worker)).channels == {"default": True}  # type: ignore[union-attr]
        assert db.scalar(select(Lease.holder)) == "me"
        assert db.scalar(select(Service.name)) == "svc"
        edge = db.scalar(select(JobDependency))
        assert edge is not None and edge.requires_success
        session = db.scalar(select(SchedulingSession))
        assert session is not None
        assert session.status == "planning" and session.trigger == ""
        assert [j.job_name for j in session.jobs] == ["a", "b"]


def test_a_lease_is_held_by_one_holder_until_it_lapses_or_is_dropped(store_url: str) -> None:
    from datetime import timedelta

    from scheduler.leases import drop, take
    from scheduler.store.models import Lease, utcnow

    now = utcnow()
    with transaction(store_url) as db:
        assert take(db, "plan:x", 60, "a", now)
    with transaction(store_url) as db:
        assert not take(db, "plan:x", 60, "b", now)  # held by a
        assert take(db, "plan:x", 60, "a", now)  # a renews its own
    with transaction(store_url) as db:
        assert take(db, "plan:x", 60, "b", now + timedelta(seconds=61))  # a's lapsed
        assert db.get(Lease, "plan:x").holder == "b"  # type: ignore[union-attr]
    with transaction(store_url) as db:
        drop(db, "plan:x", "a")  # not a's any more: stays
        assert db.get(Lease, "plan:x") is not None
        drop(db, "plan:x", "b")
    with transaction(store_url) as db:
        assert db.get(Lease, "plan:x") is None


def test_postgresql_plans_each_statement_for_the_table_as_it_is_now(pg_url: str) -> None:
    # A generic plan cached while the store was empty kept scanning whole
    # tables once a first import had filled them (ingest 2.5x slower).
    from sqlalchemy import text

    with get_engine(pg_url).connect() as connection:
        assert connection.execute(text("SHOW plan_cache_mode")).scalar() == "force_custom_plan"


def test_the_per_job_statements_leave_their_connection_planning_each_statement(
    pg_url: str,
) -> None:
    """The claim and the ending plan once per connection (their rows are
    found by key); what the connection runs next is planned as usual."""
    import psycopg
    from sqlalchemy import text

    from scheduler.store import jobs_pg
    from scheduler.store.db import statements

    def mode(db: Any) -> str:
        return str(db.execute(text("SHOW plan_cache_mode")).scalar())

    now = datetime.now(UTC)
    values = ("no-such-job", "w@h", 1, now, now)
    with statements(pg_url, each_alone=True) as db:  # the claim: a statement alone
        assert jobs_pg.claim(db, *values) is None
        assert mode(db) == "force_custom_plan"
    with get_engine(pg_url).connect() as db:  # an ending: its transaction
        with db.begin():
            assert jobs_pg.lock_and_read(db, "no-such-job") is None
            # What the transaction runs next is planned as usual too.
            assert mode(db) == "force_custom_plan"
        assert mode(db) == "force_custom_plan"
    with get_engine(pg_url).connect() as db:
        driver: Any = db.connection.driver_connection
        with db.begin(), pytest.raises(psycopg.Error), jobs_pg._together(db), driver.cursor() as c:
            c.execute("SELECT 1/0")  # refused: the transaction, and the setting, rolled back
        assert mode(db) == "force_custom_plan"


def test_a_claim_commits_alone_and_leaves_its_connection_as_it_found_it(pg_url: str) -> None:
    """A claim is a statement of its own, committed durably; the connection
    after it is as it was, also when the claim was refused or failed."""
    import psycopg
    from sqlalchemy import text

    from scheduler.store import jobs_pg
    from scheduler.store.db import statements

    with transaction(pg_url) as db:
        session = SchedulingSession(
            event="study.stable", level="study", uid="1.4", headers={"a": 1}, status="running"
        )
        db.add(session)
        db.flush()
        job = Job(
            session_id=session.id, job_name="only", service="s", worker_entry="m:f", status="queued"
        )
        db.add(job)
    now = datetime.now(UTC)

    def after(db: Any) -> tuple[Any, ...]:
        driver: Any = db.connection.driver_connection
        return (
            driver.autocommit,
            db.execute(text("SHOW synchronous_commit")).scalar(),
            db.execute(text("SHOW plan_cache_mode")).scalar(),
        )

    usual = (True, "on", "force_custom_plan")
    claims = []
    for job_id in (job.id, job.id, "no-such-job"):  # taken, then refused twice
        with statements(pg_url, each_alone=True) as db:
            row = jobs_pg.claim(db, job_id, "w@h", 1, now, now)
            claims.append(row and (row["attempts"], row["headers"]))
            assert after(db) == usual
    assert claims == [(1, {"a": 1}), None, None]
    with statements(pg_url, each_alone=True) as db:
        with pytest.raises(psycopg.Error):
            jobs_pg.claim(db, job.id, "w@h", 1, now, "not a time")  # type: ignore[arg-type]
        assert after(db) == usual
    with transaction(pg_url) as db:
        stored = db.get(Job, job.id)
        assert stored is not None and (stored.status, stored.attempts) == ("running", 1)


@pytest.mark.parametrize("in_parts", [False, True], ids=["one part", "a part per row"])
def test_a_plan_is_written_whole_exactly_or_not_at_all_and_its_lease_goes(
    pg_url: str, in_parts: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan's rows arrive as written (JSON, times, floats, NULLs, any
    text), also when they travel in several parts (a large plan's, past
    PostgreSQL's size limit of one jsonb array); a session no longer to plan
    gets none of them; a plan the server refuses leaves nothing behind,
    lease included, and the connection usable."""
    import psycopg
    from sqlalchemy import text

    from scheduler.store import plans_pg
    from scheduler.store.db import statements

    if in_parts:
        monkeypatch.setattr(plans_pg, "PART_CHARACTERS", 1)
        assert len(plans_pg._parts([{"a": 1}, {"b": 2}, {"c": 3}])) == 3

    with transaction(pg_url) as db:
        session = SchedulingSession(
            event="study.stable", level="study", uid="1.5", headers={}, status="planning"
        )
        db.add(session)
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    odd = {"q": 'a "quoted" \\ back\\slash', "u": "Ünïcødé ✓ 🫀", "n": [0.1, 1e-7, 2**53, None]}

    def job(job_id: str, name: str, **fields: Any) -> dict[str, Any]:
        row = {column: None for column in plans_pg.JOB_COLUMNS}
        return (
            row
            | {
                "id": job_id,
                "session_id": session.id,
                "created_seq": 0,
                "job_name": name,
                "service": "svc",
                "service_version": "1",
                "service_hash": "h",
                "phase": "main",
                "worker_entry": "m:f",
                "entry_root": "",
                "channel": "default",
                "params": odd,
                "added_params": {"series": ["1.2.3"]},
                "sort_position": 2.5,
                "priority": 5,
                "status": "queued",
                "attempts": 0,
                "max_attempts": 1,
                "retries": 0,
                "timeout_s": 12.25,
                "retry_delay_s": 30.0,
                "attempt_log": [],
                "pending_deps": 0,
                "created_at": now,
            }
            | fields
        )

    jobs = [
        job("job-a", "a", dispatched_at=now, python="/opt/py/bin/python", window="22:00-06:00"),
        job("job-b", "b", pending_deps=1),
    ]
    edges = [{"job_id": "job-b", "depends_on_id": "job-a", "requires_success": False}]
    planned = {
        "session_id": session.id,
        "status": "running",
        "headers": {"StudyInstanceUID": "1.5"},
        "added_params": {},
        "trace": {"jobs": {}},
        "urgent": False,
        "planned_at": now,
        "finished_at": None,
    }

    def lease() -> dict[str, Any]:
        with transaction(pg_url) as db:
            db.merge(Lease(name="plan:1.5", holder="me", expires_at=now))
        return {"name": "plan:1.5", "holder": "me"}

    def leases() -> int:
        with transaction(pg_url) as db:
            return len(db.scalars(select(Lease).where(Lease.name == "plan:1.5")).all())

    with statements(pg_url, each_alone=True) as db:  # refused: an edge to no job
        wrong = [{"job_id": "job-b", "depends_on_id": "nowhere", "requires_success": True}]
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            plans_pg.write_plan(db, planned, jobs, wrong, lease())
        assert db.execute(text("SELECT 1")).scalar() == 1
    assert leases() == 1
    with statements(pg_url, each_alone=True) as db:
        assert plans_pg.write_plan(db, planned, jobs, edges, lease()) is True
    assert leases() == 0
    with statements(pg_url, each_alone=True) as db:  # planned already: nothing more
        again = [job("job-c", "c")]
        assert plans_pg.write_plan(db, planned, again, [], lease()) is False
    assert leases() == 0
    with transaction(pg_url) as db:
        stored = {j.id: j for j in db.scalars(select(Job).where(Job.session_id == session.id))}
        assert sorted(stored) == ["job-a", "job-b"]
        a, b = stored["job-a"], stored["job-b"]
        assert a.params == odd and a.added_params == {"series": ["1.2.3"]}
        assert (a.created_at, a.dispatched_at, b.dispatched_at) == (now, now, None)
        assert (a.python, a.window, b.python, b.window) == (
            "/opt/py/bin/python",
            "22:00-06:00",
            None,
            None,
        )
        assert (a.sort_position, a.timeout_s, b.pending_deps) == (2.5, 12.25, 1)
        edge = db.scalars(select(JobDependency)).one()
        assert (edge.job_id, edge.depends_on_id, edge.requires_success) == ("job-b", "job-a", False)
        assert db.get(SchedulingSession, session.id).status == "running"  # type: ignore[union-attr]


def test_a_connection_lost_under_a_per_job_statement_leaves_the_pool_quietly(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement sent through psycopg itself on a connection the server
    dropped (a restart, pg_terminate_backend) raises; the pool takes the
    connection out without an error of its own, and the next block works."""
    import logging

    import psycopg

    from scheduler.store import pipelines
    from scheduler.store.db import statements

    admin = psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=True)
    with admin, caplog.at_level(logging.WARNING):
        with pytest.raises(psycopg.OperationalError), statements(pg_url, each_alone=True) as db:
            driver = pipelines.driver(db)
            admin.execute("SELECT pg_terminate_backend(%s)", (driver.info.backend_pid,))
            driver.execute("SELECT 1")
        with statements(pg_url, each_alone=True) as db:
            assert pipelines.driver(db).execute("SELECT 1").fetchone() == (1,)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy")] == []


def test_a_success_refused_by_the_server_leaves_its_connection_idle_as_it_found_it(
    pg_url: str,
) -> None:
    """A success that commits itself sends its own BEGIN and COMMIT; refused
    (a NUL in its result), nothing of it stays and the connection is a
    plain one again, its transaction rolled back."""
    import psycopg
    from psycopg.pq import TransactionStatus

    from scheduler.store import jobs_pg

    with transaction(pg_url) as db:
        session = SchedulingSession(
            event="study.stable", level="study", uid="1.3", headers={}, status="running"
        )
        db.add(session)
        db.flush()
        job = Job(
            session_id=session.id,
            job_name="only",
            service="svc",
            worker_entry="m:f",
            status="running",
            attempts=1,
        )
        db.add(job)
    now = datetime.now(UTC)
    with get_engine(pg_url).connect() as db:
        driver: Any = db.connection.driver_connection
        with db.begin():
            with pytest.raises(psycopg.Error):
                jobs_pg.succeed(db, job.id, session.id, 1, {"text": "a\x00b"}, {}, now, commit=True)
            assert driver.autocommit is False
            assert driver.info.transaction_status == TransactionStatus.IDLE
        with db.begin():
            done = jobs_pg.succeed(db, job.id, session.id, 1, {"ok": 1}, {}, now, commit=True)
            assert done is not None and done.recorded and done.final == "succeeded"
    with transaction(pg_url) as db:
        stored = db.get(Job, job.id)
        assert stored is not None and (stored.status, stored.result) == ("succeeded", {"ok": 1})


def test_a_lease_taken_long_ago_is_renewed_at_once(env: Settings) -> None:
    import time
    from datetime import timedelta

    from scheduler.leases import renewing, take
    from scheduler.store.models import Lease, utcnow
    from scheduler.testing import wait_until

    with transaction() as db:
        assert take(db, "plan:slow", 60, "a")

    def renewed() -> bool:
        with transaction() as db:
            expiry = db.scalar(select(Lease.expires_at).where(Lease.name == "plan:slow"))
        return expiry is not None and expiry > utcnow() + timedelta(seconds=300)

    # Taken 1,000 s ago by this process's clock (a long header read, say):
    # waiting ttl / 3 = 200 s before the first renewal would let it lapse.
    with renewing("plan:slow", "a", ttl=600, taken_at=time.monotonic() - 1000):
        wait_until(renewed, 30, "the first renewal")


def test_a_claim_or_a_session_s_end_never_walks_the_index_of_ready_jobs(pg_url: str) -> None:
    """A claim names its job by id, a session's end its session. Given a condition on ``status`` it could
    use, PostgreSQL picks the index of ready jobs when its statistics say
    few are queued (the usual state, or a table not yet analysed) and then
    reads every queued job of a backlog to find one: with thousands waiting,
    each claim reads them all. Without the index meant for it to choose, a
    plan shows what the statement allows."""
    from sqlalchemy import text

    from scheduler.jobstate import claim
    from scheduler.store import jobs_pg
    from scheduler.store.db import statements

    with transaction(pg_url) as db:
        session = SchedulingSession(event="study.stable", level="study", uid="1.2", headers={})
        db.add(session)
        db.flush()
        job = Job(session_id=session.id, job_name="wanted", service="svc", worker_entry="m:f")
        db.add(job)
    now = datetime.now(UTC)
    values = {"job_id": job.id, "hostname": "w@h", "pid": 1, "now": now, "due": now}
    # The ending of the last job of a session reads its jobs by session.
    ending = {"session_id": session.id, "now": now}
    for statement, bound, index in (
        (jobs_pg._CLAIM, values, "ALTER TABLE jobs DROP CONSTRAINT jobs_pkey CASCADE"),
        (
            jobs_pg._FINISH_SESSION,
            ending,
            "DROP INDEX ix_jobs_session_id; ALTER TABLE sessions DROP CONSTRAINT sessions_pkey CASCADE",
        ),
    ):
        with statements(pg_url) as db:
            db.execute(text(index))
            with db.connection.driver_connection.cursor() as cursor:
                cursor.execute("EXPLAIN " + statement, bound)
                plan = "\n".join(row[0] for row in cursor.fetchall())
            db.rollback()  # the index is back
        assert "ix_jobs_ready" not in plan and "ix_sessions_status" not in plan, plan
    with statements(pg_url) as db:
        taken = claim(db, job.id, "w@h", now)
    assert taken is not None and taken.job_name == "wanted"


def test_errors_of_the_driver_itself_are_retried_when_transient_and_raised_otherwise() -> None:
    """The per-job statements run on psycopg's own cursors: a lost connection
    there is psycopg's error, not SQLAlchemy's, and must be retried too."""
    import psycopg
    import pytest

    from scheduler.store.db import retrying

    failures = [psycopg.OperationalError("server closed the connection unexpectedly")]

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "recorded"

    assert retrying(flaky, what="recording", first_wait=0.01) == "recorded"
    assert failures == []

    def broken() -> str:
        raise psycopg.errors.UniqueViolation("duplicate key")

    with pytest.raises(psycopg.errors.UniqueViolation):
        retrying(broken, what="recording", first_wait=0.01)


def test_the_check_of_an_idle_pooled_connection_keeps_its_prepared_statements(
    pg_url: str,
) -> None:
    """The check runs outside a transaction: a ROLLBACK would make psycopg
    drop every statement it prepared on the connection."""
    from sqlalchemy import text

    engine = get_engine(pg_url)
    engine.dispose()
    with engine.connect() as connection:
        driver = connection.connection.driver_connection
        driver.execute("SELECT 42", prepare=True)  # type: ignore[union-attr]
        driver.commit()  # type: ignore[union-attr]
    pooled = engine.pool._pool.queue[0]  # type: ignore[attr-defined]
    pooled.info["idle_since"] = 0.0  # idle for long: checked at the next checkout
    with engine.connect() as connection:
        assert connection.connection.dbapi_connection is pooled.dbapi_connection
        kept = connection.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar()
    assert kept == 1
