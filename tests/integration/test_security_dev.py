"""The developer machine: what a web page on another origin, or another local user, can do to `haulage dev` (issue 14).

A page served from another origin is opened in Debian's headless Chromium
(selenium through chromedriver, as in test_api_browser.py) and tries what the
issue's report did: read Flower's API (step kwargs) and apply a task. Against
a Flower started open (the old `haulage dev`), the same page reads and
applies; against the dev stack's Flower it gets nothing. Skipped when
chromium is not installed, except in CI (CI=true), where it must run.
"""

from __future__ import annotations

import base64
import http.server
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions

from haulage.devtools.api_server import ApiServer
from haulage.devtools.firestore_emulator import EmulatorMissing, find_emulator, start_emulator
from haulage.devtools.local_cloudrun import make_clients
from haulage.devtools.redis_server import free_port
from haulage.devtools.unsafe_ports import browser_refused_ports
from tests.conftest import ROOT, wait_until

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]  # fmt: skip
NO_BROWSER = "Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"


def needs_browser() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test must run in CI: {NO_BROWSER}", pytrace=False)
    pytest.skip(NO_BROWSER)


def dev_env(dev_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAULAGE_", "FLOWER_"))}
    env.update(PYTHONPATH=str(ROOT), HAULAGE_DEV_DIR=str(dev_dir))
    # The old `haulage dev` set this; a developer's shell may still have it. It must change nothing.
    env["FLOWER_UNAUTHENTICATED_API"] = "true"
    return env


class Dev:
    """A running `haulage dev` and what it printed."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, dev_dir: Path) -> None:
        self.proc, self.log, self.dev_dir = proc, log, dev_dir
        text = log.read_text()
        found = re.search(r"Flower at (http://\S+) \(user (\S+), password (\S+)\)", text)
        assert found, text
        self.flower, self.user, self.password = found.groups()
        self.env_file = dict(re.findall(r"^export (\w+)=(.*)$", (dev_dir / "env").read_text(), re.M))
        page = re.search(r"progress page at (http://[^/]+)/#token=(\S+) \(token valid until", text)
        assert page, text
        self.api, self.token = page.groups()
        self.api_pid = int(re.search(r"api\s+pid (\d+)", text).group(1))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    tmp = tmp_path_factory.mktemp("secdev")
    dev_dir, log = tmp / "dev", tmp / "dev.out"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "haulage.cli", "dev", "--no-beat"], cwd=ROOT,
                                env=dev_env(dev_dir), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip

    def ready() -> bool:
        assert proc.poll() is None, f"haulage dev exited with {proc.returncode}:\n{log.read_text()}"
        return "Ctrl-C stops everything" in log.read_text()

    try:
        wait_until(ready, timeout=120, what="haulage dev to be up")
        yield Dev(proc, log, dev_dir)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def status_of(url: str, auth: tuple[str, str] | None = None, data: bytes | None = None, bearer: str = "") -> int:
    request = urllib.request.Request(url, data=data)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    if bearer:
        request.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:
        return 0  # not listening yet


# --------------------------------------------------------------------------- the attacker's page

ATTACK = """<!doctype html><title>innocent page</title><script>
window.results = {};
async function attack(flower) {
  try {
    const reply = await fetch(flower + '/api/tasks');
    results.read = reply.status + ' ' + (await reply.text()).slice(0, 300);
  } catch (e) { results.read = 'blocked: ' + e; }
  try {
    const reply = await fetch(flower + '/api/task/async-apply/haulage.no_such_task', {
      method: 'POST', headers: {'Content-Type': 'text/plain'}, body: '{"kwargs": {"run_id": "pwned-run"}}'});
    results.apply = reply.status + ' ' + (await reply.text()).slice(0, 300);
  } catch (e) { results.apply = 'blocked: ' + e; }
  results.done = true;
}
async function firestore(url) {
  // What the emulator grants anyone who asks: the admin token, which bypasses the security rules.
  try {
    const reply = await fetch(url, {headers: {'Authorization': 'Bearer owner'}});
    results.read = reply.status + ' ' + (await reply.text()).slice(0, 300);
  } catch (e) { results.read = 'blocked: ' + e; }
  results.done = true;
}
const query = new URLSearchParams(location.search);
if (query.get('flower')) attack(query.get('flower')); else firestore(query.get('firestore'));
</script>"""


@pytest.fixture(scope="module")
def page() -> Iterator[str]:
    """The attacker's page, on an origin of its own (http://localhost:PORT, not Flower's 127.0.0.1)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = ATTACK.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    needs_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium manager must not phone home
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def attack(browser: Any, page: str, flower: str) -> dict[str, str]:
    browser.get(f"{page}?flower={urllib.parse.quote(flower)}")  # a new document each time, not a hash change
    return dict(wait_until(lambda: browser.execute_script("return window.results.done ? window.results : null"),
                           timeout=20, what="the page's requests to end"))  # fmt: skip


def spawn_flower(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "haulage.cli", "flower", "--port", str(port), *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    if proc.stderr is not None:
        proc.stderr.close()


def test_a_page_on_another_origin_gets_nothing_from_the_dev_flower(dev: Dev, page: str, browser: Any,
                                                                    redis_server: str) -> None:  # fmt: skip
    # Control: the Flower the old `haulage dev` ran (no auth, FLOWER_UNAUTHENTICATED_API) answers the page.
    open_flower, url = spawn_flower({"FLOWER_UNAUTHENTICATED_API": "true"}, "--insecure-no-auth")
    try:
        wait_until(lambda: status_of(f"{url}/healthcheck") == 200, timeout=30, what="the open Flower")
        seen = attack(browser, page, url)
        print(f"\nopen Flower, cross-origin page saw: {seen}")
        assert seen["read"].startswith("200 {"), seen  # the page read /api/tasks (step kwargs)
        assert seen["apply"].startswith("404 "), seen  # its cross-origin POST reached the task lookup
    finally:
        stop(open_flower)

    seen = attack(browser, page, dev.flower)
    print(f"dev Flower, cross-origin page saw: {seen}")
    assert seen["read"].startswith("blocked"), seen
    assert seen["apply"].startswith("blocked"), seen
    # The requests did reach Flower, which refused them: without credentials, 401 (and no CORS headers).
    assert status_of(f"{dev.flower}/api/tasks") == 401
    assert status_of(f"{dev.flower}/api/task/async-apply/haulage.run_ended", data=b"{}") == 401
    assert status_of(f"{dev.flower}/api/workers", auth=(dev.user, dev.password)) == 200  # the printed ones work
    assert status_of(f"{dev.flower}/api/tasks", auth=(dev.user, "wrong")) == 401


def test_haulage_flower_refuses_to_start_open(redis_server: str) -> None:
    for env in ({}, {"FLOWER_UNAUTHENTICATED_API": "true"}):
        proc, _ = spawn_flower(env)
        assert proc.wait(60) == 2
        assert proc.stderr is not None
        message = proc.stderr.read().decode()
        stop(proc)
        assert "refusing to start Flower without authentication" in message and "--insecure-no-auth" in message
    proc, url = spawn_flower({"HAULAGE_FLOWER_BASIC_AUTH": "ops:s3cret-pass"})
    try:
        wait_until(lambda: status_of(f"{url}/healthcheck") == 200, timeout=30, what="Flower with basic auth")
        assert status_of(f"{url}/api/workers") == 401
        assert status_of(f"{url}/api/workers", auth=("ops", "s3cret-pass")) == 200
        # The password is not on Flower's command line, which every local user can read.
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _group(proc.pid)]
        assert cmdlines and not any(b"s3cret-pass" in c for c in cmdlines)
    finally:
        stop(proc)


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# --------------------------------------------------------------------------- files and the local Cloud Run server


def test_dev_files_are_readable_by_their_owner_only(dev: Dev) -> None:
    seen = {}
    for path in [dev.dev_dir, *dev.dev_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        seen[str(path.relative_to(dev.dev_dir))] = oct(mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    # What matters most is there: the AOF (params of every run), the env file (a token), the job's secret.
    assert list(dev.dev_dir.glob("redis/**/*.aof*")), seen
    assert (dev.dev_dir / "secrets" / "handoff-key").exists() and (dev.dev_dir / "job" / "config.json").exists()
    assert "HAULAGE_CLOUDRUN_TOKEN" in dev.env_file


def test_the_dev_cloud_run_server_wants_the_stack_token(dev: Dev) -> None:
    endpoint = dev.env_file["HAULAGE_CLOUDRUN_ENDPOINT"]
    job = dev.env_file["HAULAGE_CLOUDRUN_JOB"]
    jobs, _ = make_clients(endpoint)
    with pytest.raises(exceptions.Unauthenticated):
        jobs.run_job(name=job, timeout=10)
    jobs.transport.close()
    jobs, executions = make_clients(endpoint, dev.env_file["HAULAGE_CLOUDRUN_TOKEN"])
    assert list(executions.list_executions(parent=job, timeout=10)) == []  # with the stack's token: answered
    jobs.transport.close()


# --------------------------------------------------------------------------- the dev API token


def test_the_dev_token_expires_and_is_new_each_start(dev: Dev, redis_server: str, tmp_path: Path) -> None:
    assert status_of(f"{dev.api}/v1/me", bearer=dev.token) == 200
    environ = dict(entry.split("=", 1) for entry in Path(f"/proc/{dev.api_pid}/environ").read_text().split("\0")
                   if "=" in entry)  # fmt: skip
    assert environ["HAULAGE_API_DEV_TOKEN"] == dev.token
    left = float(environ["HAULAGE_API_DEV_TOKEN_EXPIRES"]) - time.time()
    print(f"\ndev token expires in {left / 3600:.2f} h")
    assert 11.5 * 3600 < left <= 12 * 3600

    # The same service with a token about to expire: it works, then it is refused.
    token = "expiring-token-0123456789abcdef"
    env = {"HAULAGE_API_AUTH": "dev", "HAULAGE_API_DEV_TOKEN": token, "PYTHONPATH": str(ROOT),
           "HAULAGE_API_DEV_TOKEN_EXPIRES": f"{time.time() + 15:.0f}"}  # fmt: skip
    with ApiServer(tmp_path / "api.log", env, cwd=ROOT) as api:
        assert status_of(f"{api.url}/v1/me", bearer=token) == 200
        wait_until(lambda: status_of(f"{api.url}/v1/me", bearer=token) == 401, timeout=40, interval=0.5,
                   what="the expired token to be refused")  # fmt: skip


# --------------------------------------------------------------------------- the Firestore emulator


def test_a_page_cannot_reach_the_dev_firestore_emulator(page: str, browser: Any, tmp_path: Path) -> None:
    """`haulage dev --store firestore` runs the emulator on ports browsers refuse; gRPC clients still reach it."""
    try:
        find_emulator()
    except EmulatorMissing as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"the Firestore emulator is not installed: {exc}")
    from google.cloud import firestore

    project = "sec-dev"
    doc = f"v1/projects/{project}/databases/(default)/documents/tasks/r1"
    secret = b'{"fields": {"created_by": {"stringValue": "ana"}, "params": {"stringValue": "SECRET-PARAM"}}}'
    seen = {}
    ordinary = start_emulator(project, log_path=tmp_path / "ordinary.log")
    refused = start_emulator(project, log_path=tmp_path / "refused.log",
                             **dict(zip(("port", "websocket_port", "webchannel_port"), browser_refused_ports(3),
                                        strict=True)))  # fmt: skip
    try:
        for name, (host, _) in (("ordinary", ordinary), ("refused", refused)):
            request = urllib.request.Request(f"http://{host}/{doc.rsplit('/', 1)[0]}?documentId=r1", data=secret,
                                             headers={"Authorization": "Bearer owner",
                                                      "Content-Type": "application/json"})  # fmt: skip
            urllib.request.urlopen(request, timeout=10).close()  # noqa: S310 - loopback
            browser.get(f"{page}?firestore={urllib.parse.quote(f'http://{host}/{doc}')}")
            seen[name] = dict(wait_until(lambda: browser.execute_script("return window.results.done ? "
                                                                        "window.results : null"),
                                         timeout=20, what="the page's request to end"))["read"]  # fmt: skip
        print(f"\nFirestore emulator, cross-origin page saw: {seen}")
        assert seen["ordinary"].startswith("200 ") and "SECRET-PARAM" in seen["ordinary"]  # the attack, shown
        assert seen["refused"].startswith("blocked"), seen
        # Refused by the browser itself, before any request: the port is one HTTP must not reach.
        assert any("ERR_UNSAFE_PORT" in e["message"] for e in browser.get_log("browser")), "not refused for its port"
        os.environ["FIRESTORE_EMULATOR_HOST"] = refused[0]  # a worker's client (gRPC) is not refused
        try:
            snapshot = firestore.Client(project=project).collection("tasks").document("r1").get()
        finally:
            del os.environ["FIRESTORE_EMULATOR_HOST"]
        assert snapshot.to_dict() == {"created_by": "ana", "params": "SECRET-PARAM"}
    finally:
        ordinary[1]()
        refused[1]()
