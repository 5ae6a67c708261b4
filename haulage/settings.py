"""Haulage settings, read from the environment in one place.

Every variable is documented in the README's configuration table. Values are
validated when first read, so a typo fails at start-up with the variable's name
rather than deep inside a worker.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from haulage.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_SENTINEL_MASTER = "mymaster"  #: the name Redis's own Sentinel examples give the group

# A Cloud Run job: its full resource name, or a bare job id completed by project and region.
_JOB_NAME_RE = re.compile(r"^projects/[^/]+/locations/[^/]+/jobs/[^/]+$")
_JOB_ID_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def env_str(name: str, default: str = "") -> str:
    """The variable's value, stripped, or ``default`` when unset or blank."""
    return os.environ.get(name, "").strip() or default


_str = env_str


def _number(name: str, default: float, *, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class SentinelAddress:
    """Where a ``sentinel://`` URL points: the sentinels, and the database and credentials of the master."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def parse_sentinel_url(url: str, name: str = "HAULAGE_REDIS_URL") -> SentinelAddress:
    """``sentinel://[[user]:password@]host:port[/db];sentinel://host:port[/db];...`` (kombu's and Celery's form).

    Every part names one sentinel; the database (default 0) and the credentials (the master's,
    not the sentinels') may be given on any part, the same wherever they appear.
    """
    sentinels, dbs, users, passwords = [], set(), set(), set()
    for part in url.split(";"):
        split = urlsplit(part.strip())
        try:
            port = split.port or 26379
        except ValueError:
            raise ConfigError(f"{name} has a sentinel with a bad port: {_shown(part)!r}") from None
        if split.scheme != "sentinel" or not split.hostname:
            raise ConfigError(f"{name} must be sentinel://host:port[/db] parts joined by ';', got {_shown(part)!r}")
        sentinels.append((split.hostname, port))
        db = split.path.strip("/")
        if db:
            if not db.isdigit():
                raise ConfigError(f"{name} must name a database number after the sentinel, got {db!r}")
            dbs.add(int(db))
        if split.username:
            users.add(unquote(split.username))
        if split.password:
            passwords.add(unquote(split.password))
    if len(dbs) > 1 or len(users) > 1 or len(passwords) > 1:
        raise ConfigError(f"{name} gives different databases or credentials on its sentinels: {_shown(url)!r}")
    return SentinelAddress(tuple(sentinels), dbs.pop() if dbs else 0, users.pop() if users else None,
                           passwords.pop() if passwords else None)  # fmt: skip


def _shown(url: str) -> str:
    # Never print a password that may be in the URL.
    return ";".join(f"{p.partition('://')[0]}://{p.rpartition('@')[2]}" if "@" in p else p for p in url.split(";"))


@dataclass(frozen=True)
class Settings:
    """Resolved settings; build with :func:`get_settings`."""

    redis_url: str  #: ``redis://``, ``rediss://``, ``unix://`` or ``sentinel://`` (a Sentinel group)
    redis_sentinel_master: str  #: the Sentinel group's master name, for every ``sentinel://`` URL
    broker_url: str
    result_backend: str
    modules: tuple[str, ...]
    celery_config: str  #: a deployment's Celery settings module (HAULAGE_CELERYCONFIG), "" for none
    store: str
    key_prefix: str
    visibility_timeout: float  #: seconds a reserved message may stay unacked before redelivery
    max_countdown: float  #: seconds; the longest retry backoff, kept under the visibility timeout
    history_limit: int  #: events kept per run document (newest win)
    default_hard_timeout: float  #: seconds; a step's hard limit when it sets none
    lock_margin: float  #: seconds the step lock outlives the hard timeout
    dispatch_mode: str
    dev_dir: Path
    lock_liveness: float  #: seconds a dead lock holder blocks its step before a redelivery takes over
    stale_after: float  #: seconds without a heartbeat before the reaper resumes a run
    max_recoveries: int  #: resumes the reaper tries before it fails a stale run
    crash_retries: int  #: times a step may be re-run after its worker died before it fails
    reaper_interval: float  #: seconds between reaper passes (beat)
    retention_days: float  #: finished runs older than this are deleted
    retention_interval: float  #: seconds between retention passes (beat)
    cloudrun_job: str  #: HAULAGE_CLOUDRUN_JOB as given: a full job name or a bare job id ("" unset)
    cloudrun_project: str  #: completes a bare job id ("" unset)
    cloudrun_region: str  #: completes a bare job id ("" unset)
    cloudrun_endpoint: str  #: host:port of a local Cloud Run server (insecure); "" = Google, default credentials
    cloudrun_poll_interval: float  #: seconds between looks at a running execution
    cloudrun_call_timeout: float  #: seconds; the deadline of every Cloud Run API call
    cloudrun_deadline_margin: float  #: seconds past the step's timeout before Haulage cancels an execution
    redis_check: str  #: "refuse" (default), "warn" or "off": a worker's start-up look at Redis's eviction policy
    handoff_key_file: Path  #: the dispatcher's hand-off signing key (a mounted secret); the job reads its own config
    cloudrun_token: str  #: bearer token for the local Cloud Run server (HAULAGE_CLOUDRUN_ENDPOINT); "" none
    max_params_bytes: int = 262_144  #: bytes of JSON a run's parameters may take, unless its workflow sets its own


def load_settings() -> Settings:
    """Read and validate the environment (uncached)."""
    redis_url = _str("HAULAGE_REDIS_URL", DEFAULT_REDIS_URL)
    visibility = _number("HAULAGE_VISIBILITY_TIMEOUT", 3600, minimum=10)
    max_countdown = _number("HAULAGE_MAX_COUNTDOWN", min(600.0, visibility / 2), minimum=0)
    # A countdown is held unacked by the worker; if it outlived the visibility
    # timeout the broker would hand the message to a second worker.
    if max_countdown >= visibility:
        raise ConfigError(
            f"HAULAGE_MAX_COUNTDOWN must be below HAULAGE_VISIBILITY_TIMEOUT ({visibility:g}), "
            f"got {max_countdown:g}"
        )
    modules = tuple(m.strip() for m in os.environ.get("HAULAGE_MODULES", "").split(",") if m.strip())
    broker_url = _str("HAULAGE_BROKER_URL", redis_url)
    result_backend = _str("HAULAGE_RESULT_BACKEND", redis_url)
    for name, url in (("HAULAGE_REDIS_URL", redis_url), ("HAULAGE_BROKER_URL", broker_url),
                      ("HAULAGE_RESULT_BACKEND", result_backend)):  # fmt: skip
        if is_sentinel(url):
            parse_sentinel_url(url, name)  # a malformed group fails here, at start-up
    return Settings(
        redis_url=redis_url,
        redis_sentinel_master=_str("HAULAGE_REDIS_SENTINEL_MASTER", DEFAULT_SENTINEL_MASTER),
        broker_url=broker_url,
        result_backend=result_backend,
        modules=modules,
        celery_config=_str("HAULAGE_CELERYCONFIG", ""),
        store=_choice("HAULAGE_STORE", "redis", ("redis", "firestore")),
        key_prefix=_str("HAULAGE_KEY_PREFIX", "haulage"),
        visibility_timeout=visibility,
        max_countdown=max_countdown,
        history_limit=int(_number("HAULAGE_HISTORY_LIMIT", 100, minimum=1)),
        default_hard_timeout=_number("HAULAGE_DEFAULT_HARD_TIMEOUT", 1800, minimum=1),
        lock_margin=_number("HAULAGE_LOCK_MARGIN", 60, minimum=1),
        dispatch_mode=_choice("HAULAGE_DISPATCH_MODE", "local", ("local", "cloudrun")),
        dev_dir=Path(_str("HAULAGE_DEV_DIR", ".haulage")),
        lock_liveness=_number("HAULAGE_LOCK_LIVENESS", 15, minimum=1),
        stale_after=_number("HAULAGE_STALE_AFTER", 600, minimum=1),
        max_recoveries=int(_number("HAULAGE_MAX_RECOVERIES", 3, minimum=0)),
        crash_retries=int(_number("HAULAGE_CRASH_RETRIES", 3, minimum=0)),
        reaper_interval=_number("HAULAGE_REAPER_INTERVAL", 60, minimum=0.5),
        retention_days=_number("HAULAGE_RETENTION_DAYS", 30, minimum=0.001),
        retention_interval=_number("HAULAGE_RETENTION_INTERVAL", 3600, minimum=1),
        cloudrun_job=_cloudrun_job(),
        cloudrun_project=_str("HAULAGE_CLOUDRUN_PROJECT", "") or _str("GOOGLE_CLOUD_PROJECT", ""),
        cloudrun_region=_str("HAULAGE_CLOUDRUN_REGION", ""),
        cloudrun_endpoint=_str("HAULAGE_CLOUDRUN_ENDPOINT", ""),
        cloudrun_poll_interval=_number("HAULAGE_CLOUDRUN_POLL_INTERVAL", 5.0, minimum=0.05),
        cloudrun_call_timeout=_number("HAULAGE_CLOUDRUN_CALL_TIMEOUT", 30.0, minimum=0.1),
        cloudrun_deadline_margin=_number("HAULAGE_CLOUDRUN_DEADLINE_MARGIN", 300.0, minimum=0),
        redis_check=_choice("HAULAGE_REDIS_CHECK", "refuse", ("refuse", "warn", "off")),
        handoff_key_file=Path(_str("HAULAGE_HANDOFF_KEY_FILE", "/secrets/haulage/handoff-key")),
        cloudrun_token=_str("HAULAGE_CLOUDRUN_TOKEN", ""),
        max_params_bytes=int(_number("HAULAGE_MAX_PARAMS_BYTES", 262_144, minimum=1)),
    )


def _cloudrun_job() -> str:
    # A malformed name fails here, at start-up; a missing one only turns Cloud Run off (fallback).
    value = _str("HAULAGE_CLOUDRUN_JOB", "")
    if value and "/" in value and not _JOB_NAME_RE.match(value):
        raise ConfigError(
            f"HAULAGE_CLOUDRUN_JOB must be projects/PROJECT/locations/REGION/jobs/JOB or a bare job id, got {value!r}"
        )
    if value and "/" not in value and not _JOB_ID_RE.match(value):
        raise ConfigError(
            "HAULAGE_CLOUDRUN_JOB must be a Cloud Run job id (lowercase letters, digits and hyphens, "
            f"starting with a letter, at most 63 characters), got {value!r}"
        )
    return value


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()


def reset_settings() -> None:
    """Forget cached settings (tests and the CLI change the environment)."""
    get_settings.cache_clear()
