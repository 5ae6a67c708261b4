"""The Firestore emulator: found, started on loopback and stopped (for `haulage dev`, tests and benchmarks).

It comes with the Google Cloud CLI (``gcloud components install
cloud-firestore-emulator``) and needs Java. ``start_emulator`` runs it in its
own process group with the project's security rules loaded (``haulage/progress/firestore/firestore.rules``,
or the file ``HAULAGE_FIRESTORE_RULES`` names), so that what a web client reads from
the emulator is what it would read in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from haulage.errors import HaulageError

DEFAULT_PROJECT = "haulage-dev"
_RELATIVE = Path("platform/cloud-firestore-emulator/cloud_firestore_emulator")
_KNOWN_ROOTS = (Path("/usr/lib/google-cloud-sdk"), Path("/usr/share/google-cloud-sdk"),
                Path.home() / "google-cloud-sdk")  # fmt: skip
#: seconds the emulator may take to answer (about 1.3 s measured; java can be slow on a busy machine)
START_TIMEOUT = 60.0
#: the rules the package ships (package data: an installed wheel loads them too); HAULAGE_FIRESTORE_RULES: another
SHIPPED_RULES = Path(__file__).resolve().parents[1] / "progress" / "firestore" / "firestore.rules"


class EmulatorMissing(HaulageError):
    """Raised when the Firestore emulator (or the Java it runs on) is not installed."""


def find_emulator() -> Path:
    """The ``cloud_firestore_emulator`` launcher of the installed Google Cloud CLI; EmulatorMissing if none."""
    candidates = []
    on_path = shutil.which("cloud_firestore_emulator")
    if on_path:
        candidates.append(Path(on_path))
    gcloud = shutil.which("gcloud")
    if gcloud:
        # .../google-cloud-sdk/bin/gcloud -> .../google-cloud-sdk
        candidates.append(Path(gcloud).resolve().parent.parent / _RELATIVE)
    candidates.extend(root / _RELATIVE for root in _KNOWN_ROOTS)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            if shutil.which("java") is None:
                raise EmulatorMissing(f"{candidate} is installed but needs Java, and no `java` is on PATH")
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "PATH, and no gcloud on PATH to start from"
    raise EmulatorMissing(
        f"no cloud_firestore_emulator found (looked in {looked}); install the Google Cloud CLI and run "
        "`gcloud components install cloud-firestore-emulator`"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(host: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}/", timeout=1) as reply:
            return int(reply.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def default_rules() -> Path | None:
    """The rules file the emulator loads: HAULAGE_FIRESTORE_RULES, else the package's own."""
    named = os.environ.get("HAULAGE_FIRESTORE_RULES", "").strip()
    if named:
        path = Path(named)
        if not path.is_file():
            raise HaulageError(f"HAULAGE_FIRESTORE_RULES names {named!r}, which is not a file")
        return path
    if not SHIPPED_RULES.is_file():  # an emulator without rules would let any identity read any run
        raise HaulageError(f"the package's Firestore rules are missing ({SHIPPED_RULES}); reinstall haulage "
                           "or set HAULAGE_FIRESTORE_RULES")  # fmt: skip
    return SHIPPED_RULES


def load_rules(host: str, project: str, rules: Path) -> None:
    """Load ``rules`` into a running emulator (its REST endpoint; takes effect for the next request).

    The emulator's ``--rules`` flag is read once at start and silently ignored
    when the file does not parse; this endpoint answers 400 with the compiler's
    message instead, so a broken rules file fails here rather than leaving
    every read open.
    """
    body = json.dumps({"rules": {"files": [{"name": "firestore.rules", "content": rules.read_text()}]}}).encode()
    request = urllib.request.Request(f"http://{host}/emulator/v1/projects/{project}:securityRules", data=body,
                                     method="PUT", headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 - loopback emulator
            reply.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:2000]
        raise HaulageError(f"the Firestore emulator refused the rules in {rules}: HTTP {exc.code}: {detail}") from None


def start_emulator(project: str = DEFAULT_PROJECT, *, log_path: Path | None = None,
                   rules: Path | Literal["default"] | None = "default",
                   port: int | None = None, websocket_port: int | None = None,
                   webchannel_port: int | None = None) -> tuple[str, Callable[[], None]]:  # fmt: skip
    """Start a Firestore emulator on free ports; return its "127.0.0.1:PORT" and a function that stops it.

    ``rules``: the security rules to load once it answers; "default" is
    :func:`default_rules` (the project's), None loads none (every read open to any identity).
    The emulator runs in its own process group: the launcher is a shell script
    whose java child would outlive a kill of the script alone.

    Example::

        host, stop = start_emulator()
        os.environ["FIRESTORE_EMULATOR_HOST"] = host
        ...
        stop()
    """
    launcher = find_emulator()
    port, ws_port = port or _free_port(), websocket_port or _free_port()
    # Unset, the emulator picks the WebChannel port (the JS SDK's transport) itself; haulage dev sets it.
    webchannel = [f"--webchannel_port={webchannel_port}"] if webchannel_port else []
    host = f"127.0.0.1:{port}"
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="haulage-firestore-")) / "emulator.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(launcher), "start", "--host=127.0.0.1", f"--port={port}", f"--websocket_port={ws_port}",
             f"--project_id={project}", *webchannel],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    lock = threading.Lock()

    def stop() -> None:
        with lock:
            if proc.returncode is not None:
                return
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # The group may outlive its leader (java after the launcher script).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(host):
        if proc.poll() is not None:
            stop()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise EmulatorMissing(f"the Firestore emulator exited with code {proc.returncode}; its log:\n{tail}")
        if time.monotonic() > deadline:
            stop()
            raise TimeoutError(f"the Firestore emulator did not answer on {host} within {START_TIMEOUT:g}s "
                               f"(log: {log_path})")  # fmt: skip
        time.sleep(0.1)
    chosen = default_rules() if rules == "default" else rules
    if chosen is not None:
        try:
            load_rules(host, project, chosen)
        except BaseException:
            stop()
            raise
    return host, stop


def reset_emulator(host: str, project: str = DEFAULT_PROJECT) -> None:
    """Delete every document the emulator holds for ``project``."""
    request = urllib.request.Request(
        f"http://{host}/emulator/v1/projects/{project}/databases/(default)/documents", method="DELETE"
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        reply.read()
