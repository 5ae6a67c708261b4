"""Run the service with uvicorn: ``python -m haulage.api [--host H] [--port P]`` (and ``haulage api``)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from urllib.parse import quote

import uvicorn

from haulage.api.app import create_app
from haulage.api.settings import ApiSettings
from haulage.errors import HaulageError
from haulage.logs import configure

log = logging.getLogger("haulage.api")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: seconds open event streams get to finish when the server stops (they would otherwise hold it up)
GRACEFUL_SHUTDOWN = 5


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, log_level: str = "info",
          settings: ApiSettings | None = None) -> None:  # fmt: skip
    """Build the app from the environment (or ``settings``) and serve it until interrupted."""
    settings = settings or ApiSettings.from_env()
    app = create_app(settings)
    if settings.auth == "dev" and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the development token is accepted on %s, beyond this machine; use firebase auth there", host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN)
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m haulage.api``; returns the exit code (2 for a configuration error)."""
    parser = argparse.ArgumentParser(prog="python -m haulage.api", description="Haulage HTTP service and progress page")
    parser.add_argument("--host", default=os.environ.get("HAULAGE_API_HOST") or DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=int(os.environ.get("HAULAGE_API_PORT") or DEFAULT_PORT))
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    configure(args.log_level.upper())
    try:
        serve(args.host, args.port, log_level=args.log_level)
    except HaulageError as exc:
        print(f"haulage: error: {exc}", file=sys.stderr)
        return 2
    return 0


def dev_environment(token: str | None = None) -> dict[str, str]:
    """The variables that start the service in development mode, with a fresh random token unless given.

    ``haulage dev`` passes them to ``python -m haulage.api`` and prints :func:`page_url` for one-click sign-in.
    """
    return {"HAULAGE_API_AUTH": "dev", "HAULAGE_API_DEV_TOKEN": token or secrets.token_urlsafe(24)}


def page_url(host: str, port: int, token: str | None = None) -> str:
    """The progress page's address; with ``token`` in the fragment, which the browser keeps to itself."""
    return f"http://{host}:{port}/" + (f"#token={quote(token, safe='')}" if token else "")
