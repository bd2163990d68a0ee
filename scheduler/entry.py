"""The ``dcm-scheduler`` console script.

Scripts and dashboards poll the JSON listings (``sessions``, ``jobs``,
``show``, ``workers`` with ``--json``); those are answered here, with the
standard library, the store's driver and :mod:`scheduler.queries`, before
the command-line framework, SQLAlchemy or Celery are even imported: a poll
costs a fraction of a full start (``bench/cli_startup.py``). Anything else,
and anything this parser does not understand exactly (``--help``, a wrong
option or status), goes to the full command line (:mod:`scheduler.cli`),
which also gives the errors their usual form.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from scheduler.vocabulary import LARGEST_LIMIT, JobStatus, SessionStatus


def print_json(data: Any) -> None:
    from scheduler.queries import json_text

    sys.stdout.write(json_text(data))


class _Parser(argparse.ArgumentParser):
    """Never prints nor exits: what it does not understand is the full CLI's."""

    def error(self, message: str) -> Any:
        raise argparse.ArgumentError(None, message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(add_help=False, exit_on_error=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sessions = commands.add_parser("sessions", add_help=False, exit_on_error=False)
    sessions.add_argument("--status", choices=list(SessionStatus))
    sessions.add_argument("--uid")
    sessions.add_argument("--limit", type=int, default=100)
    jobs = commands.add_parser("jobs", add_help=False, exit_on_error=False)
    jobs.add_argument("--session")
    jobs.add_argument("--status", choices=list(JobStatus))
    jobs.add_argument("--service")
    jobs.add_argument("--version")
    jobs.add_argument("--limit", type=int, default=500)
    show = commands.add_parser("show", add_help=False, exit_on_error=False)
    show.add_argument("session_id")
    commands.add_parser("workers", add_help=False, exit_on_error=False)
    for sub in (sessions, jobs, show, commands.choices["workers"]):
        sub.add_argument("--json", dest="as_json", action="store_true", required=True)
    return parser


def _parsed(argv: list[str]) -> argparse.Namespace | None:
    """The listing asked for, or None to leave the arguments to the full CLI."""
    if not argv or argv[0] not in ("sessions", "jobs", "show", "workers") or "--json" not in argv:
        return None
    try:
        args, unknown = _parser().parse_known_args(argv)
    except argparse.ArgumentError:
        return None
    # What the full CLI refuses with a message, it refuses.
    refused = getattr(args, "version", None) is not None and not args.service
    if unknown or refused or not 1 <= getattr(args, "limit", 1) <= LARGEST_LIMIT:
        return None
    return args


def answer(args: argparse.Namespace) -> int:
    """Print the listing; the exit status."""
    from scheduler import queries
    from scheduler.config import get_settings
    from scheduler.store.reader import StoreNotReadyError, connect

    settings = get_settings()
    try:
        with connect(settings.database_url) as reader:
            if args.command == "sessions":
                found: Any = queries.list_sessions(
                    reader, status=args.status, uid=args.uid, limit=args.limit
                )
            elif args.command == "jobs":
                session_id = (
                    queries.resolve_session_id(reader, args.session) if args.session else None
                )
                found = queries.list_jobs(
                    reader,
                    session_id=session_id,
                    status=args.status,
                    service=args.service,
                    version=args.version,
                    limit=args.limit,
                )
            elif args.command == "show":
                found = queries.show_session(reader, args.session_id)
            else:
                found = queries.list_workers(reader, settings.heartbeat_interval)
    except (StoreNotReadyError, queries.NotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    print_json(found)
    return 0


def main() -> None:
    args = _parsed(sys.argv[1:])
    if args is not None:
        from scheduler.config import ConfigError

        # A setting that cannot work: the full CLI reports it, as exit 2.
        with contextlib.suppress(ConfigError):
            sys.exit(answer(args))
    from scheduler.cli import main as full

    full()


if __name__ == "__main__":
    main()
