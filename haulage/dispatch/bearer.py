"""A gRPC client interceptor that sends a bearer token on every call: how the dispatcher signs in to the
local Cloud Run server, which (unlike Google's API) has no credentials of its own to check.

Imported only where gRPC is (the ``[cloudrun]`` extra).

Example::

    channel = grpc.intercept_channel(grpc.insecure_channel(address), BearerToken(token))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import grpc


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class CallDetails(_Details, grpc.ClientCallDetails):
    """The call's details with our metadata added (grpc.ClientCallDetails has no constructor of its own)."""


class BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer TOKEN`` to every unary call (the only kind run_v2 makes here)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        new = CallDetails(details.method, details.timeout, metadata, details.credentials,
                          getattr(details, "wait_for_ready", None), getattr(details, "compression", None))  # fmt: skip
        return continuation(new, request)
