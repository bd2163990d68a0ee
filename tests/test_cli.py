"""The command line (README, "Commands"): JSON shapes, exit codes, dry runs."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scheduler.cli import app as cli
from scheduler.config import Settings
from scheduler.store.db import transaction
from scheduler.store.models import SchedulingSession, utcnow
from scheduler.testing import record_study

from .conftest import Define

SESSION_KEYS = {"id", "event", "level", "uid", "revision", "status", "created_at", "finished_at"}
JOB_KEYS = {
    "id",
    "session_id",
    "job_name",
    "service",
    "phase",
    "channel",
    "status",
    "attempts",
    "depends_on",
    "result",
    "error",
    "worker",
    "started_at",
    "finished_at",
}


def run(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return result


def run_json(*args: str) -> Any:
    return json.loads(run(*args, "--json").stdout)


@pytest.fixture
def planned(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A study planned inline (no broker needed) with a small DAG."""
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    from scheduler.testing import use_environment

    use_environment({})
    define(
        [
            {"jobName": "a", "workerEntry": "dcm_testjobs:work"},
            {"jobName": "b", "workerEntry": "dcm_testjobs:work", "dependsOn": "a"},
            {
                "jobName": "never",
                "workerEntry": "dcm_testjobs:work",
                "registryEntry": "dcm_testjobs:decline",
            },
        ]
    )
    record_study("7.1", now=utcnow() - timedelta(seconds=300))
    from scheduler.celery_app import app

    app.conf.task_always_eager = True
    try:
        out = run_json("detect", "--inline")
    finally:
        app.conf.task_always_eager = False
    session_id: str = out["claimed"][0]["session_id"]
    return session_id


def test_sessions_and_jobs_json_have_the_stable_shape(planned: str) -> None:
    sessions = run_json("sessions")
    assert len(sessions) == 1 and set(sessions[0]) >= SESSION_KEYS
    assert sessions[0]["status"] == "succeeded"
    assert sessions[0]["created_at"].endswith("Z")
    jobs = run_json("jobs", "--session", planned)
    assert [j["job_name"] for j in jobs] == ["a", "b"]
    assert all(set(j) >= JOB_KEYS for j in jobs)
    assert jobs[1]["depends_on"] == ["a"]
    assert run_json("jobs", "--status", "failed") == []


def test_show_json_is_the_session_with_trace_and_jobs(planned: str) -> None:
    doc = run_json("show", planned)
    assert set(doc) >= SESSION_KEYS
    assert doc["trace"]["jobs"]["never"] == {
        "service": "testjobs",
        "phase": "main",
        "scheduled": False,
        "reason": "callback returned False",
    }
    assert [j["job_name"] for j in doc["jobs"]] == ["a", "b"]
    assert run_json("show", planned[:8])["id"] == planned  # short ids work


def test_show_draws_the_dag_with_statuses_and_reasons(planned: str) -> None:
    out = run("show", planned).stdout
    assert "succeeded" in out and "never: callback returned False" in out
    rows = [line for line in out.splitlines() if "✔" in line]
    cells = [[c.strip() for c in row.split("│")[1:-1]] for row in rows]
    assert [(c[0], c[1], c[-1]) for c in cells] == [("1", "✔ a", ""), ("2", "✔ b", "a")]


def test_unknown_session_is_a_reported_problem(env: Settings) -> None:
    result = run("show", "00000000-0000-0000-0000-000000000000", code=1)
    assert "no session" in result.output


def test_a_too_short_session_prefix_says_how_long_it_must_be(planned: str) -> None:
    result = run("show", planned[:2], code=1)
    assert "at least its first 4 characters" in result.output
    assert run("show", planned[:4]).exit_code == 0


def test_wrong_usage_exits_2(env: Settings) -> None:
    run("plan", code=2)
    run("plan", "--study", "1", "--series", "2", code=2)
    run("sessions", "--bogus", code=2)
    # An event ends up in tables, metrics labels and folder names.
    for event in ("new\nline", 'ev"il', "*", "x" * 129, ""):
        assert "use letters, digits" in run("trigger", event, "--study", "1.2", code=2).output


def test_plan_dry_run_prints_the_trace_and_writes_nothing(
    with_services: Path, define: Define
) -> None:
    define([{"jobName": "x", "workerEntry": "dcm_testjobs:work"}])
    record_study("8.1")
    doc = run_json("plan", "--study", "8.1", "--dry-run")
    assert doc["jobs"] == ["x"] and doc["dry_run"] is True
    assert doc["trace"]["jobs"]["x"]["scheduled"] is True
    with transaction() as db:
        assert db.query(SchedulingSession).count() == 0
    assert "no registryEntry: always scheduled" in run("plan", "--study", "8.1", "--dry-run").stdout


def test_plan_of_an_unknown_study_exits_1(env: Settings) -> None:
    assert "no study '9.9'" in run("plan", "--study", "9.9", "--dry-run", code=1).output


def test_plan_twice_is_a_no_op_the_second_time(
    env: Settings, define: Define, services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    from scheduler.celery_app import app
    from scheduler.testing import use_environment

    use_environment({})
    define([{"jobName": "x", "workerEntry": "dcm_testjobs:work"}])
    record_study("8.2")
    app.conf.task_always_eager = True
    try:
        first = run_json("plan", "--study", "8.2")
        second = run("plan", "--study", "8.2")
    finally:
        app.conf.task_always_eager = False
    assert first["jobs"] == ["x"]
    assert "already planned" in second.stdout
    with transaction() as db:
        assert db.query(SchedulingSession).count() == 1


def test_services_validate_exits_1_and_names_the_problem(env: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "bad-services" / "broken"
    bad.mkdir(parents=True)
    (bad / "dcm-processor.json").write_text('{"name": "broken", "jobs": [\n  {"jobName": }\n]}')
    result = run("services", "validate", str(tmp_path / "bad-services"), code=1)
    assert "line 2" in result.output
    doc = json.loads(
        run("services", "validate", str(tmp_path / "bad-services"), "--json", code=1).stdout
    )
    assert doc["ok"] is False and doc["problems"]


def test_services_validate_reports_a_definition_nested_too_deep_without_a_traceback(
    env: Settings, tmp_path: Path
) -> None:
    root = tmp_path / "services"
    (root / "good" / "good_code").mkdir(parents=True)
    (root / "good" / "good_code" / "__init__.py").write_text("def worker(*a, **k):\n    pass\n")
    (root / "good" / "dcm-processor.json").write_text(
        json.dumps({"name": "good", "jobs": [{"jobName": "a", "workerEntry": "good_code:worker"}]})
    )
    (root / "zz-deep").mkdir()
    (root / "zz-deep" / "dcm-processor.json").write_text("[" * 100_000 + "]" * 100_000)

    result = run("services", "validate", str(root), code=1)

    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "ok good (1 job(s))" in result.output
    assert "zz-deep/dcm-processor.json: nested too deep: more than 100 levels" in result.output
    assert "Traceback" not in result.output and "RecursionError" not in result.output
    doc = json.loads(run("services", "validate", str(root), "--json", code=1).stdout)
    assert doc["services"] == ["good"] and "nested too deep" in doc["problems"][0]


def test_services_list_shows_jobs(env: Settings) -> None:
    from scheduler.testing import use_environment

    from .support import EXAMPLES

    use_environment({"DCM_SERVICES_PATH": str(EXAMPLES)})
    doc = run_json("services", "list")
    jobs = {j["job_name"]: j for s in doc["services"] for j in s["jobs"]}
    assert jobs["study-report"]["depends_on"] == ["thumbnails"]
    assert jobs["anonymize"]["phase"] == "pre" and jobs["archive"]["phase"] == "post"
    assert run("services", "validate").exit_code == 0


# -- inputs and exit codes a new user meets ---------------------------------------


@pytest.fixture
def with_services(env: Settings, services_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test store, with the test services on DCM_SERVICES_PATH."""
    from scheduler.testing import use_environment

    monkeypatch.setenv("DCM_SERVICES_PATH", str(services_root))
    use_environment({})
    return services_root


@pytest.fixture
def nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder and the default settings: no store anywhere."""
    from scheduler.testing import use_environment

    folder = tmp_path / "empty"
    folder.mkdir()
    monkeypatch.chdir(folder)
    use_environment({"DCM_HOME": "", "DCM_DATABASE_URL": "", "CELERY_BROKER_URL": ""})
    return folder


@pytest.mark.parametrize(
    "args",
    [
        ["sessions"],
        ["sessions", "--json"],
        ["jobs"],
        ["show", "0123abcd"],
        ["workers", "--json"],
        ["plan", "--study", "1.2.3", "--dry-run"],
        ["doctor"],
        ["ingest", "/no/such/file.dcm"],
        ["serve", "--port", "1"],
    ],
)
def test_reading_commands_without_a_store_write_nothing_and_say_init_db(
    nowhere: Path, args: list[str]
) -> None:
    result = run(*args, code=1)
    assert "dcm-scheduler init-db" in result.output or args[0] == "ingest"
    assert list(nowhere.iterdir()) == []  # no ./.dcm-scheduler, no store file


def test_serve_on_a_port_in_use_says_so_in_one_line(env: Settings) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port), code=1)
    assert (
        result.output.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_a_store_upgraded_by_a_newer_release_asks_for_the_upgrade_here(env: Settings) -> None:
    from sqlalchemy import text

    from scheduler.store.db import get_engine
    from scheduler.store.schema import SCHEMA_HEAD

    def stamp(revision: str) -> None:
        with get_engine().begin() as connection:
            connection.execute(text(f"UPDATE alembic_version SET version_num = '{revision}'"))

    stamp("9999")
    try:
        result = run("sessions", code=1)
    finally:
        stamp(SCHEMA_HEAD)  # the PostgreSQL store is shared by the tests after this one
    assert "is at schema 9999, newer than this version's" in result.output
    assert "upgrade dcm-scheduler here too" in " ".join(result.output.split())


def test_reading_commands_never_upgrade_the_schema(env: Settings) -> None:
    from alembic import command

    from scheduler.store.db import alembic_config
    from scheduler.store.reader import store_revision
    from scheduler.store.schema import SCHEMA_HEAD

    command.downgrade(alembic_config(), "0001")
    for reading in (["sessions"], ["serve", "--port", "1"]):
        result = run(*reading, code=1)
        assert f"is at schema 0001, this version needs {SCHEMA_HEAD}" in result.output
        assert store_revision(env.database_url) == "0001"
    run("init-db")
    assert store_revision(env.database_url) == SCHEMA_HEAD


@pytest.mark.parametrize(
    ("command", "allowed"),
    [("sessions", ["planning", "partial", "empty"]), ("jobs", ["queued", "upstream_failed"])],
)
def test_an_unknown_status_is_wrong_usage_naming_the_statuses(
    env: Settings, command: str, allowed: list[str]
) -> None:
    result = run(command, "--status", "bogus", code=2)
    assert "bogus" in result.output
    assert all(status in result.output for status in allowed)


def test_services_validate_of_a_missing_path_exits_1_naming_it(env: Settings) -> None:
    result = run("services", "validate", "/no/such/path", code=1)
    assert "/no/such/path: no such folder" in result.output


def test_services_validate_accepts_the_definition_file_itself(
    env: Settings, define: Define, services_root: Path
) -> None:
    path = define([{"jobName": "a", "workerEntry": "dcm_testjobs:work"}])
    assert "ok testjobs" in run("services", "validate", str(path)).output


def test_ingest_of_a_missing_file_exits_1(env: Settings) -> None:
    result = run("ingest", "/no/such/file.dcm", code=1)
    assert "/no/such/file.dcm: no such file or folder" in result.output
    assert "unreadable 1" in result.output


def test_ingest_lists_a_folder_it_cannot_read_and_exits_1(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import shutil

    from pydicom.data import get_testdata_file

    top = tmp_path / "incoming"
    (top / "locked").mkdir(parents=True)
    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    shutil.copyfile(source, top / "1.dcm")
    # Tests run as root, whom permissions do not stop: refuse the listing here.
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path) == top / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = run("ingest", "--recursive", str(top), code=1)
    assert "recorded 1" in result.output
    assert f"{top / 'locked'}: cannot read folder: Permission denied" in result.output
    document = json.loads(run("ingest", "--recursive", str(top), "--json", code=1).stdout)
    assert document["unreadable"] == 1 and document["known"] == 1


def test_piped_tables_are_never_cut_whatever_columns_says(planned: str) -> None:
    for command in ("sessions", "jobs"):
        result = CliRunner().invoke(cli, [command], env={"COLUMNS": "40"})
        assert result.exit_code == 0, result.output
        assert "succeeded" in result.output and "…" not in result.output
    assert "│ a " in CliRunner().invoke(cli, ["jobs"], env={"COLUMNS": "40"}).output


def test_a_narrow_terminal_gets_one_block_per_row_instead_of_cut_columns(
    planned: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    import scheduler.cli

    def terminal(stderr: bool = False) -> Console:
        return Console(stderr=stderr, width=60, force_terminal=True, color_system=None)

    monkeypatch.setattr(scheduler.cli, "_console", terminal)
    result = run("jobs")
    assert "job: a" in result.output and "job: b" in result.output
    assert "status: succeeded" in result.output and "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 60
    wide_enough = run("workers")  # a table that fits stays a table
    assert "┃" in wide_enough.output or "no worker has been seen" in wide_enough.output


def test_every_time_in_json_is_utc_with_a_z(planned: str) -> None:
    def times(value: Any) -> list[str]:
        if isinstance(value, dict):
            found = [v for k, v in value.items() if k.endswith("_at") and isinstance(v, str)]
            return found + [t for v in value.values() for t in times(v)]
        if isinstance(value, list):
            return [t for v in value for t in times(v)]
        return []

    stamps = times(run_json("show", planned)) + times(run_json("jobs"))
    assert stamps and all(stamp.endswith("Z") and "+00:00" not in stamp for stamp in stamps)


def test_dry_run_prints_each_warning_once_with_the_embedded_hint(
    with_services: Path, define: Define
) -> None:
    define([{"jobName": "gpu-seg", "workerEntry": "dcm_testjobs:work", "channel": "gpu"}])
    record_study("7.9")
    output = run("plan", "--study", "7.9", "--dry-run").output
    warning = "job 'gpu-seg' is sent to channel 'gpu', which no live worker consumes"
    assert output.count(warning) == 1
    assert "dcm-scheduler run" in output and "celery -A scheduler worker" not in output


def test_a_repeated_job_name_leaves_only_the_later_service_out_and_says_so_once(
    with_services: Path, define: Define
) -> None:
    import shutil

    define([{"jobName": "shared", "workerEntry": "dcm_testjobs:work"}])
    later = with_services / "zz-later"
    (later / "zz_later").mkdir(parents=True)
    (later / "zz_later" / "__init__.py").write_text("def work(*a, **k):\n    return 1\n")
    (later / "dcm-processor.json").write_text(
        json.dumps(
            {"name": "zz-later", "jobs": [{"jobName": "shared", "workerEntry": "zz_later:work"}]}
        )
    )
    try:
        listing = run("services", "list", code=1).output
        problem = "duplicate jobName 'shared' (also in service 'testjobs'"
        assert listing.count(problem) == 1
        assert "testjobs" in listing and "shared" in listing
        validation = run("services", "validate", code=1).output
        assert validation.count(problem) == 1 and "ok testjobs" in validation
        record_study("7.10")
        dry = run("plan", "--study", "7.10", "--dry-run").output
        assert dry.count(problem) == 1
        document = run_json("plan", "--study", "7.10", "--dry-run")
        assert document["jobs"] == ["shared"]  # the first service's job still runs
        assert document["trace"]["services_left_out"][0]["service"] == "zz-later"
    finally:
        shutil.rmtree(later)


# The settings that are durations: each refused past 366 days.
DURATION_SETTINGS = (
    "DCM_CALLBACK_TIMEOUT",
    "DCM_STABLE_AGE",
    "DCM_DETECT_INTERVAL",
    "DCM_RESEND_AFTER",
    "DCM_HEARTBEAT_INTERVAL",
    "DCM_VISIBILITY_TIMEOUT",
)


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"DCM_DATABASE_URL": "mysql://u@h/db"}, "runs on SQLite or PostgreSQL, not 'mysql'"),
        ({"DCM_DATABASE_URL": "notaurl"}, "'notaurl' is not a URL"),
        ({"DCM_HOME": "/etc/hostname"}, "/etc/hostname is not a folder"),
        ({"DCM_DETECT_INTERVAL": "0"}, "DCM_DETECT_INTERVAL: '0' is too short"),
        ({"DCM_HEARTBEAT_INTERVAL": "0s"}, "DCM_HEARTBEAT_INTERVAL: '0s' is too short"),
        # Past a socket's timeout, a sleep or a date: an OverflowError later on.
        *(
            ({name: value}, f"{name}: {value!r} is too long; use at most 366 days")
            for name in DURATION_SETTINGS
            for value in ("10000000000", "367d", "1" + "0" * 400)
        ),
        ({"DCM_WEBHOOK_URLS": "hooks.example.org"}, "DCM_WEBHOOK_URLS: 'hooks.example.org'"),
        ({"DCM_WEBHOOK_EVENTS": "session.done"}, "DCM_WEBHOOK_EVENTS: unknown event"),
        ({"DCM_WEBHOOK_EVENTS": ","}, "DCM_WEBHOOK_EVENTS: no event given"),
        ({"DCM_WEBHOOK_URLS": "http://"}, "DCM_WEBHOOK_URLS: 'http://' has no host name"),
        ({"DCM_WEBHOOK_URLS": "https://exa mple.org/"}, "has no host name, or has spaces"),
        (
            {"DCM_WEBHOOK_URLS": "https://u:pw@h:port/"},
            "DCM_WEBHOOK_URLS: 'https://u:***@h:port/' is not a valid URL",
        ),
    ],
)
def test_settings_that_cannot_work_are_wrong_usage_with_a_message(
    nowhere: Path, variables: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler.config import reset_settings

    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    result = CliRunner().invoke(cli, ["sessions"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_duration_settings_may_be_as_long_as_a_job_timeout() -> None:
    from scheduler.config import load_settings

    settings = load_settings(dict.fromkeys(DURATION_SETTINGS, "366d"))
    assert settings.callback_timeout == settings.visibility_timeout == 366 * 86400


def test_a_dotenv_that_is_not_text_is_reported(nowhere: Path) -> None:
    from scheduler.config import reset_settings

    (nowhere / ".env").write_bytes(b"DCM_STABLE_AGE=\xff\n")
    reset_settings()
    result = run("sessions", code=2)
    assert ".env: cannot be read as settings" in result.output


def test_a_postgresql_url_without_a_driver_uses_psycopg() -> None:
    from scheduler.config import load_settings

    url = load_settings({"DCM_DATABASE_URL": "postgresql://u@db/store"}).database_url
    assert url == "postgresql+psycopg://u@db/store"


def test_a_store_that_cannot_be_reached_is_one_line_and_exit_1(
    nowhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from scheduler.cli import main as entry
    from scheduler.config import reset_settings

    monkeypatch.setenv("DCM_DATABASE_URL", "postgresql://postgres:pw@127.0.0.1:1/nothing")
    reset_settings()
    monkeypatch.setattr("sys.argv", ["dcm-scheduler", "init-db"])
    with pytest.raises(SystemExit) as caught:
        entry()
    assert caught.value.code == 1
    error = capsys.readouterr().err
    assert "error: the store at postgresql+psycopg://postgres:***@127.0.0.1:1/nothing" in error
    assert "Traceback" not in error and "pw@" not in error


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--port", "99999"],
        ["run", "--concurrency", "0"],
        ["run", "--restarts", "-1"],
    ],
)
def test_out_of_range_options_are_wrong_usage(nowhere: Path, args: list[str]) -> None:
    run(*args, code=2)


def test_the_demo_refuses_a_folder_in_use(nowhere: Path) -> None:
    (nowhere / "home").mkdir()
    (nowhere / "home" / "store.db").write_text("")
    result = run("demo", "--home", str(nowhere / "home"), code=2)
    assert "not an empty folder" in result.output


def test_each_job_of_a_service_left_out_gets_its_own_reason(
    with_services: Path, define: Define
) -> None:
    define(
        [
            {"jobName": "out-os", "workerEntry": "os:system"},
            {"jobName": "out-dotdot", "workerEntry": "../elsewhere:work"},
        ]
    )
    record_study("7.11")
    trace = run_json("plan", "--study", "7.11", "--dry-run")["trace"]["jobs"]
    assert "'os:system'" in trace["out-os"]["reason"]
    assert "'../elsewhere:work'" in trace["out-dotdot"]["reason"]


def test_ingest_prints_file_names_with_control_characters_escaped(
    env: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "evil\nrecorded 999, FAKE\x1b[31mred").write_text("not DICOM")
    output = run("ingest", "--recursive", str(folder)).output
    assert not any(line.startswith("recorded 999") for line in output.splitlines())
    assert "evil\\nrecorded 999, FAKE\\x1b[31mred" in output
    assert "\x1b" not in output


def test_a_dotenv_that_is_a_pipe_is_refused_without_waiting(nowhere: Path) -> None:
    import os
    import subprocess
    import sys

    os.mkfifo(nowhere / ".env")
    done = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "sessions"],
        cwd=nowhere,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("DCM_")},
    )
    assert done.returncode == 2, done.stderr
    assert ".env: not a regular file" in done.stderr


def test_services_list_reports_a_missing_services_folder_like_validate(
    env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from scheduler.testing import use_environment

    monkeypatch.setenv("DCM_SERVICES_PATH", str(tmp_path / "nowhere"))
    use_environment({})
    for command in (["services", "list"], ["services", "validate"]):
        result = run(*command, code=1)
        assert f"{tmp_path / 'nowhere'}: no such folder (on DCM_SERVICES_PATH)" in result.output


def fast(*args: str, cwd: Path | None = None) -> tuple[int, str, str, list[str]]:
    """The console script in a process of its own: exit status, stdout,
    stderr, and the heavy modules it imported."""
    import os
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from scheduler import entry\n"
        f"sys.argv = ['dcm-scheduler', *{list(args)!r}]\n"
        "try:\n"
        "    entry.main()\n"
        "    code = 0\n"
        "except SystemExit as exc:\n"
        "    code = exc.code or 0\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'sqlalchemy', 'celery', 'kombu', 'alembic', 'typer', 'rich'})\n"
        "sys.stderr.write('\\nHEAVY ' + json.dumps(heavy) + '\\n')\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=dict(os.environ),
    )
    error, _, heavy = done.stderr.rpartition("\nHEAVY ")
    return done.returncode, done.stdout, error, json.loads(heavy)


def test_json_listings_answer_without_sqlalchemy_or_celery_and_as_the_full_cli(
    planned: str,
) -> None:
    from scheduler.config import get_settings

    url = get_settings().database_url
    store = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:") else None

    def footprint() -> object:
        if store is None:
            return None
        return store.stat().st_mtime_ns, sorted(p.name for p in store.parent.iterdir())

    def steady(listing: object) -> object:
        # A worker's age grows between the two runs; everything else must match.
        if isinstance(listing, list):
            return [{k: v for k, v in row.items() if k != "age_s"} for row in listing]
        return listing

    before = footprint()
    for args in (
        ["sessions", "--json"],
        ["sessions", "--json", "--status", "succeeded", "--limit", "5"],
        ["jobs", "--json", "--session", planned[:8]],
        ["show", planned, "--json"],
        ["workers", "--json"],
    ):
        code, out, error, heavy = fast(*args)
        assert (code, heavy) == (0, []), error
        assert steady(json.loads(out)) == steady(json.loads(run(*args).stdout))
    assert footprint() == before  # read, never written


def test_the_fast_path_reports_like_the_full_cli(nowhere: Path) -> None:
    code, _out, error, heavy = fast("sessions", "--json", cwd=nowhere)
    assert code == 1 and heavy == [] and "dcm-scheduler init-db" in error
    assert list(nowhere.iterdir()) == []
    code, _out, error, _heavy = fast("jobs", "--json", "--status", "bogus", cwd=nowhere)
    assert code == 2 and "upstream_failed" in error  # the full CLI's usage error


@pytest.mark.parametrize("args", [["sessions", "--json"], ["sessions"], ["jobs"], ["show", "abcd"]])
def test_a_damaged_store_file_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    damaged = tmp_path / "store.db"
    damaged.write_bytes(bytes(range(256)) * 300)  # not SQLite
    monkeypatch.setenv("DCM_DATABASE_URL", f"sqlite:///{damaged}")
    code, _out, error, _heavy = fast(*args)
    assert code == 1
    assert (
        error.strip() == f"error: the store at sqlite:///{damaged} answered: file is not a database"
    )


def test_run_refuses_a_broker_url_no_transport_can_serve(
    nowhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler.config import reset_settings

    monkeypatch.setenv("CELERY_BROKER_URL", "bogus://somewhere")
    reset_settings()
    result = run("run", "--concurrency", "1", code=2)
    assert "no such broker transport 'bogus'" in result.output
    assert not (nowhere / ".dcm-scheduler").exists()  # nothing was started or created


@pytest.mark.parametrize("listing", ["sessions", "jobs"])
@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_a_limit_past_what_a_store_holds_is_a_usage_error(
    env: Settings, listing: str, as_json: list[str]
) -> None:
    # It was a raw OverflowError traceback and exit 1.
    code, _out, error, _heavy = fast(listing, *as_json, "--limit", "99999999999999999999")
    assert code == 2, error
    assert "Traceback" not in error and "--limit" in error


def test_a_table_cut_at_its_limit_says_so(env: Settings) -> None:
    from scheduler.sessions import open_session

    record_study("9.9.9", 1)
    for _ in range(3):
        open_session("study", "9.9.9", "study.stable", manual=True)
    cut = CliRunner().invoke(cli, ["sessions", "--limit", "2"])
    assert cut.exit_code == 0
    assert "2 sessions shown, there may be more: raise --limit" in cut.stderr
    whole = CliRunner().invoke(cli, ["sessions", "--limit", "5"])
    assert "there may be more" not in whole.stderr


HOSTILE = "boom \x1b[2J\x1b]0;PWNED-TITLE\x07\x1b[31mRED\x9b[0m [bold]markup\x7f"


def test_text_services_control_is_printed_with_control_characters_escaped(planned: str) -> None:
    # A worker's error, a callback's reason, a job's job name and worker may
    # hold terminal escapes (clear the screen, set the window title) and
    # Rich markup: tables and lines show them, never act on them.
    from sqlalchemy import select

    from scheduler.store.models import Job

    with transaction() as db:
        job = db.scalars(select(Job).where(Job.session_id == planned, Job.job_name == "a")).one()
        job.status, job.error, job.worker = "failed", f"RuntimeError: {HOSTILE}", HOSTILE
        session = db.get(SchedulingSession, planned)
        assert session is not None
        trace = dict(session.trace)
        trace["jobs"] = {**trace["jobs"], "never": {**trace["jobs"]["never"], "reason": HOSTILE}}
        trace["warnings"] = [HOSTILE]
        session.trace, session.error = trace, HOSTILE
    escaped = "boom \\x1b[2J\\x1b]0;PWNED-TITLE\\x07\\x1b[31mRED\\x9b[0m [bold]markup\\x7f"
    for args in (["show", planned], ["jobs"], ["sessions"]):
        output = run(*args).output
        for raw in ("\x1b", "\x07", "\x9b", "\x7f"):
            assert raw not in output, (args, output)
    shown = run("show", planned).output
    assert f"a: RuntimeError: {escaped}" in shown
    assert f"never: {escaped}" in shown
    assert f"warning: {escaped}" in shown
    assert escaped in run("jobs", "--session", planned).output.replace("\n", "")
    [failed] = [job for job in run_json("show", planned)["jobs"] if job["job_name"] == "a"]
    assert failed["error"] == f"RuntimeError: {HOSTILE}"  # JSON keeps the text as it is


def test_text_of_other_scripts_is_printed_as_it_is_and_emoji_codes_as_text(planned: str) -> None:
    # A Japanese name keeps its ideographic space, a no-break space stays;
    # a right-to-left override is escaped; ":ok:" is not turned into a picture.
    from sqlalchemy import select

    from scheduler.store.models import Job

    legit = "山田\u3000太郎 Müller\u00a0Jürgen :ok:"
    with transaction() as db:
        job = db.scalars(select(Job).where(Job.session_id == planned, Job.job_name == "a")).one()
        job.status, job.error = "failed", f"RuntimeError: {legit} \u202eevil"
    shown = run("show", planned).output
    assert f"a: RuntimeError: {legit} \\u202eevil" in shown
