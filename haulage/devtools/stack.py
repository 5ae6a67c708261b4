"""The development stack: a Redis server, a worker per queue and the services around them, supervised.

`haulage dev` runs it in the foreground; `haulage demo` runs it around one
example run. Children run in their own process groups so that stopping the
stack stops everything it started; a child that dies is restarted with a
capped backoff (:mod:`haulage.devtools.supervisor`). Everything is launched
before anything is waited for: the children's start-up (mostly Python
imports) overlaps, which keeps the stack ready in a few seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from haulage.devtools.firestore_emulator import DEFAULT_PROJECT, EmulatorMissing, find_emulator, start_emulator
from haulage.devtools.redis_server import find_redis_server, free_port, wait_for_port
from haulage.devtools.reload import Watcher
from haulage.devtools.supervisor import Child, tend
from haulage.devtools.unsafe_ports import browser_refused_ports
from haulage.dispatch.job_config import CONFIG_ENV, OVERRIDES, write_job_config, write_key_file, write_private
from haulage.errors import ConfigError
from haulage.settings import env_str, reset_settings

#: seconds a child gets to stop after SIGTERM before SIGKILL (a warm shutdown lets steps finish)
STOP_GRACE = 20.0
#: seconds between looks for changed files under --reload
RELOAD_POLL = 1.0
#: seconds the dev API token works (a new one each `haulage dev`)
DEV_TOKEN_TTL = 12 * 3600.0
#: what a client shell needs to agree with the stack's workers; written to the `env` file when set
CLIENT_ENV = ("HAULAGE_REDIS_URL", "HAULAGE_BROKER_URL", "HAULAGE_RESULT_BACKEND", "HAULAGE_MODULES",
              "HAULAGE_KEY_PREFIX", "HAULAGE_STORE", "FIRESTORE_EMULATOR_HOST", "HAULAGE_FIRESTORE_PROJECT",
              "HAULAGE_FIRESTORE_DATABASE", "HAULAGE_FIRESTORE_COLLECTION", "HAULAGE_DISPATCH_MODE",
              "HAULAGE_CLOUDRUN_ENDPOINT", "HAULAGE_CLOUDRUN_JOB", "HAULAGE_CLOUDRUN_POLL_INTERVAL",
              "HAULAGE_CLOUDRUN_TOKEN")  # fmt: skip
#: variables of the stack's environment that are not settings of the job (secrets, other services, the overrides)
_NOT_JOB_SETTINGS = ("HAULAGE_CLOUDRUN_TOKEN", "HAULAGE_HANDOFF_KEY_FILE", "HAULAGE_API_", "HAULAGE_FLOWER_",
                     "HAULAGE_DEV_", *OVERRIDES, CONFIG_ENV)  # fmt: skip


@dataclass(frozen=True)
class Parts:
    """Which optional parts of the stack run (Redis, the store and the workers always do)."""

    beat: bool = True
    flower: bool = True
    api: bool = True
    cloudrun: bool = True


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
                 out: Callable[[str], None] = print, store: str | None = None, dispatch: str = "cloudrun",
                 parts: Parts = Parts(), reload: bool = False) -> None:  # fmt: skip
        self.dev_dir = dev_dir
        self.modules = modules
        self.queues = queues
        self.out = out
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.redis_url = os.environ.get("HAULAGE_REDIS_URL", "")
        self.flower_url = ""
        self.flower_auth = ""  #: "user:password" of the dev Flower, random per start
        self.page_url = ""
        self.page_token_expires = 0.0  #: Unix time the page's token stops working
        self.store = store
        self.parts = parts if dispatch == "cloudrun" else Parts(parts.beat, parts.flower, parts.api, cloudrun=False)
        self.reload = reload
        self._stop_emulator: Callable[[], None] | None = None
        self._emulator: threading.Thread | None = None
        self._emulator_error: BaseException | None = None
        self.user_umask = -1  #: the umask `haulage dev` was started with, set back for the user's processes
        self._lock = threading.Lock()  # supervise() never starts a child while stop() runs

    def python_path(self) -> list[str]:
        """Where children import the user's modules from: the current directory (as the CLI does), PYTHONPATH."""
        return [p for p in (os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)) if p]

    def env(self) -> dict[str, str]:
        return {**os.environ, "HAULAGE_REDIS_URL": self.redis_url, "HAULAGE_MODULES": self.modules,
                "PYTHONPATH": os.pathsep.join(self.python_path())}  # fmt: skip

    def start(self) -> None:
        """Start Redis, the store, the Cloud Run server and the workers; return once the workers answer.

        What runs needs: the services around it follow with :meth:`start_services`.
        """
        # The folder holds what runs carry (the AOF holds every run's params) and the stack's secrets:
        # owner only. This process's umask covers what it writes (logs, env, the job's files) and the
        # children that write there (Redis, the Cloud Run server, the emulator); the workers, beat,
        # Flower and the API get the user's own back, for whatever the user's steps write.
        self.user_umask = os.umask(0o077)
        self.dev_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dev_dir.chmod(0o700)  # a folder left by an older stack may be world-readable
        logs = self.dev_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._start_redis(logs)
        os.environ["HAULAGE_REDIS_URL"] = self.redis_url
        os.environ["HAULAGE_MODULES"] = self.modules
        self._start_store(logs)
        if self.parts.cloudrun:
            self._start_cloudrun(logs)
        else:
            os.environ["HAULAGE_DISPATCH_MODE"] = "local"
            self.out("  dispatch       local queues only (no Cloud Run server)")
        # Settings read before this point (e.g. for HAULAGE_DEV_DIR) must not keep the old URL.
        # The Redis client module is imported only now: redis-py takes ~0.15 s to import, which
        # every `haulage` command, --help included, would otherwise pay through haulage.cli.dev.
        from haulage.redis_client import reset_redis

        reset_settings()
        reset_redis()
        for queue in self.queues:
            hostname = f"{queue}-{os.getpid()}@127.0.0.1"
            argv = [sys.executable, "-m", "haulage.cli", "worker", "--queues", queue, "--hostname", hostname,
                    "--concurrency", "2" if queue == "short" else "1", "--without-mingle"]  # fmt: skip
            self._launch(Child(f"worker:{queue}", argv, logs / f"worker-{queue}.log", self.env(),
                               where=f"queue {queue!r}, node {hostname}", reloads=True,
                               umask=self.user_umask))  # fmt: skip
        self._wait_ready()

    def start_services(self) -> None:
        """Start beat, Flower and the HTTP service (as asked) and wait until they answer.

        They start once the workers answer rather than beside them: on two cores every
        process's start-up is mostly CPU (Python imports), and the workers come first.
        """
        logs = self.dev_dir / "logs"
        started = len(self.children)
        if self.parts.beat:
            self._launch(Child("beat", [sys.executable, "-m", "haulage.cli", "beat"], logs / "beat.log", self.env(),
                               where="RedBeat scheduler (Redis lock)", reloads=True,
                               umask=self.user_umask))  # fmt: skip
        if self.parts.flower:
            port = int(os.environ.get("HAULAGE_DEV_FLOWER_PORT") or _port_or_free(5555))
            self.flower_url = f"http://127.0.0.1:{port}"
            # Loopback is not enough: any web page the developer opens can reach 127.0.0.1. Random
            # credentials, printed like the API token, make Flower refuse those pages (401, no CORS).
            self.flower_auth = f"haulage:{secrets.token_urlsafe(18)}"
            flower_env = {k: v for k, v in self.env().items() if not k.startswith("FLOWER_")}
            flower_env["HAULAGE_FLOWER_BASIC_AUTH"] = self.flower_auth
            self._launch(Child("flower", [sys.executable, "-m", "haulage.cli", "flower", "--port", str(port)],
                               logs / "flower.log", flower_env, where=self.flower_url, port=port,
                               umask=self.user_umask))  # fmt: skip
        if self.parts.api:
            self._start_api(logs)
        for child in self.children[started:]:
            self._wait_port(child)

    def _start_redis(self, logs: Path) -> None:
        if self.redis_url:
            self.out(f"  redis          {self.redis_url} (HAULAGE_REDIS_URL; not started here)")
            return
        port = int(os.environ.get("HAULAGE_DEV_REDIS_PORT") or free_port())
        data = self.dev_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data.resolve()),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]  # fmt: skip
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        child = Child("redis", argv, logs / "redis.log", dict(os.environ), port=port,
                      where=f"{self.redis_url} (append-only file in {data})")  # fmt: skip
        self._launch(child)
        self._wait_port(child)  # at once: this process pings the workers through it

    def _start_cloudrun(self, logs: Path) -> None:
        """The local Cloud Run Jobs server; long steps run as its executions, as they would on Cloud Run.

        Set up as production is: the server wants a bearer token (new per start) on every call and
        takes only the documented overrides; its tasks run ``python -I -m haulage.dispatch.job`` with a
        job config file and a hand-off key file (both 0600, new per start) in the dev folder, standing
        for the mounted config and secret of a deployed job.
        """
        port = int(os.environ.get("HAULAGE_DEV_CLOUDRUN_PORT") or free_port())
        job = "projects/haulage-dev/locations/local/jobs/haulage-step"
        token = secrets.token_urlsafe(24)
        key_file = write_key_file(self.dev_dir / "secrets" / "handoff-key")
        config = write_job_config(self.dev_dir / "job" / "config.json", settings=job_settings(self.env()),
                                  python_path=self.python_path(), handoff_key_file=key_file.resolve())  # fmt: skip
        argv = [sys.executable, "-m", "haulage.devtools.local_cloudrun", "--port", str(port), "--job", "haulage-step",
                "--log-dir", str(logs / "cloudrun")]  # fmt: skip
        server_env = {**self.env(), "HAULAGE_CLOUDRUN_TOKEN": token, CONFIG_ENV: str(config.resolve())}
        self._launch(Child("cloudrun", argv, logs / "cloudrun.log", server_env, port=port,
                           where=f"local Cloud Run Jobs server at 127.0.0.1:{port}, job {job}"))  # fmt: skip
        poll = os.environ.get("HAULAGE_CLOUDRUN_POLL_INTERVAL", "0.5")
        os.environ.update({"HAULAGE_DISPATCH_MODE": "cloudrun", "HAULAGE_CLOUDRUN_ENDPOINT": f"127.0.0.1:{port}",
                           "HAULAGE_CLOUDRUN_JOB": job, "HAULAGE_CLOUDRUN_POLL_INTERVAL": poll,
                           "HAULAGE_CLOUDRUN_TOKEN": token,
                           "HAULAGE_HANDOFF_KEY_FILE": str(key_file.resolve())})  # fmt: skip

    def _start_api(self, logs: Path) -> None:
        """The HTTP service in development mode, with a fresh token; the page address signs in with it."""
        if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
            self.out("  api            not started: needs the haulage[api] extra (pip install 'haulage[api]')")
            return
        port = int(os.environ.get("HAULAGE_DEV_API_PORT") or _port_or_free(8000))
        # As haulage.api.server.dev_environment() and page_url(), without importing FastAPI here (~1.3 s
        # of CPU in this process, on the path to "ready", while every child is importing too).
        token = secrets.token_urlsafe(24)
        # New per start, and not for ever: a token copied out of a terminal or a log stops working.
        self.page_token_expires = time.time() + DEV_TOKEN_TTL
        api_env = {**self.env(), "HAULAGE_API_AUTH": "dev", "HAULAGE_API_DEV_TOKEN": token,
                   "HAULAGE_API_DEV_TOKEN_EXPIRES": f"{self.page_token_expires:.0f}"}  # fmt: skip
        self.page_url = f"http://127.0.0.1:{port}/#token={token}"  # url-safe already
        argv = [sys.executable, "-m", "haulage.cli", "api", "--port", str(port)]
        self._launch(Child("api", argv, logs / "api.log", api_env, port=port, reloads=True, umask=self.user_umask,
                           where=f"http://127.0.0.1:{port} (OpenAPI at /docs)"))  # fmt: skip

    def _start_store(self, logs: Path) -> None:
        """Redis unless the Firestore store is asked for (--store, or HAULAGE_STORE); say which and why."""
        store, why = self.store, "--store"
        if store is None:
            store, why = (env_str("HAULAGE_STORE"), "HAULAGE_STORE") if env_str("HAULAGE_STORE") else ("redis", "")
        if store == "auto":
            try:
                find_emulator()
                store, why = "firestore", "--store auto, and the Firestore emulator is installed"
            except EmulatorMissing as exc:
                store, why = "redis", f"--store auto, and no Firestore emulator: {exc}"
        os.environ["HAULAGE_STORE"] = store
        if store != "firestore":
            self.out(f"  store          redis ({why or 'the default; --store firestore uses the Firestore emulator'})")
            return
        os.environ.setdefault("HAULAGE_FIRESTORE_PROJECT", DEFAULT_PROJECT)
        if os.environ.get("FIRESTORE_EMULATOR_HOST"):
            self.out(f"  store          firestore ({why}), emulator at {os.environ['FIRESTORE_EMULATOR_HOST']} "
                     "(FIRESTORE_EMULATOR_HOST; not started here)")  # fmt: skip
            return
        find_emulator_or_fail(why)
        # On ports browsers refuse: the emulator answers any web page, with admin rights for `Bearer owner`
        # (see haulage.devtools.unsafe_ports). HAULAGE_DEV_FIRESTORE_PORT opts out, for a browser client.
        port, websocket_port, webchannel_port = browser_refused_ports(3)
        port = int(os.environ.get("HAULAGE_DEV_FIRESTORE_PORT") or port)
        os.environ["FIRESTORE_EMULATOR_HOST"] = f"127.0.0.1:{port}"
        self.out(f"  store          firestore ({why}), emulator at 127.0.0.1:{port} (project "
                 f"{os.environ['HAULAGE_FIRESTORE_PROJECT']})  log {logs / 'firestore.log'}")  # fmt: skip

        def run() -> None:
            try:
                _, self._stop_emulator = start_emulator(os.environ["HAULAGE_FIRESTORE_PROJECT"],
                                                        log_path=logs / "firestore.log", port=port,
                                                        websocket_port=websocket_port,
                                                        webchannel_port=webchannel_port)  # fmt: skip
            except BaseException as exc:  # handed to _wait_ready, in the main thread
                self._emulator_error = exc

        # Java takes a second or more to answer: it starts while the workers import.
        self._emulator = threading.Thread(target=run, name="firestore-emulator", daemon=True)
        self._emulator.start()

    def _launch(self, child: Child) -> None:
        child.start()
        self.children.append(child)
        self.out(
            f"  {child.name:<14} pid {child.proc.pid if child.proc else '?':<7} {child.where}  log {child.log_path}"
        )

    @staticmethod
    def _wait_port(child: Child, timeout: float = 30) -> None:
        if child.port is None:
            return
        try:
            wait_for_port(child.port, timeout=timeout, proc=child.proc)
        except ConfigError as exc:
            raise ConfigError(f"{child.name} did not start: {exc}; see {child.log_path}") from None

    def _wait_ready(self, timeout: float = 60) -> None:
        # Built only now: the Celery app reads the broker URL this stack has just put in the environment.
        from haulage.tasks.app import app

        for child in self.children:
            self._wait_port(child)
        if self._emulator is not None:
            self._emulator.join()
            if self._emulator_error is not None:
                raise ConfigError(f"--store firestore: {self._emulator_error}") from None
        names = [c.where.split("node ")[1] for c in self.children if c.name.startswith("worker:")]
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for reply in app.control.ping(destination=list(pending), timeout=0.25) or []:
                pending -= set(reply)
            for c in self.children:
                if not c.alive():
                    raise ConfigError(f"{c.name} exited during start-up; see {c.log_path}")
        if pending:
            raise ConfigError(f"workers did not answer within {timeout:.0f}s: {', '.join(sorted(pending))}")

    def write_client_env(self) -> Path:
        """A file of `export` lines that points a shell's `haulage` commands at this stack.

        The CLI reads it by itself from the current folder when HAULAGE_REDIS_URL is unset
        (:mod:`haulage.devtools.client_env`); the first line names this process, so a file
        left by a stack that was killed is recognised as stale.
        """
        lines = [f"# written by haulage dev, pid {os.getpid()}; removed when it stops\n"]
        lines += [f"export {n}={shlex.quote(os.environ[n])}\n" for n in CLIENT_ENV if os.environ.get(n)]
        return write_private(self.dev_dir / "env", "".join(lines))  # it holds the Cloud Run server's token

    def supervise(self, interval: float = 0.5) -> None:
        """Restart children that die unexpectedly (and, with reload, when the user's files change) until stop()."""
        watcher = Watcher(self.modules.split(",")) if self.reload else None
        if watcher is not None:
            self.out(f"haulage dev: reloading workers when any of {len(watcher.files())} Python file(s) change")
        next_look = time.monotonic() + RELOAD_POLL
        while not self.stopping.wait(interval):
            with self._lock:
                if self.stopping.is_set():
                    return
                if watcher is not None and time.monotonic() >= next_look:
                    next_look = time.monotonic() + RELOAD_POLL
                    changed = watcher.changed()
                    if changed:
                        self._reload(changed)
                for child in self.children:
                    tend(child, self.out, grace=STOP_GRACE)

    def _reload(self, changed: list[Path]) -> None:
        shown = ", ".join(str(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p) for p in changed[:3])
        self.out(f"haulage dev: {shown}{' ...' if len(changed) > 3 else ''} changed; reloading")
        for child in self.children:
            if not child.reloads:
                continue
            child.deaths, child.told_dying = 0, False
            if child.alive():
                child.reload_asked = time.monotonic()
                child.signal(signal.SIGTERM)  # a warm shutdown: running steps finish first
            else:
                child.restart_at = time.monotonic()  # waiting out a backoff: the fix may be in

    def stop(self) -> None:
        """Stop every child: SIGTERM (warm shutdown), then SIGKILL after the grace period."""
        self.stopping.set()
        with self._lock:
            # Workers first, Redis last, so that workers can acknowledge what they finish.
            for child in reversed(self.children):
                if child.name != "redis":
                    child.signal(signal.SIGTERM)
            self._reap([c for c in self.children if c.name != "redis"])
            with contextlib.suppress(OSError):
                (self.dev_dir / "env").unlink()
            for child in self.children:
                if child.name == "redis":
                    child.signal(signal.SIGTERM)
            self._reap(self.children)
            if self._emulator is not None:
                self._emulator.join(70)
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


def job_settings(environ: dict[str, str]) -> dict[str, str]:
    """The settings the dev job runs with: the workers' Haulage settings and the emulator's address."""
    return {name: value for name, value in environ.items()
            if (name.startswith("HAULAGE_") and not name.startswith(_NOT_JOB_SETTINGS))
            or name in ("FIRESTORE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}  # fmt: skip


def find_emulator_or_fail(why: str) -> None:
    """EmulatorMissing as the ConfigError a user sees, naming what asked for Firestore."""
    try:
        find_emulator()
    except EmulatorMissing as exc:
        raise ConfigError(f"the Firestore store ({why}) needs the Firestore emulator here: {exc}") from None
