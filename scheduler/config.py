"""Settings of the scheduler, read once from the environment (README, "Configuration").

Every setting has a stable environment variable name and a default that gives
a working single-machine setup with no server: an SQLite store and the kombu
filesystem broker, both under ``DCM_HOME``. Production only switches URLs.
A ``.env`` file in the current folder is read first; real environment
variables win over it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import tzinfo
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from scheduler.redact import mask
from scheduler.vocabulary import Level


class ConfigError(ValueError):
    """A setting has a value the scheduler cannot use."""


def _split(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def parse_duration(value: object, *, what: str = "duration") -> float:
    """Seconds from ``"90s"``, ``"30m"``, ``"1h"``, ``"2d"`` or a number."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration like '90s', '30m', '1h' or seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{what}: must not be negative")
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value, re.ASCII)
        if match:
            number, unit = match.groups()
            return float(number) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    raise ConfigError(
        f"{what}: expected a duration like '90s', '30m', '1h' or seconds, got {value!r}"
    )


# A duration (a setting, a job's timeout or retry delay) longer than this is
# a typo, and past what a socket's timeout, the store's times and Celery's
# countdowns can hold.
LONGEST_DURATION = 366 * 86400.0
# An age longer than this is a typo (and past what dates can hold).
LONGEST_AGE = 100 * 365 * 86400.0
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(value: str, *, what: str = "AGE") -> float:
    """Seconds from an age such as ``"90d"``, ``"12h"``, ``"30m"`` or ``"2w"``:
    how old an ended session must be to be pruned. The unit is required:
    what is deleted must not hang on whether ``90`` meant seconds or days."""
    match = re.fullmatch(r"\s*(\d{1,9}(?:\.\d{1,6})?)\s*([smhdw])\s*", value, re.ASCII)
    if not match:
        raise ConfigError(
            f"{what}: expected an age with its unit like '90d', '12h', '30m' or '2w', got {value!r}"
        )
    age = float(match.group(1)) * AGE_UNITS[match.group(2)]
    if age > LONGEST_AGE:
        raise ConfigError(f"{what}: {value!r} is longer than 100 years")
    return age


@dataclass(frozen=True)
class Settings:
    """Typed view of the environment; build with :func:`get_settings`."""

    home: Path
    database_url: str
    broker_url: str
    result_backend: str | None
    services_path: tuple[Path, ...]
    settings_file: Path | None
    stable_age: float
    detect_interval: float
    detect_levels: tuple[str, ...]
    default_events: tuple[str, ...]
    header_fields: tuple[str, ...] | None
    orthanc_url: str | None
    api_token: str | None
    callback_timeout: float
    output_dir: Path
    resend_after: float
    heartbeat_interval: float
    visibility_timeout: float
    data_root: Path | None
    # Age after which ended sessions are pruned on beat (README, "Retention").
    retention: float | None
    # Notifications (README, "Notifications").
    webhook_urls: tuple[str, ...]
    webhook_secret: str | None
    webhook_events: frozenset[str]
    webhook_services: frozenset[str]
    dashboard_url: str
    # The clock of off-peak windows (README, "Off-peak windows"); None: the
    # machine's local zone.
    timezone: tzinfo | None = None

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem:")


def store_url(url: str) -> str:
    """``DCM_DATABASE_URL`` checked: SQLite or PostgreSQL, the latter through
    psycopg 3 (the driver installed) when the URL names none."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ConfigError(
            f"DCM_DATABASE_URL: {url!r} is not a URL; use sqlite:///path/store.db "
            "or postgresql+psycopg://user@host/database"
        )
    dialect = scheme.split("+", 1)[0].lower()
    if dialect in ("postgresql", "postgres") and "+" not in scheme:
        return f"postgresql+psycopg://{rest}"
    if dialect not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"DCM_DATABASE_URL: the store runs on SQLite or PostgreSQL, not {scheme!r}"
        )
    return url


# Session events a webhook may be sent for: one per final status of a
# session, and session.finished for all of them (README, "Notifications").
WEBHOOK_EVENTS = (
    "session.succeeded",
    "session.failed",
    "session.partial",
    "session.cancelled",
    "session.empty",
)
ANY_FINISH = "session.finished"
DEFAULT_WEBHOOK_EVENTS = "session.failed,session.partial"
# Where `dcm-scheduler serve` listens by default.
DASHBOARD_URL = "http://127.0.0.1:8765"


def _http_url(name: str, url: str) -> str:
    shown = mask(url)  # a receiver's URL may carry a password
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{name}: {shown!r} is not an http:// or https:// URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{name}: {shown!r} is not a valid URL ({exc})") from None
    if not parts.hostname or any(c.isspace() for c in url):
        raise ConfigError(f"{name}: {shown!r} has no host name, or has spaces")
    return url


def _webhook_events(value: str | None) -> frozenset[str]:
    events = frozenset(_split(value or DEFAULT_WEBHOOK_EVENTS))
    if not events:
        raise ConfigError(
            "DCM_WEBHOOK_EVENTS: no event given; use a comma list of "
            + ", ".join((*WEBHOOK_EVENTS, ANY_FINISH))
        )
    unknown = sorted(events - {*WEBHOOK_EVENTS, ANY_FINISH})
    if unknown:
        raise ConfigError(
            f"DCM_WEBHOOK_EVENTS: unknown event {unknown[0]!r}; use a comma list of "
            + ", ".join((*WEBHOOK_EVENTS, ANY_FINISH))
        )
    return frozenset(WEBHOOK_EVENTS) if ANY_FINISH in events else events


def _retention(value: str | None) -> float | None:
    if value is None:
        return None
    age = parse_age(value, what="DCM_RETENTION")
    if age < 3600:
        # Beat prunes rows and outputs on its own: shorter is a typo, and zero
        # would delete each session and its outputs as soon as it ends.
        raise ConfigError(
            f"DCM_RETENTION: {value!r} is shorter than an hour; use an age like '90d'"
        )
    return age


def _timezone(value: str | None) -> tzinfo | None:
    if value is None:
        return None
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"DCM_TIMEZONE: unknown time zone {value!r}; use an IANA name like 'Europe/Berlin'"
        ) from None


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build settings from ``environ`` (default: the process environment)."""
    env = dict(os.environ if environ is None else environ)

    def get(name: str) -> str | None:
        value = env.get(name)
        return value if value not in (None, "") else None

    home = Path(get("DCM_HOME") or "./.dcm-scheduler").expanduser().absolute()
    if home.exists() and not home.is_dir():
        raise ConfigError(f"DCM_HOME: {home} is not a folder")
    database_url = store_url(get("DCM_DATABASE_URL") or f"sqlite:///{home / 'store.db'}")
    levels = _split(get("DCM_DETECT_LEVELS") or "study")
    for level in levels:
        if level not in set(Level):
            raise ConfigError(
                f"DCM_DETECT_LEVELS: unknown level {level!r}; use a comma list of "
                + ", ".join(Level)
            )
    header_fields = get("DCM_HEADER_FIELDS")
    services_path = tuple(
        Path(p).expanduser().absolute()
        for p in (get("DCM_SERVICES_PATH") or "./services").split(os.pathsep)
        if p
    )
    settings_file = get("DCM_SETTINGS")

    def seconds(name: str, default: float, least: float = 0.0) -> float:
        raw = get(name)
        if raw is None:
            return default
        value = parse_duration(raw, what=name)
        if value < least:
            # An interval of 0 turns a loop that waits into one that spins.
            raise ConfigError(f"{name}: {raw!r} is too short; use at least {least:g}s")
        if value > LONGEST_DURATION:
            raise ConfigError(f"{name}: {raw!r} is too long; use at most 366 days ('366d')")
        return value

    return Settings(
        home=home,
        database_url=database_url,
        broker_url=get("CELERY_BROKER_URL") or "filesystem://",
        result_backend=get("CELERY_RESULT_BACKEND"),
        services_path=services_path,
        settings_file=Path(settings_file).expanduser().absolute() if settings_file else None,
        stable_age=seconds("DCM_STABLE_AGE", 60.0),
        detect_interval=seconds("DCM_DETECT_INTERVAL", 5.0, least=0.1),
        detect_levels=levels,
        default_events=_split(get("DCM_DEFAULT_EVENTS") or "study.stable"),
        header_fields=None if header_fields in (None, "all", "*") else _split(header_fields),
        orthanc_url=get("DCM_ORTHANC_URL"),
        api_token=get("DCM_API_TOKEN"),
        callback_timeout=seconds("DCM_CALLBACK_TIMEOUT", 30.0, least=0.1),
        output_dir=Path(get("DCM_OUTPUT_DIR") or home / "outputs").expanduser().absolute(),
        resend_after=seconds("DCM_RESEND_AFTER", 300.0, least=1),
        heartbeat_interval=seconds("DCM_HEARTBEAT_INTERVAL", 10.0, least=0.1),
        visibility_timeout=seconds("DCM_VISIBILITY_TIMEOUT", 43200.0, least=1),
        data_root=Path(get("DCM_DATA_ROOT") or "").expanduser().absolute()
        if get("DCM_DATA_ROOT")
        else None,
        retention=_retention(get("DCM_RETENTION")),
        webhook_urls=tuple(
            _http_url("DCM_WEBHOOK_URLS", url) for url in _split(get("DCM_WEBHOOK_URLS"))
        ),
        webhook_secret=get("DCM_WEBHOOK_SECRET"),
        webhook_events=_webhook_events(get("DCM_WEBHOOK_EVENTS")),
        webhook_services=frozenset(_split(get("DCM_WEBHOOK_SERVICES"))),
        dashboard_url=_http_url(
            "DCM_DASHBOARD_URL", get("DCM_DASHBOARD_URL") or DASHBOARD_URL
        ).rstrip("/"),
        timezone=_timezone(get("DCM_TIMEZONE")),
    )


def _read_dotenv() -> None:
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - python-dotenv is a dependency
        return
    path = Path.cwd() / ".env"
    if path.exists() and not path.is_file():  # a pipe would wait for a writer forever
        raise ConfigError(f"{path}: not a regular file, cannot be read as settings")
    try:
        load_dotenv(path, override=False)
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: cannot be read as settings ({exc})") from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    _read_dotenv()
    return load_settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and the demo change the environment)."""
    get_settings.cache_clear()
