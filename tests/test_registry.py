"""The service registry (README, "Writing a service"): discovery, job fields and defaults, the
validation problems operators see, broken-service isolation, legacy
dcm-processor registries, entry-point services, and the ``services`` rows.

Every test builds its service folders in ``tmp_path``; the imports they cause
are undone after each test so that module names can repeat between tests.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from scheduler.registry import (
    EntryError,
    JobDefinition,
    Problem,
    Registry,
    load_entry,
    load_registry,
    sync_services,
)
from scheduler.registry.fields import service_version
from scheduler.store.db import dispose_engines, init_db, transaction
from scheduler.store.models import Service

CODE = """
def worker(job_name, headers, params, added_params, **kwargs):
    return {"job": job_name}


def callback(job_name, headers, params, added_params, **kwargs):
    return True
"""


@pytest.fixture(autouse=True)
def isolated_imports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Forget every module imported from the tests' folders, and sys.path edits."""
    temp = tmp_path_factory.getbasetemp().resolve()
    path = list(sys.path)
    cached = set(sys.path_importer_cache)
    importlib.invalidate_caches()
    yield
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "")
        if file and Path(file).resolve().is_relative_to(temp):
            del sys.modules[name]
    sys.path[:] = path
    for key in set(sys.path_importer_cache) - cached:
        del sys.path_importer_cache[key]
    importlib.invalidate_caches()


# --------------------------------------------------------------------------
# Helpers


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def service(
    root: Path,
    folder: str,
    definition: Any,
    code: dict[str, str] | None = None,
    file: str = "dcm-processor.json",
) -> Path:
    """A service folder: its definition (JSON value or raw text) and its code."""
    text = definition if isinstance(definition, str) else json.dumps(definition, indent=2)
    write(root / folder / file, text)
    for relative, source in (code or {}).items():
        write(root / folder / relative, source)
    return root / folder


def job(name: str, module: str, **fields: Any) -> dict[str, Any]:
    return {"jobName": name, "workerEntry": f"{module}:worker", **fields}


def simple_service(root: Path, name: str, *jobs: dict[str, Any], module: str = "") -> Path:
    """Service ``name`` whose package ``<name>_code`` holds ``worker`` and ``callback``."""
    module = module or f"{name.replace('-', '_')}_code"
    definition = {"name": name, "version": "1.0", "jobs": list(jobs)}
    return service(root, name, definition, {f"{module}/__init__.py": CODE})


def module_of(name: str) -> str:
    return f"{name.replace('-', '_')}_code"


def load(*paths: Path, **kwargs: Any) -> Registry:
    kwargs.setdefault("entry_points", False)  # hermetic unless a test wants them
    return load_registry(list(paths), **kwargs)


def messages(registry: Registry) -> list[str]:
    return [str(problem) for problem in registry.problems]


def only_problem(registry: Registry) -> str:
    assert len(registry.problems) == 1, messages(registry)
    return str(registry.problems[0])


def names(registry: Registry) -> list[str]:
    return [s.name for s in registry.services]


# --------------------------------------------------------------------------
# Formats, discovery and defaults


def test_object_format_gives_name_version_and_jobs(tmp_path: Path) -> None:
    folder = simple_service(tmp_path, "dcm2nii", job("convert", "dcm2nii_code"))

    registry = load(tmp_path)

    assert registry.ok, messages(registry)
    [loaded] = registry.services
    assert (loaded.name, loaded.version, loaded.legacy) == ("dcm2nii", "1.0", False)
    assert loaded.source == folder.absolute()
    assert loaded.definition["jobs"][0]["jobName"] == "convert"
    assert [j.job_name for j in loaded.jobs] == ["convert"]
    assert loaded.jobs[0].entry_roots == (folder.absolute(),)
    assert loaded.jobs[0].source == folder.absolute() / "dcm-processor.json"


@pytest.mark.parametrize("version", ['1.0 "beta"', "1.0\n2", "v" * 65, " 1.0", 2.0])
def test_a_version_that_cannot_be_printed_or_recalled_is_refused(
    tmp_path: Path, version: Any
) -> None:
    definition = {"name": "seg", "version": version, "jobs": [job("segment", "seg_code")]}
    service(tmp_path, "seg", definition, {"seg_code/__init__.py": CODE})
    problem = only_problem(load(tmp_path))
    assert "field 'version'" in problem and "expected a" in problem


def test_a_version_may_be_semantic_with_a_build_or_a_date() -> None:
    for version in ("2.3.0", "2024.1-rc1+build5", "v1_2", ""):
        assert service_version(version) == version


def test_bare_list_takes_the_folder_name_and_an_empty_version(tmp_path: Path) -> None:
    service(tmp_path, "seg-brain", [job("segment", "seg")], {"seg.py": CODE})

    registry = load(tmp_path)

    assert registry.ok, messages(registry)
    [loaded] = registry.services
    assert (loaded.name, loaded.version) == ("seg-brain", "")
    assert registry.job("segment").service == "seg-brain"


def test_defaults_follow_the_spec_table(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("plain", "svc_code"))

    plain = load(tmp_path).job("plain")

    assert plain.registry_entry is None
    assert plain.events == ("study.stable",)
    assert plain.depends_on == ()
    assert plain.sort_position == 999
    assert plain.phase == "main"
    assert plain.channel == "default"
    assert plain.timeout_s == 3600
    assert plain.retries == 0
    assert plain.retry_delay_s == 30
    assert plain.priority == 5
    assert plain.params == {}
    assert plain.python is None
    assert plain.on_new_data == "rerun"
    assert plain.disabled is False
    assert plain.description == ""


def test_jobs_without_events_listen_to_the_default_events(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("plain", "svc_code"))

    registry = load(tmp_path, default_events=("series.stable", "study.stable"))

    assert registry.job("plain").events == ("series.stable", "study.stable")


def test_every_field_is_read_with_its_spec_type(tmp_path: Path) -> None:
    fields = {
        "registryEntry": "svc_code:callback",
        "events": "study.*",
        "dependsOn": "first",
        "sortPosition": 2.5,
        "phase": "post",
        "channel": "gpu",
        "timeout": "90s",
        "retries": 2,
        "retryDelay": 10,
        "priority": 9,
        "params": {"threshold": 0.5},
        "python": ".venv/bin/python",
        "onNewData": "ignore",
        "disabled": False,
        "description": "every field",
    }
    folder = simple_service(
        tmp_path, "svc", job("first", "svc_code"), job("full", "svc_code", **fields)
    )

    full = load(tmp_path).job("full")

    assert full.registry_entry == "svc_code:callback"
    assert full.events == ("study.*",)
    assert full.depends_on == ("first",)
    assert (full.sort_position, full.phase, full.channel) == (2.5, "post", "gpu")
    assert (full.timeout_s, full.retries, full.retry_delay_s) == (90, 2, 10)
    assert full.priority == 9
    assert full.params == {"threshold": 0.5}
    # A relative interpreter path is relative to the service folder.
    assert full.python == str(folder.absolute() / ".venv/bin/python")
    assert (full.on_new_data, full.disabled, full.description) == ("ignore", False, "every field")


def test_null_means_the_default_and_a_bare_interpreter_name_is_kept(tmp_path: Path) -> None:
    simple_service(
        tmp_path,
        "svc",
        job("nulls", "svc_code", dependsOn=None, channel=None, python="python3.10"),
    )

    nulls = load(tmp_path).job("nulls")

    assert (nulls.depends_on, nulls.channel, nulls.python) == ((), "default", "python3.10")


def test_a_path_that_is_itself_a_service_folder_is_one_service(tmp_path: Path) -> None:
    folder = simple_service(tmp_path, "alone", job("only", "alone_code"))
    simple_service(folder, "nested", job("hidden", "nested_code"))  # not scanned

    registry = load(folder)

    assert names(registry) == ["alone"]


def test_services_are_discovered_in_name_order_and_missing_folders_ignored(
    tmp_path: Path,
) -> None:
    for name in ("zeta", "alpha", "mid"):
        simple_service(tmp_path, name, job(f"{name}-job", module_of(name)))
    (tmp_path / "not-a-service").mkdir()

    registry = load(tmp_path / "does-not-exist", tmp_path)

    assert registry.ok, messages(registry)
    assert names(registry) == ["alpha", "mid", "zeta"]


def test_registry_jobs_skip_disabled_ones_and_job_lookup_raises_key_error(
    tmp_path: Path,
) -> None:
    simple_service(
        tmp_path,
        "svc",
        job("late", "svc_code", phase="post"),
        job("b", "svc_code", sortPosition=1),
        job("a", "svc_code", sortPosition=1),
        job("early", "svc_code", phase="pre"),
        job("off", "svc_code", disabled=True),
    )

    registry = load(tmp_path)

    assert [j.job_name for j in registry.jobs()] == ["early", "a", "b", "late"]
    assert registry.job("off").disabled
    with pytest.raises(KeyError):
        registry.job("nope")


@pytest.mark.parametrize(
    ("patterns", "event", "expected"),
    [
        (["*"], "patient.stable", True),
        (["study.*"], "study.stable", True),
        (["study.*"], "series.stable", False),
        (["series.stable", "custom.reprocess"], "custom.reprocess", True),
        (["study.stable"], "study.stable.extra", False),
    ],
)
def test_events_match_exact_names_and_patterns(
    tmp_path: Path, patterns: list[str], event: str, expected: bool
) -> None:
    simple_service(tmp_path, "svc", job("listener", "svc_code", events=patterns))

    assert load(tmp_path).job("listener").matches(event) is expected


# --------------------------------------------------------------------------
# Validation problems


def test_problem_names_file_job_and_field() -> None:
    problem = Problem(
        "dcm2nii",
        "services/dcm2nii/dcm-processor.json",
        "x",
        "timeout",
        "expected a duration like '90s', got [1]",
    )

    assert str(problem) == (
        "services/dcm2nii/dcm-processor.json: job 'x': field 'timeout':"
        " expected a duration like '90s', got [1]"
    )


def test_json_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    text = '{\n  "name": "bad",\n  "jobs": [\n    {"jobName": "a",}\n  ]\n}\n'
    folder = service(tmp_path, "bad", text)

    message = only_problem(load(tmp_path))

    assert str(folder / "dcm-processor.json") in message
    assert re.search(r"line 4 column \d+", message), message


def test_unknown_field_is_reported_with_suggestion(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", timout="1h"))

    message = only_problem(load(tmp_path))

    assert "job 'a': unknown field 'timout' (did you mean 'timeout'?)" in message


def test_unknown_field_without_a_close_name_has_no_suggestion(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", gpuMemoryLimit=4))

    message = only_problem(load(tmp_path))

    assert message.endswith("unknown field 'gpuMemoryLimit'")


def test_unknown_service_field_is_reported(tmp_path: Path) -> None:
    definition = {"name": "svc", "versoin": "1", "jobs": [job("a", "svc_code")]}
    service(tmp_path, "svc", definition, {"svc_code.py": CODE})

    assert "unknown field 'versoin' (did you mean 'version'?)" in only_problem(load(tmp_path))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("timeout", [1], "field 'timeout': expected a duration like '90s'"),
        ("timeout", 0, "field 'timeout': expected a duration greater than 0"),
        ("retryDelay", "soon", "field 'retryDelay': expected a duration like '90s'"),
        ("timeout", "100000000000h", "field 'timeout': expected a duration of at most 366 days"),
        ("retryDelay", 1e300, "field 'retryDelay': expected a duration of at most 366 days"),
        ("retries", "2", "field 'retries': expected an integer from 0 to 1000"),
        ("retries", -1, "field 'retries': expected an integer from 0 to 1000"),
        # PostgreSQL's integer column refused it at planning, every time.
        ("retries", 10_000_000_000, "field 'retries': expected an integer from 0 to 1000"),
        ("priority", 12, "field 'priority': expected an integer from 0 to 9"),
        ("priority", True, "field 'priority': expected an integer from 0 to 9, got true"),
        ("sortPosition", True, "field 'sortPosition': expected a number, got true"),
        ("sortPosition", "1", "field 'sortPosition': expected a number"),
        ("events", 3, "field 'events': expected a string or a list of strings"),
        ("dependsOn", {"a": 1}, "field 'dependsOn': expected a string or a list of strings"),
        ("params", [], "field 'params': expected an object"),
        ("disabled", "yes", "field 'disabled': expected true or false"),
        ("onNewData", "always", "field 'onNewData': expected one of 'rerun', 'ignore'"),
        ("phase", "during", "field 'phase': expected one of 'pre', 'main', 'post'"),
        ("channel", 5, "field 'channel': expected a string"),
        ("channel", "gpu,cpu", "field 'channel': expected a queue name"),
        ("channel", "gpu queue", "field 'channel': expected a queue name"),
        ("channel", "-Q", "field 'channel': expected a queue name"),
        ("description", 1, "field 'description': expected a string"),
        ("python", "", "field 'python': expected a non-empty string"),
        ("registryEntry", ["a"], "field 'registryEntry': expected a string"),
    ],
)
def test_wrong_type_is_reported_with_the_field_and_what_was_expected(
    tmp_path: Path, field: str, value: Any, expected: str
) -> None:
    folder = simple_service(tmp_path, "svc", job("a", "svc_code", **{field: value}))

    message = only_problem(load(tmp_path))

    assert message.startswith(f"{folder / 'dcm-processor.json'}: job 'a': "), message
    assert expected in message


def test_job_name_must_use_the_allowed_characters(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("has space", "svc_code"))

    assert "field 'jobName': expected letters, digits" in only_problem(load(tmp_path))


def test_missing_worker_entry_is_reported(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", {"jobName": "a"})

    assert "job 'a': field 'workerEntry': missing" in only_problem(load(tmp_path))


def test_legacy_and_new_name_of_one_field_together_is_an_error(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", worker="svc_code.worker"))

    message = only_problem(load(tmp_path))

    assert "field 'worker': use either 'workerEntry' or 'worker', not both" in message


def test_a_key_written_twice_in_one_object_is_reported(tmp_path: Path) -> None:
    text = '[{"jobName": "a", "workerEntry": "m:worker", "timeout": "1h", "timeout": "2h"}]'
    service(tmp_path, "svc", text, {"m.py": CODE})

    assert "key 'timeout' appears twice" in only_problem(load(tmp_path))


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("NaN", "NaN is not a JSON value"),
        ("-Infinity", "-Infinity is not a JSON value"),
        ("1e999", "a number is not finite (inf)"),
        ('"a\\u0000b"', "a string holds a NUL character"),
        ('"\\ud800"', "not valid Unicode (a lone surrogate)"),
    ],
)
def test_a_definition_with_values_no_store_keeps_is_reported(
    tmp_path: Path, value: str, said: str
) -> None:
    text = f'[{{"jobName": "a", "workerEntry": "m:worker", "params": {{"x": {value}}}}}]'
    service(tmp_path, "svc", text, {"m.py": CODE})

    assert said in only_problem(load(tmp_path))


def test_duplicate_job_name_breaks_the_later_service_and_names_both_files(
    tmp_path: Path,
) -> None:
    first = simple_service(tmp_path, "a-first", job("dup", "a_first_code"))
    later = simple_service(tmp_path, "b-later", job("dup", "b_later_code"))

    registry = load(tmp_path)

    assert names(registry) == ["a-first"]
    assert list(registry.broken) == ["b-later"]
    message = only_problem(registry)
    assert message.startswith(str(later / "dcm-processor.json"))
    assert "duplicate jobName 'dup'" in message
    assert str(first / "dcm-processor.json") in message


def test_duplicate_job_name_inside_one_file_is_reported(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("dup", "svc_code"), job("dup", "svc_code"))

    assert "duplicate jobName 'dup' (twice in this file)" in only_problem(load(tmp_path))


def test_duplicate_service_name_breaks_the_later_one(tmp_path: Path) -> None:
    simple_service(tmp_path / "one", "same", job("x", "same_code"))
    simple_service(tmp_path / "two", "same", job("y", "same_two_code"), module="same_two_code")

    registry = load(tmp_path / "one", tmp_path / "two")

    assert [j.job_name for j in registry.jobs()] == ["x"]
    assert "duplicate service name 'same'" in only_problem(registry)


def test_unresolved_depends_on_is_reported(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", dependsOn=["ghost"]))

    message = only_problem(load(tmp_path))

    assert "job 'a': field 'dependsOn': unresolved dependsOn 'ghost'" in message


def test_dependency_cycle_is_printed_and_breaks_every_service_on_it(tmp_path: Path) -> None:
    simple_service(tmp_path, "s1", job("x", "s1_code", dependsOn="y"))
    simple_service(tmp_path, "s2", job("y", "s2_code", dependsOn="z"))
    simple_service(tmp_path, "s3", job("z", "s3_code", dependsOn="x"))
    simple_service(tmp_path, "s4", job("w", "s4_code"))

    registry = load(tmp_path)

    assert names(registry) == ["s4"]
    assert sorted(registry.broken) == ["s1", "s2", "s3"]
    assert "dependency cycle: x -> y -> z -> x" in str(registry.broken["s1"][0])
    assert "dependency cycle: y -> z -> x -> y" in str(registry.broken["s2"][0])


def test_a_job_depending_on_itself_is_a_cycle(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", dependsOn="a"))

    assert "dependency cycle: a -> a" in only_problem(load(tmp_path))


def test_depending_on_a_later_phase_is_a_cycle_through_the_phases(tmp_path: Path) -> None:
    simple_service(
        tmp_path,
        "svc",
        job("prepare", "svc_code", phase="pre", dependsOn="analyse"),
        job("analyse", "svc_code"),
    )

    message = only_problem(load(tmp_path))

    assert "dependsOn 'analyse' is a main job" in message
    assert "dependency cycle through phases" in message


def test_post_job_may_depend_on_pre_and_main_jobs(tmp_path: Path) -> None:
    simple_service(
        tmp_path,
        "svc",
        job("prepare", "svc_code", phase="pre"),
        job("analyse", "svc_code", dependsOn="prepare"),
        job("store", "svc_code", phase="post", dependsOn=["prepare", "analyse"]),
    )

    assert load(tmp_path).ok


# --------------------------------------------------------------------------
# Entries


def test_worker_entry_that_cannot_be_imported_is_reported_with_the_reason(
    tmp_path: Path,
) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", workerEntry="svc_code:nothing"))

    message = only_problem(load(tmp_path))

    assert "cannot import workerEntry 'svc_code:nothing'" in message
    assert "has no attribute 'nothing'" in message


def test_registry_entry_that_cannot_be_imported_is_reported_with_the_reason(
    tmp_path: Path,
) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", registryEntry="absent_mod:callback"))

    message = only_problem(load(tmp_path))

    assert "cannot import registryEntry 'absent_mod:callback'" in message
    assert "no module named 'absent_mod'" in message


def test_module_raising_at_import_is_reported_with_its_error(tmp_path: Path) -> None:
    service(
        tmp_path,
        "svc",
        [job("a", "exploding")],
        {"exploding.py": "raise RuntimeError('no GPU here')\n"},
    )

    message = only_problem(load(tmp_path))

    assert "cannot import workerEntry 'exploding:worker': RuntimeError: no GPU here" in message


def test_entry_must_be_callable(tmp_path: Path) -> None:
    service(
        tmp_path,
        "svc",
        [job("a", "values", workerEntry="values:limit")],
        {"values.py": "limit = 3\n"},
    )

    assert "'values:limit' is not callable (it is a int)" in only_problem(load(tmp_path))


def test_entry_syntax_is_checked(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", workerEntry="worker"))

    message = only_problem(load(tmp_path))

    assert "expected 'module.sub:function' or 'module.sub.function'" in message


@pytest.mark.parametrize(
    "entry", ["os:system", "subprocess:run", "../other:worker", "os.path.join", "..svc_code:worker"]
)
def test_entries_outside_the_service_folder_are_rejected(tmp_path: Path, entry: str) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", workerEntry=entry))

    message = only_problem(load(tmp_path))

    assert f"cannot import workerEntry {entry!r}" in message
    assert "outside its service folder" in message


def test_an_entry_outside_the_service_folder_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported.txt"
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "sneaky_mod.py", f"open({str(marker)!r}, 'w').close()\n{CODE}")
    monkeypatch.syspath_prepend(str(elsewhere))
    simple_service(tmp_path / "services", "svc", job("a", "sneaky_mod"))

    message = only_problem(load(tmp_path / "services"))

    assert "module 'sneaky_mod' is outside its service folder" in message
    assert not marker.exists()
    assert "sneaky_mod" not in sys.modules


def test_an_attribute_path_through_an_imported_module_is_outside(tmp_path: Path) -> None:
    service(
        tmp_path,
        "svc",
        [job("a", "wrapper", workerEntry="wrapper:os.system")],
        {"wrapper.py": "import os\n"},
    )

    assert "'wrapper.os' is a module outside its service folder" in only_problem(load(tmp_path))


def test_dotted_entry_takes_the_longest_importable_module(tmp_path: Path) -> None:
    code = {
        "tools/__init__.py": "def top_level(*args, **kwargs):\n    return 'top'\n",
        "tools/convert.py": "def worker(*args, **kwargs):\n    return 'convert'\n",
    }
    definition = [
        job("a", "tools", workerEntry="tools.convert.worker", registryEntry="tools.top_level")
    ]
    service(tmp_path, "svc", definition, code)

    registry = load(tmp_path)

    assert registry.ok, messages(registry)
    a = registry.job("a")
    assert load_entry(a.worker_entry, a.entry_roots)() == "convert"
    assert load_entry(a.registry_entry or "", a.entry_roots)() == "top"


def test_a_missing_import_inside_a_module_is_not_mistaken_for_an_attribute(
    tmp_path: Path,
) -> None:
    code = {
        "tools/__init__.py": "",
        "tools/convert.py": "import not_installed_anywhere_xyz\n",
    }
    service(tmp_path, "svc", [job("a", "tools", workerEntry="tools.convert.worker")], code)

    message = only_problem(load(tmp_path))

    assert "No module named 'not_installed_anywhere_xyz'" in message


def test_load_entry_raises_entry_error_with_the_reason(tmp_path: Path) -> None:
    write(tmp_path / "svc" / "mod.py", CODE)
    roots = [tmp_path / "svc"]

    assert load_entry("mod:worker", roots)("j", {}, {}, {}) == {"job": "j"}
    with pytest.raises(EntryError) as caught:
        load_entry("os:system", roots)
    assert caught.value.entry == "os:system"
    assert "outside its service folder" in str(caught.value)


def test_two_services_with_the_same_module_name_are_reported(tmp_path: Path) -> None:
    simple_service(tmp_path, "a-svc", job("a", "shared_mod"), module="shared_mod")
    simple_service(tmp_path, "b-svc", job("b", "shared_mod"), module="shared_mod")

    registry = load(tmp_path)

    assert names(registry) == ["a-svc"]
    message = only_problem(registry)
    assert "module 'shared_mod' of service 'b-svc' is also provided by service 'a-svc'" in message


def test_a_broken_service_found_first_does_not_take_a_job_name_from_a_working_one(
    tmp_path: Path,
) -> None:
    simple_service(tmp_path, "a-broken", job("shared", module_of("a-broken"), retries="x"))
    simple_service(tmp_path, "b-working", job("shared", module_of("b-working")))

    registry = load(tmp_path)

    assert names(registry) == ["b-working"]
    assert {problem.service for problem in registry.problems} == {"a-broken"}
    assert any("duplicate jobName 'shared'" in m for m in messages(registry))


def test_a_service_left_out_claims_no_module_name(tmp_path: Path) -> None:
    cycle = [
        job("one", "shared_mod", dependsOn="two"),
        job("two", "shared_mod", dependsOn="one"),
    ]
    service(
        tmp_path, "a-cycle", {"name": "a-cycle", "jobs": cycle}, {"shared_mod/__init__.py": CODE}
    )
    simple_service(tmp_path, "b-svc", job("b", "shared_mod"), module="shared_mod")

    registry = load(tmp_path)

    assert names(registry) == ["b-svc"]
    assert all(problem.service == "a-cycle" for problem in registry.problems)
    assert any("dependency cycle" in m for m in messages(registry))


def test_a_helper_module_shared_by_name_between_services_is_reported(tmp_path: Path) -> None:
    helper = "def help():\n    return 1\n"
    entry_code = "import helpers\n" + CODE
    service(
        tmp_path,
        "a-svc",
        [job("a", "a_main")],
        {"a_main.py": entry_code, "helpers.py": helper},
    )
    service(
        tmp_path,
        "b-svc",
        [job("b", "b_main")],
        {"b_main.py": entry_code, "helpers.py": helper},
    )

    registry = load(tmp_path)

    assert names(registry) == ["a-svc"]
    assert "module 'helpers' of service 'b-svc' is also provided by service 'a-svc'" in (
        only_problem(registry)
    )


def test_check_imports_false_runs_no_service_code(tmp_path: Path) -> None:
    marker = tmp_path / "imported.txt"
    code = {"eager/__init__.py": f"open({str(marker)!r}, 'w').close()\n{CODE}"}
    service(tmp_path / "services", "svc", [job("a", "eager")], code)

    registry = load(tmp_path / "services", check_imports=False)

    assert registry.ok, messages(registry)
    assert not marker.exists()
    load(tmp_path / "services")
    assert marker.exists()


def test_check_imports_false_still_rejects_entries_outside_the_folder(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", workerEntry="os:system"))

    assert "outside its service folder" in only_problem(load(tmp_path, check_imports=False))


# --------------------------------------------------------------------------
# Broken services stay alone


def test_one_broken_service_does_not_stop_another(tmp_path: Path) -> None:
    simple_service(tmp_path, "good", job("fine", "good_code"))
    service(tmp_path, "bad", "{ not json")

    registry = load(tmp_path)

    assert names(registry) == ["good"]
    assert list(registry.broken) == ["bad"]
    assert not registry.ok
    assert [j.job_name for j in registry.jobs()] == ["fine"]


def nested(levels: int) -> str:
    """JSON text of objects ``levels`` deep: json.dumps recurses as deep."""
    return '{"a": ' * levels + "{}" + "}" * levels


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # past what Python's JSON reader can read
        f'[{{"jobName": "deep", "workerEntry": "m:worker", "params": {nested(5_000)}}}]',
        # Readable, but storing it, a message or a callback's request would not be.
        f'[{{"jobName": "deep", "workerEntry": "m:worker", "params": {nested(900)}}}]',
    ],
    ids=["brackets", "params-5000", "params-900"],
)
def test_a_definition_nested_too_deep_is_left_out_alone(tmp_path: Path, text: str) -> None:
    simple_service(tmp_path, "good", job("fine", "good_code"))
    folder = service(tmp_path, "zz-deep", text, {"m.py": CODE})

    registry = load(tmp_path)

    assert names(registry) == ["good"]
    assert list(registry.broken) == ["zz-deep"]
    said = "nested too deep: more than 100 levels of objects and lists"
    assert only_problem(registry) == f"{folder / 'dcm-processor.json'}: {said}"


def test_a_definition_100_levels_deep_is_read(tmp_path: Path) -> None:
    # The job object and the list around it are two of the 100 levels.
    text = f'[{{"jobName": "a", "workerEntry": "m:worker", "params": {nested(97)}}}]'
    service(tmp_path, "svc", text, {"m.py": CODE})

    registry = load(tmp_path)

    assert registry.ok, messages(registry)
    assert "a" in registry.job("a").params


@pytest.mark.parametrize(
    ("module_code", "reason"),
    [
        ("import os\nprint('leaving now')\nos._exit(3)\n", "ended the process with status 3"),
        ("import time\nwhile True:\n    time.sleep(1)\n", "did not finish within 1s"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", "by signal 11"),
    ],
)
def test_a_service_whose_import_exits_hangs_or_crashes_is_left_out_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    module_code: str, reason: str,
) -> None:  # fmt: skip
    from scheduler.config import reset_settings

    monkeypatch.setenv("DCM_CALLBACK_TIMEOUT", "1")
    reset_settings()
    simple_service(tmp_path, "good", job("fine", "good_code"))
    code = {"fatal/__init__.py": module_code + CODE}
    service(tmp_path, "fatal", [job("doomed", "fatal")], code)

    registry = load(tmp_path)  # this process goes on, whatever the import did

    assert names(registry) == ["good"]
    assert reason in only_problem(registry)
    assert "fatal" not in sys.modules
    assert "leaving now" not in capfd.readouterr().out  # service output stays out of ours


def test_depending_on_a_broken_service_cascades(tmp_path: Path) -> None:
    simple_service(tmp_path, "base", job("root", "base_code", timeout="never"))
    simple_service(tmp_path, "middle", job("mid", "middle_code", dependsOn="root"))
    simple_service(tmp_path, "top", job("leaf", "top_code", dependsOn=["mid"]))
    simple_service(tmp_path, "free", job("other", "free_code"))

    registry = load(tmp_path)

    assert names(registry) == ["free"]
    assert sorted(registry.broken) == ["base", "middle", "top"]
    assert "dependsOn 'root' is a job of broken service 'base'" in str(registry.broken["middle"][0])
    assert "dependsOn 'mid' is a job of broken service 'middle'" in str(registry.broken["top"][0])


# --------------------------------------------------------------------------
# Legacy dcm-processor registries


LEGACY_SERVICE_CODE = """
def worker(jobName, headers, params, added_params, **kwargs):
    return "converted"


def callback(jobName, headers, params, added_params, **kwargs):
    return True, {"series": 1}
"""

BASE_CODE = """
def dicomAnonymizer(jobName, headers, params, added_params, **kwargs):
    return True


def storageManager(jobName, headers, params, added_params, **kwargs):
    return True
"""


def legacy_registry(tmp_path: Path) -> tuple[Path, Path]:
    """A dcm-processor registry root and system settings file, unchanged."""
    root = tmp_path / "registry"
    legacy_job: dict[str, Any] = {
        "jobName": "dcm2nii",
        "worker": "dcm2nii.worker",
        "callback": "dcm2nii.callback",
        "dependsOn": None,
        "channel": "default",
        "timeout": "1h",
        "params": {},
        "description": "DICOM to NIfTI",
    }
    service(
        root,
        "dcm2nii",
        [legacy_job],
        {"__init__.py": LEGACY_SERVICE_CODE},
        file="settings.json",
    )
    write(root / "base" / "__init__.py", BASE_CODE)
    write(root / "base" / "anonymizer.py", "def worker(*args, **kwargs):\n    return 'anon'\n")
    write(root / "base" / "storage.py", "def worker(*args, **kwargs):\n    return 'stored'\n")
    settings = {
        "headerFields": ["PatientID", "Modality", "SeriesDescription"],
        "preServices": [
            {
                "jobName": "dicomAnonymizer",
                "worker": "base.anonymizer.worker",
                "callback": "base.dicomAnonymizer",
                "dependsOn": None,
                "timeout": "1h",
                "params": {},
            }
        ],
        "postServices": [
            {
                "jobName": "storageManager",
                "worker": "base.storage.worker",
                "callback": "base.storageManager",
                "dependsOn": None,
                "params": {},
            }
        ],
        "mongoConnection": "ignored: dcm-processor keeps many other settings here",
    }
    settings_file = write(tmp_path / "settings.json", json.dumps(settings))
    return root, settings_file


def test_legacy_registry_loads_with_phases_defaults_and_callables(tmp_path: Path) -> None:
    root, settings_file = legacy_registry(tmp_path)

    registry = load(root, settings_file=settings_file)

    assert registry.ok, messages(registry)
    assert names(registry) == ["system", "dcm2nii"]
    assert all(s.legacy for s in registry.services)
    anonymizer = registry.job("dicomAnonymizer")
    storage = registry.job("storageManager")
    convert = registry.job("dcm2nii")
    assert (anonymizer.phase, storage.phase, convert.phase) == ("pre", "post", "main")
    assert (anonymizer.sort_position, storage.sort_position) == (1, 1)
    assert convert.sort_position == 999
    assert (convert.worker_entry, convert.registry_entry) == ("dcm2nii.worker", "dcm2nii.callback")
    # Legacy entries resolve from the registry root, as in dcm-processor.
    assert convert.entry_roots == (root.absolute(),)
    args: tuple[Any, ...] = ("dcm2nii", {}, {}, {})
    assert load_entry(convert.worker_entry, convert.entry_roots)(*args) == "converted"
    callback = load_entry(convert.registry_entry or "", convert.entry_roots)
    assert callback(*args) == (True, {"series": 1})
    assert load_entry(anonymizer.worker_entry, anonymizer.entry_roots)() == "anon"
    assert load_entry(storage.worker_entry, storage.entry_roots)() == "stored"
    assert load_entry(storage.registry_entry or "", storage.entry_roots)(*args) is True
    assert registry.header_fields == ("PatientID", "Modality", "SeriesDescription")
    assert "mongoConnection" not in registry.services[0].definition


def test_system_settings_entry_roots_are_the_path_and_the_settings_folder(
    tmp_path: Path,
) -> None:
    root, settings_file = legacy_registry(tmp_path)

    registry = load(root, tmp_path / "absent", settings_file=settings_file)

    assert registry.job("dicomAnonymizer").entry_roots == (root.absolute(), tmp_path.absolute())


def test_full_tags_means_all_header_fields(tmp_path: Path) -> None:
    settings = write(
        tmp_path / "settings.json", json.dumps({"headerFields": ["A"], "fullTags": True})
    )

    registry = load(settings_file=settings)

    assert registry.ok, messages(registry)
    assert registry.header_fields is None


def test_without_settings_file_header_fields_are_not_set(tmp_path: Path) -> None:
    assert load(tmp_path).header_fields is None


def test_a_missing_settings_file_is_reported(tmp_path: Path) -> None:
    registry = load(settings_file=tmp_path / "nope.json")

    assert "settings file not found" in only_problem(registry)
    assert list(registry.broken) == ["system"]


def test_system_jobs_cannot_change_their_phase(tmp_path: Path) -> None:
    write(tmp_path / "base.py", CODE)
    pre = [{"jobName": "a", "worker": "base.worker", "phase": "main"}]
    settings = write(tmp_path / "settings.json", json.dumps({"preServices": pre}))

    assert "jobs of preServices are phase 'pre'" in only_problem(load(settings_file=settings))


def test_a_settings_file_nested_too_deep_leaves_out_only_system_jobs(tmp_path: Path) -> None:
    simple_service(tmp_path / "services", "good", job("fine", "good_code"))
    deep = "[" * 100_000 + "]" * 100_000
    settings = write(tmp_path / "settings.json", '{"preServices": ' + deep + "}")

    registry = load(tmp_path / "services", settings_file=settings)

    assert names(registry) == ["good"]
    assert list(registry.broken) == ["system"]
    assert "nested too deep" in only_problem(registry)


# --------------------------------------------------------------------------
# Installed services (entry points)


def installed_service(site: Path, package: str, jobs: list[dict[str, Any]]) -> None:
    """A pip-installed service: the package and its dist-info, as pip leaves them."""
    definition = {"name": "installed", "version": "2.0", "jobs": jobs}
    write(site / package / "__init__.py", CODE)
    write(site / package / "dcm-processor.json", json.dumps(definition))
    dist = site / "installed_service-2.0.dist-info"
    write(dist / "METADATA", "Metadata-Version: 2.1\nName: installed-service\nVersion: 2.0\n")
    write(dist / "entry_points.txt", f"[dcm_processor.services]\ninstalled = {package}\n")


def test_entry_point_service_is_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    installed_service(site, "installed_pkg", [job("remote", "installed_pkg")])
    monkeypatch.syspath_prepend(str(site))

    registry = load_registry([], entry_points=True)

    [loaded] = [s for s in registry.services if s.name == "installed"]
    assert loaded.version == "2.0"
    assert loaded.source == site / "installed_pkg"
    remote = registry.job("remote")
    assert remote.entry_roots == (site,)
    assert remote.package == "installed_pkg"
    assert load_entry(remote.worker_entry, remote.entry_roots, package="installed_pkg")(
        "remote", {}, {}, {}
    ) == {"job": "remote"}


def test_entry_point_entries_must_stay_inside_their_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    installed_service(site, "installed_pkg", [job("remote", "neighbour")])
    write(site / "neighbour.py", CODE)
    monkeypatch.syspath_prepend(str(site))

    registry = load_registry([], entry_points=True)

    assert "installed" in registry.broken
    [problem] = registry.broken["installed"]
    assert "outside its service folder" in str(problem)
    assert "installed_pkg" in str(problem)


# --------------------------------------------------------------------------
# Content hash and the services table


def test_content_hash_follows_the_definition_and_the_code(tmp_path: Path) -> None:
    folder = simple_service(tmp_path, "svc", job("a", "svc_code"))

    first = load(tmp_path, check_imports=False).services[0].content_hash
    write(folder / "svc_code" / "__pycache__" / "cached.py", "# not code\n")
    assert load(tmp_path, check_imports=False).services[0].content_hash == first
    write(folder / "svc_code" / "extra.py", "VALUE = 1\n")
    second = load(tmp_path, check_imports=False).services[0].content_hash
    definition = folder / "dcm-processor.json"
    definition.write_text(definition.read_text().replace('"1.0"', '"1.1"'))
    third = load(tmp_path, check_imports=False).services[0].content_hash

    assert len({first, second, third}) == 3


def test_code_stamp_covers_the_files_the_code_hash_reads_and_moves_with_them(
    tmp_path: Path,
) -> None:
    import os

    from scheduler.registry import code

    folder = tmp_path / "svc"
    write(folder / "top.py", "A = 1\n")
    write(folder / "pkg" / "deep" / "mod.py", "B = 1\n")
    write(folder / "pkg" / "notes.txt", "not code\n")
    for skipped in (".git", "__pycache__", "node_modules", "site-packages"):
        write(folder / skipped / "hidden.py", "C = 1\n")
    write(folder / "venv" / "pyvenv.cfg", "home = /usr\n")
    write(folder / "venv" / "lib" / "installed.py", "D = 1\n")
    os.symlink(folder / "pkg", folder / "linked")
    single = write(tmp_path / "alone.py", "E = 1\n")
    locations = [folder, single, tmp_path / "missing"]

    hashed = {
        str(path)
        for location in locations
        if location.exists()
        for _relative, path in code._code_files(location, "")
    }
    first = code.code_stamp(locations)
    assert {entry[0] for entry in first} == hashed
    assert hashed == {str(folder / "top.py"), str(folder / "pkg" / "deep" / "mod.py"), str(single)}
    assert code.code_stamp(locations) == first

    write(folder / "pkg" / "deep" / "mod.py", "B = 22\n")
    second = code.code_stamp(locations)
    write(folder / "pkg" / "new.py", "F = 1\n")
    third = code.code_stamp(locations)
    write(folder / "venv" / "lib" / "installed.py", "D = 2222\n")
    assert len({first, second, third}) == 3
    assert code.code_stamp(locations) == third


def test_sync_services_writes_enabled_broken_and_vanished_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_db(url)
    services = tmp_path / "services"
    simple_service(services, "good", job("fine", "good_code"))
    simple_service(services, "bad", job("wrong", "bad_code", retries="many"))
    try:
        registry = load(services)
        with transaction(url) as db:
            sync_services(db, registry)
        with transaction(url) as db:
            rows = {row.name: row for row in db.scalars(select(Service))}
            assert rows["good"].enabled and rows["good"].error is None
            assert rows["good"].version == "1.0"
            assert rows["good"].source == str((services / "good").absolute())
            assert rows["good"].content_hash == registry.services[0].content_hash
            assert rows["good"].definition["jobs"][0]["jobName"] == "fine"
            assert not rows["bad"].enabled
            assert "field 'retries': expected an integer" in (rows["bad"].error or "")

        for path in (services / "good").rglob("*"):
            if path.is_file():
                path.unlink()
        with transaction(url) as db:
            sync_services(db, load(services))
        with transaction(url) as db:
            good = db.scalars(select(Service).where(Service.name == "good")).one()
            assert not good.enabled
            assert good.error == "no longer found on the services path"
    finally:
        dispose_engines()


def test_job_definitions_are_hashable_and_compare_without_params(tmp_path: Path) -> None:
    simple_service(tmp_path, "svc", job("a", "svc_code", params={"x": [1]}))

    a = load(tmp_path).job("a")

    assert isinstance(a, JobDefinition)
    assert {a: 1}[a] == 1
