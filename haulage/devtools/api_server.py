"""Helpers for testing against the HTTP service without a network: run it as a subprocess, and mint Firebase tokens.

:class:`FirebaseIssuer` stands in for Google's token issuer on 127.0.0.1: it
holds an RSA key, serves its certificate in the format Google publishes, and
signs ID tokens shaped like Firebase's. Point the service at it with
``HAULAGE_API_FIREBASE_CERTS_URL`` and google-auth's real verification runs.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt
from google.auth import jwt as google_jwt

from haulage.devtools.redis_server import free_port

FIREBASE_ISSUER = "https://securetoken.google.com/"


def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _certificate(key: rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haulage-test-issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class FirebaseIssuer:
    """A local Firebase token issuer: ``certs_url`` serves its certificate; ``token(...)`` signs ID tokens.

    >>> with FirebaseIssuer("my-project") as issuer:
    ...     token = issuer.token("uid-1", email="ana@example.com", claims={"roles": {"p1": "editor"}})
    """

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id
        self.kid = uuid.uuid4().hex
        self._key = _private_key()
        self._signer = crypt.RSASigner.from_string(_pem(self._key), key_id=self.kid)
        body = json.dumps({self.kid: _certificate(self._key)}).encode()
        self.fetches = 0  #: how many times the certificates were fetched (the service should cache them)
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                issuer.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "public, max-age=60")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="firebase-issuer", daemon=True)
        self._thread.start()

    @property
    def certs_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/certs"

    def token(self, uid: str, *, email: str | None = None, claims: Mapping[str, Any] | None = None,
              audience: str | None = None, issuer: str | None = None, expires_in: float = 3600,
              provider: str = "password", forged: bool = False) -> str:  # fmt: skip
        """A signed Firebase-shaped ID token. ``forged`` signs with another key under the same key id."""
        now = int(time.time())
        aud = audience or self.project_id
        payload: dict[str, Any] = {
            "iss": issuer or f"{FIREBASE_ISSUER}{aud}",
            "aud": aud,
            "auth_time": now - 60,
            "user_id": uid,
            "sub": uid,
            "iat": now - 60 if expires_in > 0 else now - 7200,
            "exp": now + int(expires_in),
            "firebase": {"identities": {}, "sign_in_provider": provider},
        }
        if email:
            payload.update(email=email, email_verified=True)
        payload.update(claims or {})
        signer = crypt.RSASigner.from_string(_pem(_private_key()), key_id=self.kid) if forged else self._signer
        return google_jwt.encode(signer, payload).decode()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FirebaseIssuer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ApiServer:
    """``python -m haulage.api`` in its own process on a free 127.0.0.1 port, as other processes reach it."""

    def __init__(self, log_path: Path, env: Mapping[str, str] | None = None, *, cwd: Path | None = None) -> None:
        self.log_path = log_path
        self.env = dict(env or {})
        self.cwd = cwd
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> ApiServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "haulage.api", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.cwd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not answer within {timeout}s; see {self.log_path}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
