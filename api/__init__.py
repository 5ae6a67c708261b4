"""The HTTP service: start and follow workflows over HTTP, and a live progress page.

>>> from api import create_app          # an ASGI app (FastAPI), settings from HAULAGE_API_*
>>> from api import serve               # uvicorn on 127.0.0.1:8000; or `python -m api --port 8000`
"""

from __future__ import annotations

from api.app import create_app
from api.auth import Authenticator, DevTokenAuthenticator, FirebaseAuthenticator, RefuseAll, User
from api.authz import Authorizer, default_authorizer
from api.server import main, serve
from api.settings import ApiSettings

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
