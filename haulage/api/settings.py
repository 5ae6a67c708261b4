"""Settings of the HTTP service, read from the environment in one place.

Authentication fails closed: with ``HAULAGE_API_AUTH`` unset the service
starts (so health checks answer and the misconfiguration is visible on
``/readyz``) but refuses every call under ``/v1``. An enabled mode with a
missing or weak secret is a start-up error, never a silent "allow".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from haulage.errors import ConfigError
from haulage.settings import env_str as _str

AUTH_MODES = ("", "dev", "firebase")
#: a static development token shorter than this is refused at start-up (guessable)
MIN_DEV_TOKEN_LENGTH = 16


def _int(name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    raw = _str(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name} must be {bound}, got {raw!r}")
    return value


def _float(name: str, default: float, *, minimum: float) -> float:
    raw = _str(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value >= minimum:  # also refuses NaN
        raise ConfigError(f"{name} must be at least {minimum:g} seconds, got {raw!r}")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = _str(name).lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _list(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in _str(name).split(",") if item.strip())


@dataclass(frozen=True)
class ApiSettings:
    """Resolved settings of the HTTP service; build with :meth:`from_env` or directly in tests."""

    auth: str = ""  #: "" (refuse every call), "dev" (static token) or "firebase" (ID tokens)
    dev_token: str = ""
    dev_user: str = "dev"
    dev_admin: bool = True
    dev_token_expires: float = 0.0  #: Unix time after which the dev token is refused; 0 = never
    firebase_project: str = ""  #: the audience of accepted ID tokens
    firebase_certs_url: str = ""  #: "" = Google's; set only to test against a local issuer
    authorizer: str = ""  #: "module:function" replacing the default per-project role rule
    workflows: tuple[str, ...] = ()  #: the workflows exposed over HTTP; () = every registered one
    max_body_bytes: int = 1_048_576  #: bytes; larger request bodies get 413
    max_batch: int = 100  #: items per batch request
    events_poll: float = 2.0  #: seconds between safety-net re-reads of a streamed run
    events_min_interval: float = 0.25  #: seconds; bursts of changes are coalesced to one event per interval
    events_keepalive: float = 15.0  #: seconds of silence before a keep-alive comment
    events_max_seconds: float = 3600.0  #: seconds before a stream is closed (the client reconnects)
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    docs: bool | None = None  #: /docs, /redoc and a public /openapi.json; None = only in dev mode
    max_streams_per_user: int = 10  #: event streams one user may hold open on one API process; more get 429

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ConfigError(f"HAULAGE_API_AUTH must be one of dev, firebase (or unset), got {self.auth!r}")
        if self.auth == "dev" and len(self.dev_token) < MIN_DEV_TOKEN_LENGTH:
            raise ConfigError(
                f"HAULAGE_API_AUTH=dev needs HAULAGE_API_DEV_TOKEN of at least {MIN_DEV_TOKEN_LENGTH} characters, "
                f"got {len(self.dev_token)}; e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
        if self.auth == "firebase" and not self.firebase_project:
            raise ConfigError("HAULAGE_API_AUTH=firebase needs HAULAGE_API_FIREBASE_PROJECT (the Firebase project id)")
        if self.authorizer and ":" not in self.authorizer:
            raise ConfigError(f"HAULAGE_API_AUTHORIZER must be module:function, got {self.authorizer!r}")

    @property
    def docs_enabled(self) -> bool:
        """Whether the interactive docs are served (they load scripts from a CDN on this origin)."""
        return self.auth == "dev" if self.docs is None else self.docs

    @classmethod
    def from_env(cls) -> ApiSettings:
        """Read and validate the HAULAGE_API_* variables; ConfigError names the one that is wrong."""
        return cls(
            auth=_str("HAULAGE_API_AUTH").lower(),
            dev_token=_str("HAULAGE_API_DEV_TOKEN"),
            dev_user=_str("HAULAGE_API_DEV_USER", "dev"),
            dev_admin=_bool("HAULAGE_API_DEV_ADMIN", True),
            dev_token_expires=_float("HAULAGE_API_DEV_TOKEN_EXPIRES", 0.0, minimum=0.0),
            firebase_project=_str("HAULAGE_API_FIREBASE_PROJECT"),
            firebase_certs_url=_str("HAULAGE_API_FIREBASE_CERTS_URL"),
            authorizer=_str("HAULAGE_API_AUTHORIZER"),
            workflows=_list("HAULAGE_API_WORKFLOWS"),
            max_body_bytes=_int("HAULAGE_API_MAX_BODY_BYTES", 1_048_576, minimum=1024),
            max_batch=_int("HAULAGE_API_MAX_BATCH", 100, minimum=1, maximum=10_000),
            events_poll=_float("HAULAGE_API_EVENTS_POLL", 2.0, minimum=0.05),
            events_min_interval=_float("HAULAGE_API_EVENTS_MIN_INTERVAL", 0.25, minimum=0.0),
            events_keepalive=_float("HAULAGE_API_EVENTS_KEEPALIVE", 15.0, minimum=1.0),
            events_max_seconds=_float("HAULAGE_API_EVENTS_MAX_SECONDS", 3600.0, minimum=1.0),
            cors_origins=_list("HAULAGE_API_CORS_ORIGINS"),
            docs=_bool("HAULAGE_API_DOCS", True) if _str("HAULAGE_API_DOCS") else None,
            max_streams_per_user=_int("HAULAGE_API_MAX_STREAMS_PER_USER", 10, minimum=1),
        )
