"""The live progress page: static HTML, CSS and JS (no build step), served by the service.

The page is public; everything it shows comes from /v1 calls made with the
token the user pasted (kept in localStorage). A strict Content-Security-Policy
keeps injected script out, since a script on this origin could read the token.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).parent / "static"

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


#: answers that are not the page (JSON, event streams): nothing may run or embed them
API_CSP = "default-src 'none'; frame-ancestors 'none'"
#: the interactive docs load Swagger UI / ReDoc from a CDN (dev mode only): they may not be framed
DOCS_CSP = "frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")


class SecurityHeaders:
    """ASGI middleware: every answer carries the page's headers, whichever path served it.

    The page is reachable as ``/`` and as ``/static/index.html``; both (and
    every asset, JSON answer and error) get a CSP with ``frame-ancestors``,
    nosniff and no referrer. A header a route set itself is kept.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        csp = PAGE_HEADERS["Content-Security-Policy"] if path == "/" or path.startswith("/static/") else API_CSP
        if path in DOCS_PATHS:
            csp = DOCS_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", csp)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("X-Frame-Options", "DENY")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/static``."""

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
