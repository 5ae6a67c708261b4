"""The development stack: a Redis server and workers per queue, supervised.

`haulage dev` runs it in the foreground; `haulage demo` runs it around one
example run. Children run in their own process groups so that stopping the
stack stops everything it started, and a child that dies unexpectedly is
restarted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from haulage.devtools.firestore_emulator import DEFAULT_PROJECT, EmulatorMissing, start_emulator
from haulage.devtools.redis_server import find_redis_server, free_port, wait_for_port
from haulage.errors import ConfigError
from haulage.settings import reset_settings

log = logging.getLogger("haulage.dev")

#: a child restarted more often than this within a minute is given up on
MAX_RESTARTS_PER_MINUTE = 5
#: seconds a child gets to stop after SIGTERM before SIGKILL (a warm shutdown lets steps finish)
STOP_GRACE = 20.0


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    where: str = ""
    ready: Callable[[], None] | None = None
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        if self.ready is not None:
            self.ready()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)


def _port_or_free(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


class Stack:
    """Start, supervise and stop the processes of the dev stack."""

    def __init__(self, dev_dir: Path, *, modules: str, queues: tuple[str, ...] = ("short", "long", "dispatch"),
                 out: Callable[[str], None] = print, store: str = "auto",
                 dispatch: str = "cloudrun") -> None:  # fmt: skip
        self.dev_dir = dev_dir
        self.modules = modules
        self.queues = queues
        self.out = out
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.redis_url = os.environ.get("HAULAGE_REDIS_URL", "")
        self.flower_url = ""
        self.page_url = ""
        self.store = store
        self.dispatch = dispatch
        self._stop_emulator: Callable[[], None] | None = None

    def env(self) -> dict[str, str]:
        # Children import the user's modules from the current directory, as the CLI does.
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "HAULAGE_REDIS_URL": self.redis_url, "HAULAGE_MODULES": self.modules,
                "PYTHONPATH": path}  # fmt: skip

    def start(self) -> None:
        logs = self.dev_dir / "logs"
        if not self.redis_url:
            port = int(os.environ.get("HAULAGE_DEV_REDIS_PORT") or free_port())
            data = self.dev_dir / "redis"
            data.mkdir(parents=True, exist_ok=True)
            argv = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data.resolve()),
                    "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]  # fmt: skip
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            redis_child = Child("redis", argv, logs / "redis.log", dict(os.environ),
                                where=f"{self.redis_url} (append-only file in {data})")  # fmt: skip
            redis_child.ready = lambda: self._wait_port(redis_child, port)
            self._launch(redis_child)
        else:
            self.out(f"  redis      {self.redis_url} (HAULAGE_REDIS_URL; not started here)")
        os.environ["HAULAGE_REDIS_URL"] = self.redis_url
        os.environ["HAULAGE_MODULES"] = self.modules
        self._start_store(logs)
        if self.dispatch == "cloudrun":
            self._start_cloudrun(logs)
        else:
            os.environ["HAULAGE_DISPATCH_MODE"] = "local"
            self.out("  dispatch       local queues only")
        # Settings read before this point (e.g. for HAULAGE_DEV_DIR) must not keep the old URL.
        # The Redis client module is imported only now: redis-py takes ~0.15 s to import, which
        # every `haulage` command, --help included, would otherwise pay through haulage.cli.dev.
        from haulage.redis_client import reset_redis

        reset_settings()
        reset_redis()
        for queue in self.queues:
            hostname = f"{queue}-{os.getpid()}@127.0.0.1"
            argv = [sys.executable, "-m", "haulage.cli", "worker", "--queues", queue, "--hostname", hostname,
                    "--concurrency", "2" if queue == "short" else "1"]  # fmt: skip
            child = Child(f"worker:{queue}", argv, logs / f"worker-{queue}.log", self.env(),
                          where=f"queue {queue!r}, node {hostname}")  # fmt: skip
            self._launch(child)
        self._wait_workers()
        self._launch(Child("beat", [sys.executable, "-m", "haulage.cli", "beat"], logs / "beat.log", self.env(),
                           where="RedBeat scheduler (Redis lock)"))  # fmt: skip
        flower_port = int(os.environ.get("HAULAGE_DEV_FLOWER_PORT") or _port_or_free(5555))
        flower_env = {**self.env(), "FLOWER_UNAUTHENTICATED_API": "true"}  # loopback only, dev only
        self.flower_url = f"http://127.0.0.1:{flower_port}"
        flower = Child("flower", [sys.executable, "-m", "haulage.cli", "flower", "--port", str(flower_port)],
                       logs / "flower.log", flower_env, where=self.flower_url)  # fmt: skip
        flower.ready = lambda: self._wait_port(flower, flower_port)
        self._launch(flower)
        self._start_api(logs)

    def _start_cloudrun(self, logs: Path) -> None:
        """The local Cloud Run Jobs server; long steps run as its executions, as they would on Cloud Run."""
        port = int(os.environ.get("HAULAGE_DEV_CLOUDRUN_PORT") or free_port())
        job = "projects/haulage-dev/locations/local/jobs/haulage-step"
        argv = [sys.executable, "-m", "haulage.devtools.local_cloudrun", "--port", str(port), "--job", "haulage-step",
                "--log-dir", str(logs / "cloudrun")]  # fmt: skip
        child = Child("cloudrun", argv, logs / "cloudrun.log", self.env(),
                      where=f"local Cloud Run Jobs server at 127.0.0.1:{port}, job {job}")  # fmt: skip
        child.ready = lambda: self._wait_port(child, port)
        self._launch(child)
        poll = os.environ.get("HAULAGE_CLOUDRUN_POLL_INTERVAL", "0.5")
        os.environ.update({"HAULAGE_DISPATCH_MODE": "cloudrun", "HAULAGE_CLOUDRUN_ENDPOINT": f"127.0.0.1:{port}",
                           "HAULAGE_CLOUDRUN_JOB": job, "HAULAGE_CLOUDRUN_POLL_INTERVAL": poll})  # fmt: skip

    def _start_api(self, logs: Path) -> None:
        """The HTTP service in development mode, with a fresh token; the page address signs in with it."""
        from haulage.api.server import dev_environment, page_url  # haulage[api]: fastapi/uvicorn are optional

        port = int(os.environ.get("HAULAGE_DEV_API_PORT") or _port_or_free(8000))
        api_env = {**self.env(), **dev_environment()}
        self.page_url = page_url("127.0.0.1", port, api_env["HAULAGE_API_DEV_TOKEN"])
        argv = [sys.executable, "-m", "haulage.cli", "api", "--port", str(port)]
        child = Child("api", argv, logs / "api.log", api_env, where=f"http://127.0.0.1:{port} (OpenAPI at /docs)")
        child.ready = lambda: self._wait_port(child, port)
        self._launch(child)

    def write_client_env(self) -> Path:
        """A file of `export` lines that points a shell's `haulage` commands at this stack."""
        names = ("HAULAGE_REDIS_URL", "HAULAGE_MODULES", "HAULAGE_STORE", "FIRESTORE_EMULATOR_HOST",
                 "HAULAGE_FIRESTORE_PROJECT", "HAULAGE_DISPATCH_MODE", "HAULAGE_CLOUDRUN_ENDPOINT",
                 "HAULAGE_CLOUDRUN_JOB", "HAULAGE_CLOUDRUN_POLL_INTERVAL")  # fmt: skip
        path = self.dev_dir / "env"
        path.write_text("".join(f"export {n}={os.environ[n]}\n" for n in names if os.environ.get(n)))
        return path

    def _start_store(self, logs: Path) -> None:
        """The Firestore emulator when installed (or asked for), else the Redis store; say which."""
        if self.store in ("auto", "firestore"):
            try:
                port = int(os.environ.get("HAULAGE_DEV_FIRESTORE_PORT") or 0) or None
                host, self._stop_emulator = start_emulator(DEFAULT_PROJECT, log_path=logs / "firestore.log", port=port)
            except EmulatorMissing as exc:
                if self.store == "firestore":
                    raise ConfigError(f"--store firestore: {exc}") from None
                self.out(f"  store          redis (no Firestore emulator: {exc})")
            else:
                os.environ.update({"HAULAGE_STORE": "firestore", "FIRESTORE_EMULATOR_HOST": host,
                                   "HAULAGE_FIRESTORE_PROJECT": os.environ.get("HAULAGE_FIRESTORE_PROJECT",
                                                                               DEFAULT_PROJECT)})  # fmt: skip
                self.out(f"  store          firestore, emulator at {host} (project "
                         f"{os.environ['HAULAGE_FIRESTORE_PROJECT']})  log {logs / 'firestore.log'}")  # fmt: skip
                return
        else:
            self.out("  store          redis")
        os.environ["HAULAGE_STORE"] = "redis"

    def _launch(self, child: Child) -> None:
        child.start()
        self.children.append(child)
        self.out(
            f"  {child.name:<14} pid {child.proc.pid if child.proc else '?':<7} {child.where}  log {child.log_path}"
        )

    @staticmethod
    def _wait_port(child: Child, port: int) -> None:
        try:
            wait_for_port(port, timeout=15, proc=child.proc)
        except ConfigError as exc:
            raise ConfigError(f"{child.name} did not start: {exc}; see {child.log_path}") from None

    def _wait_workers(self, timeout: float = 60) -> None:
        # Built only now: the Celery app reads the broker URL this stack has just put in the environment.
        from haulage.tasks.app import app

        names = [c.where.split("node ")[1] for c in self.children if c.name.startswith("worker:")]
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for reply in app.control.ping(destination=list(pending), timeout=0.5) or []:
                pending -= set(reply)
            for c in self.children:
                if not c.alive():
                    raise ConfigError(f"{c.name} exited during start-up; see {c.log_path}")
        if pending:
            raise ConfigError(f"workers did not answer within {timeout:.0f}s: {', '.join(sorted(pending))}")

    def supervise(self, interval: float = 0.5) -> None:
        """Restart children that die unexpectedly, until stop() is called."""
        while not self.stopping.wait(interval):
            for child in self.children:
                if child.alive() or self.stopping.is_set():
                    continue
                code = child.proc.returncode if child.proc else None
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                if len(child.restarts) > MAX_RESTARTS_PER_MINUTE:
                    self.out(f"  {child.name} keeps dying (exit {code}); giving up on it, see {child.log_path}")
                    child.proc = None
                    continue
                self.out(f"  {child.name} exited with code {code}; restarting")
                log.warning("%s exited with code %s; restarting", child.name, code)
                try:
                    child.start()
                except ConfigError as exc:
                    self.out(f"  {child.name} failed to restart: {exc}")

    def stop(self) -> None:
        """Stop every child: SIGTERM (warm shutdown), then SIGKILL after the grace period."""
        self.stopping.set()
        # Workers first, Redis last, so that workers can acknowledge what they finish.
        for child in reversed(self.children):
            if child.name == "redis":
                continue
            child.signal(signal.SIGTERM)
        self._reap([c for c in self.children if c.name != "redis"])
        with contextlib.suppress(OSError):
            (self.dev_dir / "env").unlink()
        for child in self.children:
            if child.name == "redis":
                child.signal(signal.SIGTERM)
        self._reap(self.children)
        if self._stop_emulator is not None:
            self._stop_emulator()

    def _reap(self, children: list[Child]) -> None:
        deadline = time.monotonic() + STOP_GRACE
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.signal(signal.SIGKILL)
                child.proc.wait(10)
