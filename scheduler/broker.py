"""The embedded broker: kombu's filesystem transport, made safe for several processes.

The stock transport creates a message file in the queue folder and only then
writes it, while a consumer moves files out with a copy that may cross
filesystems and decodes them unguarded: a consumer can read a message that is
still empty or half written, two consumers can both take one file, and one
bad file raises out of the transport and kills the worker. Here a message is
written beside the queue folder and renamed into it whole, a consumer claims
a file by renaming it into a folder of its own (a rename on one filesystem
has exactly one winner), and a file that does not decode to a message is set
aside in ``bad/`` with a warning instead of stopping anything. The folders are
created when a channel opens, not when the settings are read, so importing
the app writes nothing. A message whose consumer is killed between claim and
delivery stays in ``claimed/``; the re-sender sends its job again (README,
"Failure modes").
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

STAGING = "tmp"
CLAIMED = "claimed"
BAD = "bad"


def message_name(queue: str) -> str:
    """A file name in the stock transport's format, which its ``_size`` and
    ``_purge`` (and an older consumer) recognise."""
    return f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"


def beside(folder: str | os.PathLike[str], name: str) -> Path:
    """The folder ``name`` next to ``folder``: on the same filesystem, so a
    rename between the two is atomic, and outside it, so nobody listing the
    queue folder sees what is in it."""
    return Path(folder).absolute().parent / name


class Channel(filesystem.Channel):
    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        options = self.transport_options or {}
        folders = [
            Path(options[key]) for key in ("control_folder", "processed_folder") if options.get(key)
        ]
        folders += [
            Path(self.data_folder_in),
            Path(self.data_folder_out),
            self.staging_folder,
            self.claimed_folder,
            self.bad_folder,
        ]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        self._listing_problem: str | None = None

    @property
    def staging_folder(self) -> Path:
        return beside(self.data_folder_out, STAGING)

    @property
    def claimed_folder(self) -> Path:
        return beside(self.data_folder_in, CLAIMED)

    @property
    def bad_folder(self) -> Path:
        return beside(self.data_folder_in, BAD)

    # kombu's own classes name the second argument differently (``message``
    # in the abstract channel, ``payload`` in the filesystem one).
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put ``payload`` onto ``queue``: written whole, then renamed in."""
        name = message_name(queue)
        data = str_to_bytes(dumps(payload))
        staged = self.staging_folder / name
        try:
            try:
                self._publish(staged, name, data)
            except FileNotFoundError:
                # A folder was removed under a running broker: make it again.
                self.staging_folder.mkdir(parents=True, exist_ok=True)
                Path(self.data_folder_out).mkdir(parents=True, exist_ok=True)
                self._publish(staged, name, data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise ChannelError(f"Cannot add {name!r} to {self.data_folder_out}: {exc}") from exc

    def _publish(self, staged: Path, name: str, data: bytes) -> None:
        with open(staged, "xb") as file:
            file.write(data)
        os.rename(staged, Path(self.data_folder_out) / name)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """The next message of ``queue``, or :class:`queue.Empty`; never anything else."""
        wanted = f"{queue}.msg"
        folder = Path(self.data_folder_in)
        try:
            names = sorted(os.listdir(folder))
        except OSError as error:
            self._listing_failed(folder, error)
            raise Empty() from None
        self._listing_problem = None
        for name in names:
            if name.partition(".")[2] != wanted:
                continue
            claimed = self._claim(folder / name)
            if claimed is None:
                continue
            payload = self._read(claimed, name)
            if payload is not None:
                return payload
        raise Empty()

    def _claim(self, source: Path) -> Path | None:
        """Move ``source`` into the claim folder; None when another consumer
        took it first (or it cannot be taken)."""
        target = self.claimed_folder / f"{source.name}.{uuid.uuid4().hex}"
        try:
            try:
                os.rename(source, target)
            except FileNotFoundError:
                if self.claimed_folder.is_dir():
                    return None  # another consumer won this file
                self.claimed_folder.mkdir(parents=True, exist_ok=True)
                os.rename(source, target)
        except FileNotFoundError:
            return None
        except OSError as error:
            log.warning("broker: cannot claim message %s: %s", source, error)
            return None
        return target

    def _read(self, claimed: Path, name: str) -> Any:
        """The decoded message in ``claimed`` (then removed), or None after
        setting the file aside as bad."""
        try:
            raw = claimed.read_bytes()
        except OSError as error:
            self._set_aside(claimed, name, f"cannot be read: {error}")
            return None
        payload, problem = self._decode(raw)
        if problem is not None:
            self._set_aside(claimed, name, problem)
            return None
        try:
            if self.store_processed:
                shutil.move(claimed, Path(self.processed_folder) / name)
            else:
                claimed.unlink()
        except OSError as error:
            log.warning("broker: delivered message %s but could not clear it: %s", claimed, error)
        return payload

    def _decode(self, raw: bytes) -> tuple[Any, str | None]:
        if not raw.strip():
            return None, "empty file"
        try:
            payload = loads(bytes_to_str(raw))
        except Exception as error:  # undecodable bytes, not JSON, a bad tagged value
            return None, f"not JSON: {error}"
        try:
            # What every consumer does with it next; a payload it refuses
            # would raise there, inside the worker's event loop.
            self.Message(payload, channel=self)
        except Exception as error:  # any shape it refuses, whatever the exception
            return None, f"not a message: {type(error).__name__}: {error}"
        return payload, None

    def _set_aside(self, claimed: Path, name: str, problem: str) -> None:
        target = self.bad_folder / name
        try:
            self.bad_folder.mkdir(parents=True, exist_ok=True)
            os.rename(claimed, target)
        except OSError as error:
            log.error(
                "broker: skipped bad message %s (%s); it stays at %s: %s",
                name,
                problem,
                claimed,
                error,
            )
            return
        log.warning("broker: moved bad message %s to %s: %s", name, target, problem)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """Bind ``queue`` to ``exchange``. The stock transport creates a new
        exchange file empty and then writes it, so a publisher reading it
        meanwhile fails to decode it: a new file is written whole and linked
        in (linking fails if another process made it first)."""
        file = self._exchange_file(exchange)
        if not file.exists():
            binding = [filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")]
            staged = self.staging_folder / f"{uuid.uuid4().hex}.exchange"
            try:
                staged.write_bytes(str_to_bytes(dumps(binding)))
                os.link(staged, file)
                return
            except OSError:
                pass  # made meanwhile, or links not possible here: update it in place
            finally:
                with contextlib.suppress(OSError):
                    staged.unlink()
        super()._queue_bind(exchange, routing_key, pattern, queue)

    def _listing_failed(self, folder: Path, error: OSError) -> None:
        # Polled ten times a second: say it when it starts or changes, not each time.
        problem = f"{type(error).__name__}: {error}"
        if problem != self._listing_problem:
            log.warning("broker: cannot list queue folder %s: %s", folder, problem)
            self._listing_problem = problem
        if isinstance(error, FileNotFoundError):
            with contextlib.suppress(OSError):
                folder.mkdir(parents=True, exist_ok=True)


class Transport(filesystem.Transport):
    Channel = Channel


def url_problem(url: str) -> str | None:
    """Why Celery could not use the broker ``url`` at all (an unknown
    transport, or one whose library is not installed); None when it can
    try. Reaching the broker is another matter (``dcm-scheduler doctor``)."""
    from kombu.transport import resolve_transport

    scheme = url.partition("://")[0].split("+")[0]
    try:
        resolve_transport(scheme)
    except KeyError:
        return f"CELERY_BROKER_URL: no such broker transport {scheme!r} (redis://, amqp://, filesystem://)"
    except ImportError as exc:
        return f"CELERY_BROKER_URL: the {scheme!r} transport needs a library that is missing: {exc}"
    return None
