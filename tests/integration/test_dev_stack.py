"""`haulage demo` and `haulage dev` from a clean environment: they start, work, restart and stop everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from haulage.devtools.firestore_emulator import EmulatorMissing, find_emulator
from haulage.devtools.redis_server import free_port, start_redis
from tests.conftest import ROOT, wait_until

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAULAGE_")}
    env["PYTHONPATH"] = str(ROOT)
    env["HAULAGE_DEV_DIR"] = str(tmp_path / "dev")
    return env


def pids_in(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"pid (\d+)", text)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_demo_runs_the_example_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "haulage.cli", "demo"], cwd=ROOT, env=clean_env(tmp_path),
                         capture_output=True, text=True, timeout=200)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "redis://127.0.0.1:" in out.stdout and "worker:long" in out.stdout
    assert "100.0% COMPLETE" in out.stdout
    assert "ran on    cloudrun 6, local 2" in out.stdout  # each page in its own Cloud Run execution
    assert '"verdict": "revise and resubmit"' in out.stdout
    assert "stack stopped" in out.stdout
    pids = pids_in(out.stdout)
    assert len(pids) == 8  # redis, the Cloud Run server, three workers, beat, flower, api
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10, what="every child to be gone")
    assert list((tmp_path / "dev" / "redis").rglob("*.aof*")), "redis runs with its append-only file"


def test_dev_serves_restarts_and_stops(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    log = tmp_path / "dev.out"
    with open(log, "w") as out:
        dev = subprocess.Popen([sys.executable, "-m", "haulage.cli", "dev"], cwd=ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: "Ctrl-C stops everything" in log.read_text(), timeout=90, what="haulage dev to be up")
        text = log.read_text()
        env_file = re.search(r"source (\S+)", text)
        assert env_file is not None
        # The file `haulage dev` names is all a client needs.
        exports = dict(re.findall(r"^export (\w+)=(.*)$", Path(env_file.group(1)).read_text(), re.M))
        assert exports["HAULAGE_REDIS_URL"].startswith("redis://127.0.0.1:")
        client_env = {**env, **exports}
        run = subprocess.run([sys.executable, "-m", "haulage.cli", "run", "bulk_invoices", "-p",
                              'invoices=[{"invoice_id":"A","amount":"10","currency":"EUR","country":"DE"}]',
                              "--wait", "--timeout", "60"],
                             cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=90)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert '"gross_eur": "11.90"' in run.stdout
        # Flower and the HTTP service answer where `haulage dev` says they are.
        flower = re.search(r"Flower at (http://\S+)", text)
        page = re.search(r"progress page at (http://[^/]+)/", text)
        assert flower is not None and page is not None
        with urllib.request.urlopen(f"{flower.group(1)}/healthcheck", timeout=10) as reply:  # noqa: S310 - loopback
            assert reply.read() == b"OK"
        with urllib.request.urlopen(f"{page.group(1)}/healthz", timeout=10) as reply:  # noqa: S310 - loopback
            assert reply.status == 200
        # A worker that dies is restarted.
        worker_pid = int(re.search(r"worker:short\s+pid (\d+)", text).group(1))  # type: ignore[union-attr]
        os.kill(worker_pid, signal.SIGKILL)
        wait_until(lambda: "worker:short exited with code" in log.read_text(), timeout=30, what="restart notice")
        pids = pids_in(text)
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(60)
    assert dev.returncode == 0
    assert "haulage dev: stopped" in log.read_text()
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10, what="every child to be gone")


def start_dev(cwd: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "haulage.cli", "dev", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_ready(dev: subprocess.Popen[bytes], log: Path) -> str:
    def ready() -> bool:
        assert dev.poll() is None, f"haulage dev exited with {dev.returncode}:\n{log.read_text()}"
        return "Ctrl-C stops everything" in log.read_text()

    wait_until(ready, timeout=90, what="haulage dev to be up")
    return log.read_text()


def stop_dev(dev: subprocess.Popen[bytes], log: Path) -> None:
    dev.send_signal(signal.SIGTERM)
    dev.wait(60)
    assert dev.returncode == 0, log.read_text()
    assert "haulage dev: stopped" in log.read_text()


def haulage_cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "haulage.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def bare_env() -> dict[str, str]:
    """A new shell's environment: nothing of Haulage's, not even HAULAGE_DEV_DIR (the stack's folder is .haulage)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAULAGE_") and k != "FIRESTORE_EMULATOR_HOST"}
    env["PYTHONPATH"] = str(ROOT)
    return env


INVOICE = 'invoices=[{"invoice_id":"A","amount":"10","currency":"EUR","country":"DE"}]'


@pytest.mark.parametrize("own_redis", [False, True], ids=["redis-started-here", "HAULAGE_REDIS_URL"])
def test_dev_from_an_empty_folder_and_a_second_shell(tmp_path: Path, own_redis: bool) -> None:
    """From an empty folder, with or without HAULAGE_REDIS_URL; a second shell there needs no `source`."""
    app = tmp_path / "app"
    app.mkdir()
    env, args, redis_proc = bare_env(), ["--no-flower", "--no-api"], None
    if own_redis:
        port = free_port()
        redis_proc = start_redis(tmp_path / "redis", port)
        env["HAULAGE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        try:  # the case that used to die at start: its own Redis and the Firestore emulator
            find_emulator()
            args.append("--store=firestore")
        except EmulatorMissing:
            pass
    log = tmp_path / "dev.out"
    dev = start_dev(app, env, log, *args)
    try:
        text = wait_ready(dev, log)
        store = "firestore (--store)" if "--store=firestore" in args else "redis (the default"
        assert f"  store          {store}" in text
        assert "flower" not in text and "api " not in text and "progress page" not in text  # skipped as asked
        assert (app / ".haulage" / "env").exists()
        # A second shell in the same folder: no HAULAGE_REDIS_URL, no `source`.
        run = haulage_cli(app, bare_env(), "run", "bulk_invoices", "-p", INVOICE, "--wait", "--timeout", "60")
        assert run.returncode == 0, run.stdout + run.stderr
        assert "using the dev stack's settings from .haulage/env" in run.stderr
        assert '"gross_eur": "11.90"' in run.stdout
    finally:
        stop_dev(dev, log)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    assert not (app / ".haulage" / "env").exists()


APP_V1 = """
from haulage import StepContext, chain, step, workflow


@step
def greet(ctx: StepContext, name: str) -> str:
    return "hello " + name


@workflow("greeting")
def greeting(name: str):
    return chain(greet.s(name=name))
"""


def test_dev_reload_restarts_the_workers_when_the_app_changes(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "greetings.py").write_text(APP_V1)
    env = {**bare_env(), "HAULAGE_MODULES": "greetings"}
    log = tmp_path / "dev.out"
    dev = start_dev(app, env, log, "--reload", "--no-flower", "--no-api", "--no-beat", "--no-cloudrun")
    try:
        wait_ready(dev, log)
        run = haulage_cli(app, bare_env(), "run", "greeting", "-p", "name=ana", "--wait", "--timeout", "60")
        assert run.returncode == 0 and '"hello ana"' in run.stdout, run.stdout + run.stderr
        (app / "greetings.py").write_text(APP_V1.replace('"hello "', '"bonjour "'))
        wait_until(lambda: log.read_text().count(" reloaded (pid") >= 3, timeout=60, what="the three workers reloaded")
        assert "greetings.py changed; reloading" in log.read_text()
        run = haulage_cli(app, bare_env(), "run", "greeting", "-p", "name=ana", "--wait", "--timeout", "60")
        assert run.returncode == 0 and '"bonjour ana"' in run.stdout, run.stdout + run.stderr
    finally:
        stop_dev(dev, log)
