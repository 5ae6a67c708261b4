"""Who is calling: bearer tokens checked by the configured authenticator, failing closed.

Three modes (``HAULAGE_API_AUTH``):

- unset: :class:`RefuseAll`; every call under ``/v1`` gets 401. An unconfigured
  service must never be an open one.
- ``firebase``: :class:`FirebaseAuthenticator` verifies Firebase ID tokens with
  google-auth (signature against Google's published certificates, audience =
  the project id, issuer, expiry).
- ``dev``: :class:`DevTokenAuthenticator` accepts one static token, for a
  developer's machine and tests.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import google.auth.transport
import google.auth.transport.requests
from google.auth import exceptions as google_exceptions
from google.oauth2 import id_token

from haulage.api.errors import ServiceUnavailable, Unauthenticated
from haulage.api.settings import ApiSettings

log = logging.getLogger("haulage.api")

#: seconds of clock difference tolerated on a token's iat/exp
CLOCK_SKEW = 10
#: a bearer token longer than this is refused before any parsing (Firebase ID tokens are about 1 KB)
MAX_TOKEN_LENGTH = 8192
#: seconds the issuer's certificates are cached when the response names no max-age
DEFAULT_CERTS_TTL = 300.0
MAX_CERTS_TTL = 6 * 3600.0
ADMIN_CLAIM = "admin"  #: a custom claim ``admin: true`` makes a user an admin
ROLES_CLAIM = "roles"  #: a custom claim ``roles: {project_id: role}``

_MAX_AGE = re.compile(r"max-age=(\d+)")


@dataclass(frozen=True)
class User:
    """An authenticated caller. ``id`` is what runs record as ``created_by`` (the Firebase uid)."""

    id: str
    email: str | None = None
    admin: bool = False
    roles: Mapping[str, str] = field(default_factory=dict)  #: project id -> role ("owner", "editor", "viewer")
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def expires_at(self) -> float | None:
        """Unix time the credentials expire (a token's ``exp``); None for ones that do not (the dev token)."""
        exp = self.claims.get("exp")
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> User:
        roles = claims.get(ROLES_CLAIM)
        return cls(
            id=str(claims["sub"]),
            email=claims.get("email") if isinstance(claims.get("email"), str) else None,
            admin=claims.get(ADMIN_CLAIM) is True,  # only a real boolean true: "false" is truthy
            roles={str(k): str(v) for k, v in roles.items()} if isinstance(roles, dict) else {},
            claims=dict(claims),
        )


class Authenticator(Protocol):
    mode: str

    def authenticate(self, token: str) -> User:
        """The user ``token`` belongs to; raises Unauthenticated, or ServiceUnavailable when it cannot tell."""


class RefuseAll:
    """No authentication configured: every call is refused."""

    mode = "none"

    def authenticate(self, token: str) -> User:
        raise Unauthenticated(
            "authentication is not configured on this service, so every call is refused; "
            "set HAULAGE_API_AUTH=firebase (with HAULAGE_API_FIREBASE_PROJECT) or, on a development machine, "
            "HAULAGE_API_AUTH=dev with HAULAGE_API_DEV_TOKEN"
        )


class DevTokenAuthenticator:
    """One static token, one user: for development and tests only."""

    mode = "dev"

    def __init__(self, token: str, user: str = "dev", admin: bool = True, expires: float = 0.0) -> None:
        self._token = token.encode()
        self._expires = expires  #: Unix time the token stops working (HAULAGE_API_DEV_TOKEN_EXPIRES); 0 never
        claims: dict[str, Any] = {"sub": user, "dev": True, **({"exp": expires} if expires else {})}
        self._user = User(id=user, email=None, admin=admin, claims=claims)

    def authenticate(self, token: str) -> User:
        # Constant-time comparison: the token is the only secret in this mode.
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthenticated("invalid token")
        if self._expires and time.time() >= self._expires:
            raise Unauthenticated("the development token has expired; `haulage dev` prints a new one when restarted")
        return self._user


class CertsRequest(google.auth.transport.Request):
    """The HTTP transport google-auth fetches the issuer's certificates with.

    google-auth fetches them on every verification; this caches a good answer
    for its ``Cache-Control: max-age``. ``certs_url`` replaces the URL google-auth
    asks for: only tests and emulators set it (a local issuer's certificates).
    """

    def __init__(self, certs_url: str = "", timeout: float = 10.0) -> None:
        self._certs_url = certs_url
        self._timeout = timeout
        self._inner = google.auth.transport.requests.Request()
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, google.auth.transport.Response]] = {}

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> google.auth.transport.Response:
        target = self._certs_url or url
        with self._lock:
            hit = self._cache.get(target)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
        response = self._inner(target, method=method, body=body, headers=headers,
                               timeout=timeout or self._timeout, **kwargs)  # fmt: skip
        if response.status == 200:
            match = _MAX_AGE.search(str(response.headers.get("cache-control", "")))
            ttl = min(float(match.group(1)), MAX_CERTS_TTL) if match else DEFAULT_CERTS_TTL
            with self._lock:
                self._cache[target] = (time.monotonic() + ttl, response)
        return response


class FirebaseAuthenticator:
    """Firebase ID tokens, verified by google-auth's ``verify_firebase_token``."""

    mode = "firebase"

    def __init__(self, project_id: str, *, certs_url: str = "", request: google.auth.transport.Request | None = None,
                 allow_anonymous: bool = False) -> None:  # fmt: skip
        if not project_id:
            raise ValueError("FirebaseAuthenticator needs the Firebase project id")
        self.project_id = project_id
        self._request = request or CertsRequest(certs_url)
        self._allow_anonymous = allow_anonymous

    def authenticate(self, token: str) -> User:
        try:
            claims = id_token.verify_firebase_token(
                token, self._request, audience=self.project_id, clock_skew_in_seconds=CLOCK_SKEW
            )
        except google_exceptions.TransportError as exc:
            log.warning("cannot fetch the Firebase certificates: %s", exc)
            raise ServiceUnavailable("cannot verify the token now: the issuer's certificates are unreachable") from exc
        except (ValueError, TypeError, KeyError, AttributeError, google_exceptions.GoogleAuthError) as exc:
            # google-auth's messages name the expected audience and issuer: they go to the log, and
            # the caller learns only which check failed. A well-signed token with claims of the wrong
            # type (exp as a string) makes google-auth raise TypeError: still the caller's token.
            log.info("refused an ID token: %s: %s", type(exc).__name__, exc)
            raise Unauthenticated(f"invalid ID token ({_reason(str(exc))})") from None
        problem = _claims_problem(claims)
        if problem:
            log.info("refused an ID token: %s", problem)
            raise Unauthenticated(f"invalid ID token ({problem})")
        provider = claims.get("firebase", {}).get("sign_in_provider")
        if provider == "anonymous" and not self._allow_anonymous:
            raise Unauthenticated("anonymous Firebase sign-ins are not accepted")
        return User.from_claims(claims)


#: google-auth message fragments -> the check a caller is told failed
_REASONS = (("expired", "expired"), ("too late", "expired"), ("too early", "not yet valid"),
            ("audience", "wrong audience"), ("issuer", "wrong issuer"), ("signature", "bad signature"),
            ("certificate", "bad signature"))  # fmt: skip


def _reason(message: str) -> str:
    lowered = message.lower()
    return next((reason for fragment, reason in _REASONS if fragment in lowered), "malformed")


def _claims_problem(claims: Any) -> str | None:
    """Why a verified token's claims are unusable (types google-auth does not check), or None."""
    if not isinstance(claims, dict):
        return "malformed claims"
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        return "malformed sub claim"
    for name in ("iat", "exp"):
        value = claims.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"malformed {name} claim"
    if not isinstance(claims.get("firebase", {}), dict):
        return "malformed firebase claim"
    return None


def build_authenticator(settings: ApiSettings) -> Authenticator:
    """The authenticator the settings ask for (RefuseAll when none is configured)."""
    if settings.auth == "firebase":
        return FirebaseAuthenticator(settings.firebase_project, certs_url=settings.firebase_certs_url)
    if settings.auth == "dev":
        return DevTokenAuthenticator(settings.dev_token, settings.dev_user, settings.dev_admin,
                                     settings.dev_token_expires)  # fmt: skip
    return RefuseAll()


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer ...`` header; Unauthenticated when absent or malformed."""
    if not header:
        raise Unauthenticated("missing Authorization header; send 'Authorization: Bearer <token>'")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthenticated(f"the bearer token is longer than {MAX_TOKEN_LENGTH} characters")
    return token
