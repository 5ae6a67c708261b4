"""The HTTP service: start and follow workflows over HTTP, and a live progress page.

>>> from api import create_app          # an ASGI app (FastAPI), settings from HAULAGE_API_*
>>> from api import serve               # uvicorn on 127.0.0.1:8000; or `python -m haulage.api --port 8000`
"""

from __future__ import annotations

from haulage.api.app import create_app
from haulage.api.auth import Authenticator, DevTokenAuthenticator, FirebaseAuthenticator, RefuseAll, User
from haulage.api.authz import Authorizer, default_authorizer
from haulage.api.server import main, serve
from haulage.api.settings import ApiSettings

__all__ = [
    # running
    "create_app",
    "serve",
    "main",
    "ApiSettings",
    # who may do what
    "User",
    "Authenticator",
    "FirebaseAuthenticator",
    "DevTokenAuthenticator",
    "RefuseAll",
    "Authorizer",
    "default_authorizer",
]
