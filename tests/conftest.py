"""Test fixtures on real parts: a redis-server started for the session and real Celery worker processes.

The environment is set before any project module is imported, because the
Celery app reads its configuration at import.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haulage.devtools.redis_server import free_port, start_redis  # noqa: E402

_PORT = int(os.environ.get("HAULAGE_TEST_REDIS_PORT") or free_port())
os.environ["HAULAGE_REDIS_URL"] = f"redis://127.0.0.1:{_PORT}/0"
os.environ["HAULAGE_MODULES"] = "tests.flows,haulage.examples,tests.dispatch_flows,tests.document_flows"
os.environ.setdefault("HAULAGE_MAX_COUNTDOWN", "2")
os.environ.setdefault("HAULAGE_VISIBILITY_TIMEOUT", "60")
os.environ.setdefault("HAULAGE_LOCK_LIVENESS", "3")
os.environ.pop("HAULAGE_STORE", None)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("redis")
    proc = start_redis(data, _PORT, appendonly=True, log_file=data / "redis.log")
    yield os.environ["HAULAGE_REDIS_URL"]
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def redis_client(redis_server: str) -> Any:
    import redis

    return redis.Redis.from_url(redis_server)


class WorkerProcess:
    """A real `celery worker` subprocess (prefork), as deployments run it."""

    def __init__(self, log_path: Path, queues: str = "short,long,dispatch", concurrency: int = 2,
                 extra_env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.log_path = log_path
        self.queues = queues
        self.concurrency = concurrency
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.extra_env}
        self.starts += 1
        name = f"w{os.getpid()}-{id(self)}-{self.starts}@127.0.0.1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "haulage.cli", "worker", "--queues", self.queues,
                 "--concurrency", str(self.concurrency), "--hostname", name, "--loglevel", "INFO"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        if "HAULAGE_REDIS_URL" in self.extra_env:
            # On another broker our app cannot ping it: its log says when it is ready.
            wait_until(lambda: " ready." in self.log_path.read_text(errors="replace"), timeout=30,
                       what=f"worker {name}")  # fmt: skip
            return
        from haulage.tasks.app import app

        wait_until(lambda: app.control.ping(destination=[name], timeout=0.5), timeout=30, what=f"worker {name}")

    def kill(self) -> None:
        """SIGKILL the worker and its pool children: a crash, not a shutdown."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="session")
def worker(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(tmp_path_factory.mktemp("worker") / "worker.log")
    w.start()
    yield w
    w.stop()


@pytest.fixture
def make_worker(redis_server: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Workers of a test's own (for crash tests); stopped at the end of the test."""
    started: list[WorkerProcess] = []

    def make(**kwargs: Any) -> WorkerProcess:
        w = WorkerProcess(tmp_path / f"worker{len(started)}.log", **kwargs)
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()


@pytest.fixture(scope="session", autouse=True)
def _load_modules() -> None:
    from haulage.workflows import registry

    registry.load_modules()


#: modules of the HTTP-service tests' worker (their slow flows run on the api_slow queue)
API_MODULES = "tests.flows,haulage.examples,tests.api_flows"


# Module scope: it consumes the shared queues too, so it must not outlive the module that asked for it.
@pytest.fixture(scope="module")
def api_worker(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker for the api_slow queue (and the internal queues its runs use), shared by the API tests."""
    w = WorkerProcess(tmp_path_factory.mktemp("api-worker") / "worker.log", queues="api_slow,short,long,dispatch",
                      extra_env={"HAULAGE_MODULES": API_MODULES})  # fmt: skip
    w.start()
    yield w
    w.stop()
