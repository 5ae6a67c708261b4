"""The Cloud Run job and the local Cloud Run server refuse what a caller with run-with-overrides tried (issue 14, 2).

Each attack is first shown to work where the defence is absent (the job run
without ``-I``, a hand-off signed with the right key), then refused by the
running service: the local server (real ``google-cloud-run`` clients over
gRPC) and the job container's command as it runs on Cloud Run, against the
session's real Redis and a second Redis standing for the attacker's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.api_core import exceptions
from google.cloud import run_v2

from haulage import keys
from haulage.devtools.local_cloudrun import DEFAULT_COMMAND, LocalCloudRun, make_clients
from haulage.devtools.redis_server import free_port, start_redis
from haulage.devtools.stack import job_settings
from haulage.dispatch import handoff
from haulage.dispatch.job_config import CONFIG_ENV, write_job_config, write_key_file
from haulage.jsonutil import dumps
from haulage.progress import get_store
from haulage.progress.models import RunRecord
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.timeout(120)

JOB = "projects/haulage-test/locations/local/jobs/haulage-step"
Overrides = run_v2.RunJobRequest.Overrides


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_key_file(tmp_path_factory.mktemp("secrets") / "handoff-key")


@pytest.fixture(scope="module")
def job_config(redis_server: str, key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_job_config(tmp_path_factory.mktemp("job") / "config.json", settings=job_settings(dict(os.environ)),
                            python_path=[str(ROOT)], handoff_key_file=key_file)  # fmt: skip


@pytest.fixture(scope="module")
def attacker_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis the caller controls, as in the issue's report."""
    port = free_port()
    data = tmp_path_factory.mktemp("attacker-redis")
    proc = start_redis(data, port, appendonly=False, log_file=data / "redis.log")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def flow() -> dict[str, Any]:
    return {"workflow": "dt_one", "stage": 0, "stages": 1, "item": None, "units": 1, "input": "none",
            "on_failure": "collect", "attempt": 1}  # fmt: skip


def plant(client: Any, run_id: str, step_key: str, payload: handoff.Payload) -> None:
    """Store a payload where the job reads it, as whoever can write to that Redis would."""
    client.set(keys.handoff(run_id, step_key, "payload"), dumps(asdict(payload)), px=600_000)


def run_job(env: dict[str, str], command: tuple[str, ...] = DEFAULT_COMMAND) -> subprocess.CompletedProcess[str]:
    """The job's command as Cloud Run runs it: the image's environment plus the execution's overrides."""
    return subprocess.run(list(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)


def base_env(config: Path) -> dict[str, str]:
    # What the container has before overrides: the image's PATH and such, and the config file's path.
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), CONFIG_ENV: str(config)}


def overrides(run_id: str, step_key: str, step: str, signature: str, **extra: str) -> dict[str, str]:
    return {"JOB_NAME": step, "HAULAGE_RUN_ID": run_id, "HAULAGE_STEP_KEY": step_key, "HAULAGE_ATTEMPT": "1",
            "HAULAGE_HANDOFF_SIGNATURE": signature, "CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_COUNT": "1",
            **extra}  # fmt: skip


def new_run() -> str:
    run_id = f"sec-{time.time_ns()}"
    get_store().create_run(RunRecord(id=run_id, workflow="dt_one"))
    return run_id


def test_the_job_runs_only_a_hand_off_signed_with_its_key(redis_client: Any, job_config: Path,
                                                         key_file: Path) -> None:  # fmt: skip
    store = get_store()
    payload = handoff.Payload("cr_probe", [], {"value": 7}, flow())  # type: ignore[arg-type]
    good = handoff.sign(key_file.read_bytes().strip(), run_id="x", step_key="0:cr_probe", attempt=1, payload=payload)

    # Control: the dispatcher's signature over this very hand-off runs the step and writes its checkpoint.
    run_id = new_run()
    plant(redis_client, run_id, "0:cr_probe", payload)
    signature = handoff.sign(key_file.read_bytes().strip(), run_id=run_id, step_key="0:cr_probe", attempt=1,
                             payload=payload)  # fmt: skip
    done = run_job({**base_env(job_config), **overrides(run_id, "0:cr_probe", "cr_probe", signature)})
    assert done.returncode == 0, done.stderr
    assert store.get_checkpoints(run_id, ["0:cr_probe"]), done.stderr

    # Refused: a payload planted by someone who can write to Redis but has not the key (chosen params) ...
    wrong_key = b"k" * 48
    for name, planted, sig in (
        ("no key", payload, handoff.sign(wrong_key, run_id="r", step_key="0:cr_probe", attempt=1, payload=payload)),
        ("another hand-off's signature", payload, good),
        ("params changed after signing", handoff.Payload("cr_probe", [], {"value": 666}, flow()), None),  # type: ignore[arg-type]
        ("no signature", payload, ""),
    ):
        run_id = new_run()
        plant(redis_client, run_id, "0:cr_probe", planted)
        if sig is None:  # the dispatcher signed {"value": 7}; the stored message says 666
            sig = handoff.sign(key_file.read_bytes().strip(), run_id=run_id, step_key="0:cr_probe", attempt=1,
                               payload=payload)  # fmt: skip
        if name == "no key":
            sig = handoff.sign(wrong_key, run_id=run_id, step_key="0:cr_probe", attempt=1, payload=planted)
        done = run_job({**base_env(job_config), **overrides(run_id, "0:cr_probe", "cr_probe", sig)})
        assert done.returncode == 1, (name, done.stderr)
        assert "haulage job: refusing step cr_probe (0:cr_probe)" in done.stderr, (name, done.stderr)
        assert "nothing was run or written" in done.stderr
        assert store.get_checkpoints(run_id, ["0:cr_probe"]) == {}, name
        assert redis_client.get(f"test:count:{run_id}:0:cr_probe") is None, f"{name}: the step ran"

    # ... and a valid hand-off replayed with another attempt number or step name.
    run_id = new_run()
    plant(redis_client, run_id, "0:cr_probe", payload)
    signature = handoff.sign(key_file.read_bytes().strip(), run_id=run_id, step_key="0:cr_probe", attempt=1,
                             payload=payload)  # fmt: skip
    for tampered, refusal in (({"HAULAGE_ATTEMPT": "2"}, "the hand-off signature does not match"),
                              ({"JOB_NAME": "local_probe"}, "JOB_NAME is 'local_probe' but step 0:cr_probe")):
        done = run_job({**base_env(job_config), **overrides(run_id, "0:cr_probe", "cr_probe", signature), **tampered})
        assert done.returncode == 1 and refusal in done.stderr, (tampered, done.stderr)
    assert store.get_checkpoints(run_id, ["0:cr_probe"]) == {}


def test_an_overridden_redis_url_is_ignored(redis_client: Any, attacker_redis: str, job_config: Path) -> None:
    """The report's attack: HAULAGE_REDIS_URL overridden to a Redis holding the caller's chosen step and params."""
    run_id = new_run()
    theirs = redis.Redis.from_url(attacker_redis)
    payload = handoff.Payload("cr_probe", [], {"value": 666}, flow())  # type: ignore[arg-type]
    plant(theirs, run_id, "0:cr_probe", payload)
    sig = handoff.sign(b"k" * 48, run_id=run_id, step_key="0:cr_probe", attempt=1, payload=payload)
    env = {**base_env(job_config), **overrides(run_id, "0:cr_probe", "cr_probe", sig), "HAULAGE_REDIS_URL":
           attacker_redis, "HAULAGE_MODULES": "tests.dispatch_flows", "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = run_job(env)
    assert done.returncode == 1
    assert "ignoring environment variable(s) HAULAGE_MODULES, HAULAGE_REDIS_URL, PYTHONPATH" in done.stderr
    # It looked in the configured Redis, where the dispatcher stored nothing for this step.
    assert f"no message stored for step 0:cr_probe of run {run_id}" in done.stderr
    assert get_store().get_checkpoints(run_id, ["0:cr_probe"]) == {}
    assert theirs.dbsize() == 1  # nothing was written into theirs either


def test_pythonwarnings_and_browser_run_nothing_before_the_job(tmp_path: Path, job_config: Path) -> None:
    """The report's second attack: PYTHONWARNINGS imports `antigravity`, which runs $BROWSER, before the job starts."""
    marker = tmp_path / "pwned"
    attack = {"PYTHONWARNINGS": "ignore::antigravity.Nothing", "BROWSER": f"touch {marker} %s"}
    env = {**base_env(job_config), **overrides("r", "0:cr_probe", "cr_probe", ""), **attack}
    # Control: the command without -I runs the caller's shell command.
    run_job(env, (sys.executable, "-m", "haulage.dispatch.job"))
    wait_until(marker.exists, timeout=10, what="the attack to work without -I")
    marker.unlink()
    done = run_job(env)  # the job's command: python -I -m haulage.dispatch.job
    assert "-I" in DEFAULT_COMMAND
    assert not marker.exists(), done.stderr  # webbrowser waits for $BROWSER's command: it would be there by now
    assert "ignoring environment variable(s) BROWSER, PYTHONWARNINGS" in done.stderr


def test_the_job_refuses_a_config_file_it_did_not_get(tmp_path: Path) -> None:
    """An override of HAULAGE_JOB_CONFIG_FILE can only name files that are not Haulage job configs."""
    json_file = tmp_path / "other.json"
    json_file.write_text('{"settings": {"HAULAGE_REDIS_URL": "redis://evil:6379/0"}}')
    for path, why in (("/proc/self/environ", "under /proc, /sys or /dev"), ("/dev/stdin", "under /proc, /sys or /dev"),
                      (str(json_file), "is not a Haulage job config file"),
                      (str(tmp_path / "missing.json"), "does not exist")):  # fmt: skip
        env = {**base_env(Path(path)), **overrides("r", "0:cr_probe", "cr_probe", "x")}
        done = run_job(env)
        assert done.returncode == 1 and "cannot start" in done.stderr and why in done.stderr, (path, done.stderr)


# --------------------------------------------------------------------------- the local Cloud Run server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalCloudRun]:
    srv = LocalCloudRun(command=["true"], jobs=["haulage-step"], log_dir=tmp_path / "logs")
    srv.start(port=0)
    yield srv
    srv.stop()


def _run(jobs: run_v2.JobsClient, env: dict[str, str], args: list[str] | None = None) -> Any:
    container = Overrides.ContainerOverride(env=[run_v2.EnvVar(name=k, value=v) for k, v in env.items()],
                                            args=args or [])  # fmt: skip
    request = run_v2.RunJobRequest(name=JOB, overrides=Overrides(container_overrides=[container], task_count=1))
    return jobs.run_job(request=request, timeout=5)


def test_the_local_server_wants_its_token(server: LocalCloudRun) -> None:
    documented = overrides("r", "0:s", "s", "sig")
    for token in (None, "x" * 24):
        jobs, executions = make_clients(server.address, token)
        with pytest.raises(exceptions.Unauthenticated, match="Bearer"):
            _run(jobs, documented)
        with pytest.raises(exceptions.Unauthenticated):
            executions.list_executions(parent=JOB, timeout=5)
        jobs.transport.close()
    assert server.executions() == []
    jobs, _ = make_clients(server.address, server.token)  # control: with the token, the same call runs
    assert _run(jobs, {k: v for k, v in documented.items() if not k.startswith("CLOUD_RUN_")}).metadata.name
    jobs.transport.close()
    assert len(server.executions()) == 1


def test_the_local_server_takes_only_the_documented_overrides(server: LocalCloudRun) -> None:
    jobs, _ = make_clients(server.address, server.token)
    documented = {"JOB_NAME": "s", "HAULAGE_RUN_ID": "r", "HAULAGE_STEP_KEY": "0:s", "HAULAGE_ATTEMPT": "1",
                  "HAULAGE_HANDOFF_SIGNATURE": "sig", "HAULAGE_CLOUDRUN_JOB": JOB}  # fmt: skip
    for extra, args in (({"HAULAGE_REDIS_URL": "redis://evil:6379/0"}, None),
                        ({"PYTHONWARNINGS": "ignore::antigravity.X", "BROWSER": "touch /tmp/x %s"}, None),
                        ({CONFIG_ENV: "/proc/self/environ"}, None), ({}, ["--config", "/tmp/x"])):  # fmt: skip
        with pytest.raises(exceptions.InvalidArgument) as caught:
            _run(jobs, {**documented, **extra}, args)
        assert caught.value.grpc_status_code is grpc.StatusCode.INVALID_ARGUMENT
        for name in extra:
            assert name in str(caught.value)
    assert server.executions() == []
    assert _run(jobs, documented).metadata.name  # control
    jobs.transport.close()
