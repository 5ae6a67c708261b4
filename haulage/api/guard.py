"""The gate in front of every route: who is calling, then whether the body is acceptable.

It runs before FastAPI parses anything, so an unauthenticated caller learns
nothing about the request's shape, and a body that is too large, not JSON or
malformed never reaches a handler (so nothing is created). Every path under
``/v1/`` needs a user: a new route cannot forget authentication.
"""

from __future__ import annotations

import json
import logging
import re
from itertools import accumulate
from typing import Any

import anyio.to_thread
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from haulage.api.auth import Authenticator, bearer_token
from haulage.api.errors import ApiError, BadRequest, Forbidden, PayloadTooLarge, UnsupportedMediaType, error_response
from haulage.workflows.workflow import RESERVED_CREATORS

log = logging.getLogger("haulage.api")

PROTECTED_PREFIX = "/v1/"
USER_KEY = "haulage_user"  #: where the authenticated User is kept in the request state
#: deepest nesting of arrays and objects a body may have; deeper ones get 400 (parsers recurse per level)
MAX_JSON_DEPTH = 64


class _ClientGone(Exception):
    """The client disconnected while sending its body."""


# Possessive quantifiers: a string with no closing quote must fail in linear time, not backtrack
# exponentially (this runs before authentication, on the event loop).
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and the store refuses them later.
    raise ValueError(f"{name} is not valid JSON")


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text``, counted without parsing (so without recursion).

    Strings are removed first (brackets inside them do not count); the rest is
    summed at C speed, so a 1 MB body costs milliseconds. Run on the raw body
    before ``json.loads``, whose decoder recurses once per level.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class RequestGuard:
    """ASGI middleware: authentication for ``/v1/``, then size, media type and JSON syntax of the body."""

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator, max_body_bytes: int) -> None:
        self.app = app
        self.authenticator = authenticator
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if scope["path"].startswith(PROTECTED_PREFIX):
                await self._authenticate(scope)
            receive = await self._checked_body(scope, receive)
        except ApiError as exc:
            log.info("refused %s %s: %s %s", scope["method"], scope["path"], exc.status, exc)
            await error_response(exc)(scope, receive, send)
            return
        except _ClientGone:
            return
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> None:
        if self.authenticator.mode == "none":
            self.authenticator.authenticate("")  # refuses, saying what to configure, whatever was sent
        token = bearer_token(Headers(scope=scope).get("authorization"))
        # google-auth is synchronous and may fetch certificates: keep it off the event loop.
        user = await anyio.to_thread.run_sync(self.authenticator.authenticate, token)
        if user.id in RESERVED_CREATORS:  # the engine's own identities (scheduled runs are theirs)
            raise Forbidden(f"user id {user.id!r} is reserved for the engine and cannot call the API")
        scope.setdefault("state", {})[USER_KEY] = user

    async def _checked_body(self, scope: Scope, receive: Receive) -> Receive:
        headers = Headers(scope=scope)
        length_header = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        try:
            length = int(length_header) if length_header is not None else None
        except ValueError:
            raise BadRequest(f"Content-Length must be a number of bytes, got {length_header!r}") from None
        if not chunked and not length:
            return receive  # no body: nothing to check (GET, or POST /cancel)
        if length is not None and length > self.max_body_bytes:
            raise PayloadTooLarge(f"request body is {length} bytes; the limit is {self.max_body_bytes}")
        content_type = headers.get("content-type", "")
        if not _is_json(content_type):
            raise UnsupportedMediaType(
                f"request bodies must be JSON (Content-Type: application/json), got {content_type or 'none'!r}"
            )
        body = await self._read(receive)
        if body:
            try:
                text = body.decode()
            except UnicodeDecodeError as exc:
                raise BadRequest(f"malformed JSON body: {exc}") from None
            depth = json_depth(text)
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"request body nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
            try:
                json.loads(text, parse_constant=_reject_constant)
            except ValueError as exc:
                raise BadRequest(f"malformed JSON body: {exc}") from None
        return _replay(body, receive)

    async def _read(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that hands the already-read body to the app, then defers to the server."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
