"""The embedded filesystem broker under concurrent producers and consumers, and bad files.

The consumers and producers of the first test are real processes, as in
``dcm-scheduler run`` (a worker, its pool processes and beat all share the
queue folder).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

import celeryconfig
from scheduler.config import load_settings

TRANSPORT = "scheduler.broker:Transport"
QUEUE = "dcm.stress"  # a dot in the name, like the scheduler's own queues

PRODUCERS = 3
CONSUMERS = 4
MESSAGES_EACH = 1000
PADDING = "x" * 20_000  # a write that takes a while, for a reader to catch half done


def transport_options(folder: Path) -> dict[str, Any]:
    """What the embedded broker is given when its folder is ``folder``
    (``$DCM_HOME/broker``)."""
    assert folder.name == "broker"
    return celeryconfig.transport_options(load_settings({"DCM_HOME": str(folder.parent)}))


def produce(options: dict[str, Any], producer: int, count: int, go: Any) -> None:
    with Connection(transport=TRANSPORT, transport_options=options) as connection:
        publisher = connection.Producer(serializer="json")
        go.wait()
        for n in range(count):
            publisher.publish(
                {"id": f"{producer}-{n}", "padding": PADDING}, exchange="", routing_key=QUEUE
            )


def consume(options: dict[str, Any], results: str, stop: Any, go: Any) -> None:
    """Take messages until told to stop and the queue is empty; write their ids."""
    received: list[str] = []
    try:
        with Connection(transport=TRANSPORT, transport_options=options) as connection:
            channel = connection.default_channel
            go.wait()
            while True:
                message = channel.basic_get(QUEUE, no_ack=True)
                if message is not None:
                    received.append(message.decode()["id"])
                elif stop.is_set():
                    break
    finally:
        Path(results).write_text("\n".join(received))


def queued(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.name.endswith(f".{QUEUE}.msg")]


def test_concurrent_producers_and_consumers_lose_and_double_nothing(tmp_path: Path) -> None:
    from scheduler.testing import wait_until

    options = transport_options(tmp_path / "broker")
    for folder in ("data_folder_in", "control_folder"):  # the stock transport needs them
        Path(options[folder]).mkdir(parents=True)
    context = multiprocessing.get_context("spawn")
    stop, go = context.Event(), context.Event()
    outputs = [tmp_path / f"consumer-{n}.txt" for n in range(CONSUMERS)]
    consumers = [
        context.Process(target=consume, args=(options, str(path), stop, go)) for path in outputs
    ]
    producers = [
        context.Process(target=produce, args=(options, n, MESSAGES_EACH, go))
        for n in range(PRODUCERS)
    ]
    processes = consumers + producers
    for process in processes:
        process.start()
    try:
        go.set()
        for process in producers:
            process.join(60)
        assert [p.exitcode for p in producers] == [0] * PRODUCERS
        # Every message is taken (or a consumer died trying).
        wait_until(
            lambda: (
                not queued(tmp_path / "broker" / "queue")
                or any(c.exitcode is not None for c in consumers)
            ),
            what="the queue to drain",
        )
        stop.set()
        for process in consumers:
            process.join(60)
        assert [c.exitcode for c in consumers] == [0] * CONSUMERS
    finally:
        stop.set()
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()

    counts = Counter(line for path in outputs for line in path.read_text().splitlines())
    expected = {f"{p}-{n}" for p in range(PRODUCERS) for n in range(MESSAGES_EACH)}
    assert sorted(set(expected) - set(counts)) == []  # nothing lost
    assert sorted(set(counts) - expected) == []
    assert {key: n for key, n in counts.items() if n > 1} == {}  # nothing doubled
    assert sum(1 for path in outputs if path.read_text()) > 1  # the consumers did compete


GARBAGE = {
    "not-json": b"not json",
    "empty": b"",
    "list": b"[1, 2, 3]",
    "no-properties": b'{"body": "eyJpZCI6IDF9", "headers": {}}',
    "no-delivery-tag": b'{"body": null, "properties": {"delivery_info": {}}}',
    "bad-base64": b'{"body": "abc", "properties": {"delivery_tag": "t", "body_encoding": "base64"}}',
    "not-utf8": b"\xff\xfe\x00garbage",
}


def drop(folder: Path, label: str, content: bytes, queue: str = QUEUE) -> str:
    """A file under a name the transport takes for a message of ``queue``."""
    from scheduler.broker import message_name

    name = message_name(queue).replace("_", f"_{label}-", 1)
    (folder / name).write_bytes(content)
    return name


def test_garbage_files_are_set_aside_and_the_messages_around_them_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="scheduler.broker")
    root = tmp_path / "broker"
    with Connection(transport=TRANSPORT, transport_options=transport_options(root)) as connection:
        publisher = connection.Producer(serializer="json")
        channel = connection.default_channel
        queue_folder = root / "queue"
        bad: dict[str, bytes] = {}
        for n, (label, content) in enumerate(GARBAGE.items()):
            publisher.publish({"id": n}, exchange="", routing_key=QUEUE)
            bad[drop(queue_folder, label, content)] = content
        publisher.publish({"id": len(GARBAGE)}, exchange="", routing_key=QUEUE)
        other = drop(queue_folder, "other-queue", b"not json", queue="elsewhere")

        delivered = []
        while (message := channel.basic_get(QUEUE, no_ack=True)) is not None:
            delivered.append(message.decode()["id"])

    assert sorted(delivered) == list(range(len(GARBAGE) + 1))  # FIFO only to the millisecond
    assert {path.name: path.read_bytes() for path in (root / "bad").iterdir()} == bad
    assert [path.name for path in queue_folder.iterdir()] == [other]  # not this queue's
    assert list((root / "claimed").iterdir()) == []
    for name in bad:
        lines = [r for r in caplog.records if name in r.getMessage()]
        assert len(lines) == 1, (name, [r.getMessage() for r in caplog.records])
        assert lines[0].levelno >= logging.WARNING


def test_a_missing_queue_folder_is_no_message_and_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    caplog.set_level(logging.WARNING, logger="scheduler.broker")
    root = tmp_path / "broker"
    with Connection(transport=TRANSPORT, transport_options=transport_options(root)) as connection:
        channel = connection.default_channel
        shutil.rmtree(root)
        assert channel.basic_get(QUEUE, no_ack=True) is None
        assert channel.basic_get(QUEUE, no_ack=True) is None
        connection.Producer(serializer="json").publish({"id": 1}, exchange="", routing_key=QUEUE)
        message = channel.basic_get(QUEUE, no_ack=True)
        assert message is not None and message.decode() == {"id": 1}
    warnings = [r.getMessage() for r in caplog.records if "cannot list" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_a_worker_on_the_embedded_broker_runs_jobs_after_garbage(
    tmp_path: Path, services_root: Path, define: Any
) -> None:
    from scheduler.store.db import init_db
    from scheduler.store.models import utcnow
    from scheduler.testing import (
        detect_and_send,
        environment_values,
        record_study,
        wait_session,
        wait_until,
    )
    from tests.support import worker_in_process

    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_db(url)
    values = environment_values(tmp_path, url, broker_url="") | {
        "DCM_SERVICES_PATH": str(services_root),
        "DCM_STABLE_AGE": "0",
        "DCM_HEARTBEAT_INTERVAL": "1",
    }
    define([{"jobName": "a", "workerEntry": "dcm_testjobs:work", "params": {"value": 1}}])
    with worker_in_process(values, concurrency=2) as settings:
        queue_folder = settings.broker_folder / "queue"
        dropped = {
            drop(queue_folder, label, content, queue=queue)
            for queue in ("dcm.planning", "default")
            for label, content in GARBAGE.items()
        }
        bad_folder = settings.broker_folder / "bad"
        wait_until(
            lambda: bad_folder.is_dir() and {p.name for p in bad_folder.iterdir()} == dropped,
            what="the worker to set the garbage aside",
        )
        record_study("77.1", now=utcnow() - timedelta(seconds=1))
        (session,) = detect_and_send()
        doc = wait_session(session)
    assert doc["status"] == "succeeded"
    assert [(j["job_name"], j["status"]) for j in doc["jobs"]] == [("a", "succeeded")]
