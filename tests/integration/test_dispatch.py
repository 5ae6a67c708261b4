"""Long steps as Cloud Run executions: the real google-cloud-run client against the local server.

The local Cloud Run Jobs server runs in this process and starts every task as
``python -m haulage.dispatch.job`` (so a step that ran there is a child of this
process); real Celery worker subprocesses drive the executions with the
Cloud Run settings each test gives them through the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.cloud import run_v2

from haulage.devtools.local_cloudrun import Faults, LocalCloudRun, make_clients
from haulage.devtools.redis_server import free_port
from haulage.devtools.stack import job_settings
from haulage.dispatch.cloudrun import env_of, job_name, reset_cloudrun
from haulage.dispatch.job_config import CONFIG_ENV, write_job_config, write_key_file
from haulage.errors import CloudRunNotConfigured, ConfigError
from haulage.progress import get_store
from haulage.progress.models import RunStatus, StepRecord, StepStatus
from haulage.settings import load_settings, reset_settings
from tests.conftest import WorkerProcess, wait_until

MODULES = os.environ["HAULAGE_MODULES"]

import tests.dispatch_flows  # noqa: E402,F401  (registers the flows in this process)
from haulage.workflows import registry  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
JOB = "projects/haulage-test/locations/local/jobs/haulage-step"
SLEEPER = "projects/haulage-test/locations/local/jobs/sleeper"


#: the bearer token of the module's local Cloud Run server, and the hand-off key (0600) its job shares
TOKEN = "dispatch-test-token-0123456789"
KEY_FILE = write_key_file(Path(tempfile.mkdtemp(prefix="haulage-dispatch-keys-")) / "handoff-key")


def cloud_env(address: str, **extra: str) -> dict[str, str]:
    """The environment of a worker that drives Cloud Run executions on ``address``."""
    return {
        "HAULAGE_MODULES": MODULES,
        "HAULAGE_DISPATCH_MODE": "cloudrun",
        "HAULAGE_CLOUDRUN_ENDPOINT": address,
        "HAULAGE_CLOUDRUN_TOKEN": TOKEN,
        "HAULAGE_HANDOFF_KEY_FILE": str(KEY_FILE),
        "HAULAGE_CLOUDRUN_JOB": JOB,
        "HAULAGE_CLOUDRUN_POLL_INTERVAL": "0.2",
        "HAULAGE_CLOUDRUN_CALL_TIMEOUT": "2",
        "HAULAGE_CLOUDRUN_DEADLINE_MARGIN": "5",
        **extra,
    }


@pytest.fixture(scope="module")
def cloudrun(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloudRun]:
    # As `haulage dev` sets its job up: settings and the project's folder from a config file, not the env.
    config = write_job_config(tmp_path_factory.mktemp("job") / "config.json", settings=job_settings(dict(os.environ)),
                              python_path=[str(ROOT)], handoff_key_file=KEY_FILE)  # fmt: skip
    server = LocalCloudRun(jobs={"haulage-step": None, "sleeper": ["sleep", "30"]}, cwd=ROOT, cancel_grace=2,
                           log_dir=tmp_path_factory.mktemp("cloudrun-logs"), token=TOKEN,
                           task_env={CONFIG_ENV: str(config)})  # fmt: skip
    server.start(port=0)
    yield server
    server.stop()


@pytest.fixture
def faults(cloudrun: LocalCloudRun) -> Iterator[Faults]:
    cloudrun.faults = Faults()
    yield cloudrun.faults
    cloudrun.faults = Faults()


@pytest.fixture(scope="module")
def cloud_worker(cloudrun: LocalCloudRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(tmp_path_factory.mktemp("dt-worker") / "worker.log", queues="dt_cloud", concurrency=2,
                      extra_env=cloud_env(cloudrun.address))  # fmt: skip
    w.start()
    yield w
    w.stop()


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Change this process's settings for one test (the plan is built here)."""

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        reset_settings()
        reset_cloudrun()

    yield set_env
    monkeypatch.undo()
    reset_settings()
    reset_cloudrun()


def executions_of(server: LocalCloudRun, run_id: str) -> list[run_v2.Execution]:
    return [e for e in server.executions() if env_of(e).get("HAULAGE_RUN_ID") == run_id]


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def worker_pids(*workers: WorkerProcess) -> set[int]:
    return set().union(*(descendants(w.proc.pid) for w in workers if w.proc is not None))


def step_of(run_id: str, key: str) -> StepRecord:
    record = get_store().get_step(run_id, key)
    assert record is not None, f"no step record {key} in run {run_id}"
    return record


def timed_run(name: str, timeout: float = 60, **params: Any) -> tuple[Any, float]:
    started = time.monotonic()
    run = registry.get(name).start(**params)
    run.wait(timeout=timeout)
    return run, time.monotonic() - started


# --------------------------------------------------------------------------- configuration and routing


def test_settings_and_routing(settings_env: Callable[..., None]) -> None:
    from haulage.dispatch.dispatcher import signature_for
    from haulage.dispatch.driver import DRIVER_TASK
    from tests.dispatch_flows import cr_probe, local_probe, mode_probe, seed

    flow: Any = {"attempt": 1}

    def route(step: Any) -> tuple[str, str]:
        sig = signature_for(step, run_id="r", key="0:s", params={}, flow=flow)
        return sig.task, sig.options["queue"]

    settings_env(HAULAGE_DISPATCH_MODE="local")
    assert route(mode_probe) == ("mode_probe", "dt_cloud")
    assert route(cr_probe) == (DRIVER_TASK, "dt_cloud")  # dispatch="cloudrun" wins over the mode
    settings_env(HAULAGE_DISPATCH_MODE="cloudrun")
    assert route(mode_probe) == (DRIVER_TASK, "dt_cloud")
    assert route(local_probe) == ("local_probe", "dt_cloud")  # dispatch="local" wins over the mode
    assert route(seed) == ("seed", "dt_cloud")  # short steps stay local

    settings_env(HAULAGE_CLOUDRUN_JOB="step", HAULAGE_CLOUDRUN_PROJECT="p", HAULAGE_CLOUDRUN_REGION="europe-west1")
    assert job_name() == "projects/p/locations/europe-west1/jobs/step"
    settings_env(HAULAGE_CLOUDRUN_JOB="step", HAULAGE_CLOUDRUN_PROJECT="", GOOGLE_CLOUD_PROJECT="",
                 HAULAGE_CLOUDRUN_REGION="")  # fmt: skip
    with pytest.raises(CloudRunNotConfigured, match="HAULAGE_CLOUDRUN_PROJECT .* and HAULAGE_CLOUDRUN_REGION"):
        job_name()
    for bad in ("projects/p/jobs/x", "Bad_Job"):
        os.environ["HAULAGE_CLOUDRUN_JOB"] = bad
        with pytest.raises(ConfigError, match="HAULAGE_CLOUDRUN_JOB"):
            load_settings()
    settings_env(HAULAGE_CLOUDRUN_JOB="")


def test_step_dispatch_option_is_checked() -> None:
    from haulage.tasks import step

    with pytest.raises(ConfigError, match="dispatch must be one of local, cloudrun or None, got 'gcp'"):
        step(dispatch="gcp")(lambda ctx: None)


def test_job_entrypoint_says_what_is_missing(redis_server: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOB_NAME", "HAULAGE_RUN", "HAULAGE_STEP"))}
    done = subprocess.run([sys.executable, "-m", "haulage.dispatch.job"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert "missing environment variable(s) JOB_NAME, HAULAGE_RUN_ID, HAULAGE_STEP_KEY, HAULAGE_ATTEMPT" in done.stderr
    env.update(JOB_NAME="cr_probe", HAULAGE_RUN_ID="nope", HAULAGE_STEP_KEY="0:cr_probe", HAULAGE_ATTEMPT="1")
    env[CONFIG_ENV] = str(write_job_config(tmp_path / "config.json", settings=job_settings(env),
                                           python_path=[str(ROOT)], handoff_key_file=KEY_FILE))  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "haulage.dispatch.job"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "no message stored for step 0:cr_probe of run nope" in done.stderr


# --------------------------------------------------------------------------- the Cloud Run path


@pytest.mark.slow
def test_long_step_runs_in_a_cloud_run_task(
    worker: WorkerProcess, cloud_worker: WorkerProcess, cloudrun: LocalCloudRun, settings_env: Callable[..., None]
) -> None:
    settings_env(HAULAGE_DISPATCH_MODE="cloudrun")  # the plan is built here: the mode routes mode_probe
    run, _ = timed_run("dt_chain", step="mode_probe", value=7)
    record = run.status()
    assert record.status is RunStatus.COMPLETE, record.error
    out = run.results()
    assert out["prev"] == {"seed": 7}  # the previous stage's value reached the container
    assert out["backend"] == "cloudrun"
    assert out["env"] | {"CLOUD_RUN_EXECUTION": None} == {
        "JOB_NAME": "mode_probe", "HAULAGE_RUN_ID": run.id, "HAULAGE_STEP_KEY": "1:mode_probe",
        "HAULAGE_ATTEMPT": "1", "CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_COUNT": "1", "CLOUD_RUN_EXECUTION": None,
    }  # fmt: skip
    # A child of the local Cloud Run server (in this process), not of any worker.
    assert out["ppid"] == os.getpid()
    assert out["pid"] not in worker_pids(worker, cloud_worker) | {os.getpid()}
    # The run ends when the job's report lands; the server counts the task as succeeded once its
    # process has exited, a moment later (Cloud Run's own execution status is as asynchronous).
    execution = wait_until(lambda: (found := executions_of(cloudrun, run.id)) and found[0].succeeded_count == 1
                           and found[0], timeout=15, what="the execution to count its task succeeded")  # fmt: skip
    assert len(executions_of(cloudrun, run.id)) == 1
    assert execution.name.endswith("/executions/" + out["env"]["CLOUD_RUN_EXECUTION"])
    assert execution.task_count == 1
    step = step_of(run.id, "1:mode_probe")
    assert (step.status, step.backend, step.execution) == (StepStatus.COMPLETE, "cloudrun", execution.name)
    assert any(e.kind == "dispatch" and execution.name in e.message for e in record.history)

    # Timings: one long step via the local Cloud Run server, then on the local queue.
    cloud_run, cloud_seconds = timed_run("dt_one", step="mode_probe", value=1)
    assert cloud_run.results()["backend"] == "cloudrun"
    settings_env(HAULAGE_DISPATCH_MODE="local")
    local_run, local_seconds = timed_run("dt_one", step="mode_probe", value=1)
    out = local_run.results()
    assert out["backend"] == "local" and out["pid"] in worker_pids(cloud_worker)
    assert executions_of(cloudrun, local_run.id) == []
    print(f"\none long step, start to finish: {cloud_seconds:.2f}s via the local Cloud Run server, "
          f"{local_seconds:.2f}s on the local queue")  # fmt: skip


@pytest.mark.slow
def test_fan_out_over_a_long_step(worker: WorkerProcess, cloud_worker: WorkerProcess, cloudrun: LocalCloudRun,
                                  redis_client: Any) -> None:  # fmt: skip
    started = time.monotonic()
    run = registry.get("dt_fan").start(step="cr_probe", n=4, fail_on=[2])
    record = run.wait(timeout=90)
    seconds = time.monotonic() - started
    assert record.status is RunStatus.COMPLETE, record.error
    out = run.results()
    assert [s["value"] for s in out["ok"]] == [0, 1, 3]
    assert {s["ppid"] for s in out["ok"]} == {os.getpid()}
    assert len({s["pid"] for s in out["ok"]}) == 3  # one container each
    assert out["failed"] == [{"params": {"value": 2}, "error_type": "ValueError", "message": "bad item 2"}]
    # One execution per item and attempt: the failing item ran twice (retries=1).
    attempts = sorted((env_of(e)["HAULAGE_STEP_KEY"], env_of(e)["HAULAGE_ATTEMPT"])
                      for e in executions_of(cloudrun, run.id))  # fmt: skip
    assert attempts == sorted([(f"0:cr_probe[{i}]", "1") for i in range(4)] + [("0:cr_probe[2]", "2")])
    failed = step_of(run.id, "0:cr_probe[2]")
    assert (failed.status, failed.backend, failed.attempt, failed.error_type) == (
        StepStatus.FAILED, "cloudrun", 2, "ValueError")
    assert (record.steps.total, record.steps.done, record.steps.failed) == (5, 4, 1)  # 4 items + gather
    assert record.percent == 100.0
    # The same fan-out run locally gives the same Results.
    local = registry.get("dt_fan").start(step="local_probe", n=4, fail_on=[2])
    assert local.wait(timeout=60).status is RunStatus.COMPLETE
    local_out = local.results()
    assert local_out["failed"] == out["failed"]
    assert [s["value"] for s in local_out["ok"]] == [0, 1, 3]
    print(f"\nfan-out of 4 long steps through the local Cloud Run server: {seconds:.2f}s, "
          f"{len(attempts)} executions")  # fmt: skip


@pytest.mark.slow
def test_a_failing_attempt_is_retried_as_a_new_execution(cloud_worker: WorkerProcess, worker: WorkerProcess,
                                                         cloudrun: LocalCloudRun) -> None:  # fmt: skip
    run, _ = timed_run("dt_one", step="cr_probe", value=5, fail_attempts=1)
    record = run.status()
    assert record.status is RunStatus.COMPLETE, record.error
    assert run.results()["attempt"] == 2
    assert sorted(env_of(e)["HAULAGE_ATTEMPT"] for e in executions_of(cloudrun, run.id)) == ["1", "2"]
    assert any(e.kind == "retry" and "RuntimeError: attempt 1 fails on purpose" in e.message for e in record.history)


# --------------------------------------------------------------------------- fallback


@pytest.mark.slow
@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_fallback_when_run_job_is_refused(code: grpc.StatusCode, worker: WorkerProcess,
                                          cloud_worker: WorkerProcess, cloudrun: LocalCloudRun,
                                          faults: Faults) -> None:  # fmt: skip
    faults.run_job_error = code
    run, _ = timed_run("dt_one", step="cr_probe", value=3)
    record = run.status()
    assert record.status is RunStatus.COMPLETE, record.error
    out = run.results()
    assert out["backend"] == "local-fallback" and out["pid"] in worker_pids(cloud_worker)
    step = step_of(run.id, "0:cr_probe")
    assert step.backend == "local-fallback" and f"RunJob failed: {code.name}" in step.message
    [event] = [e for e in record.history if e.kind == "fallback"]
    assert "local-fallback" in event.message and code.name in event.message and event.step == "0:cr_probe"
    assert executions_of(cloudrun, run.id) == []


@pytest.mark.slow
def test_fallback_when_the_server_is_down_or_not_configured(worker: WorkerProcess, make_worker: Any) -> None:
    down = make_worker(queues="dt_down", concurrency=1, extra_env=cloud_env(f"127.0.0.1:{free_port()}"))
    down.start()
    runs = [timed_run("dt_one", step="down_probe", value=v)[0] for v in (1, 2)]
    for run in runs:
        assert run.status().status is RunStatus.COMPLETE
        assert run.results()["backend"] == "local-fallback"
        step = step_of(run.id, "0:down_probe")
        assert step.backend == "local-fallback" and "UNAVAILABLE" in step.message
        assert any(e.kind == "fallback" and "UNAVAILABLE" in e.message for e in run.status().history)
    # Logged once per process, however many steps fall back.
    assert down.log_path.read_text().count("Cloud Run unavailable (RunJob failed: UNAVAILABLE") == 1
    down.stop()

    # Not configured; then configured for Google's API but without usable credentials.
    for env, reason in ((cloud_env("", HAULAGE_CLOUDRUN_JOB=""), "HAULAGE_CLOUDRUN_JOB is not set"),
                        (cloud_env("", GOOGLE_APPLICATION_CREDENTIALS=str(ROOT / "no-such-credentials.json")),
                         "cannot create the Cloud Run client for the Cloud Run API"),
                        # No key, no unsigned execution: the job would refuse it anyway.
                        (cloud_env(f"127.0.0.1:{free_port()}", HAULAGE_HANDOFF_KEY_FILE=str(ROOT / "no-such-key")),
                         "cannot sign the hand-off: cannot read the hand-off key file")):  # fmt: skip
        other = make_worker(queues="dt_down", concurrency=1, extra_env=env)
        other.start()
        run, _ = timed_run("dt_one", step="down_probe", value=3)
        assert run.results()["backend"] == "local-fallback"
        assert reason in step_of(run.id, "0:down_probe").message
        other.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["deadline", "unavailable-after-create"])
def test_ambiguous_run_job_attaches_to_the_execution_it_started(
    fault: str, worker: WorkerProcess, cloud_worker: WorkerProcess, cloudrun: LocalCloudRun, faults: Faults
) -> None:
    if fault == "deadline":
        faults.run_job_delay = 3  # the workers' call timeout is 2 s: DEADLINE_EXCEEDED, execution running
    else:
        faults.run_job_error, faults.run_job_error_after_create = grpc.StatusCode.UNAVAILABLE, True
    run, _ = timed_run("dt_one", step="cr_probe", value=4)
    assert run.status().status is RunStatus.COMPLETE
    assert run.results()["backend"] == "cloudrun"
    [execution] = executions_of(cloudrun, run.id)
    assert step_of(run.id, "0:cr_probe").execution == execution.name


# --------------------------------------------------------------------------- crashes, cancellation, deadlines


@pytest.mark.slow
def test_dispatch_worker_killed_while_polling_reattaches(
    worker: WorkerProcess, make_worker: Any, cloudrun: LocalCloudRun, redis_client: Any
) -> None:
    # A short broker visibility timeout and restore sweep, so the killed worker's message comes back
    # while the execution still runs (the settings' own floor of 10 s is for production).
    options = {"visibility_timeout": 4, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    env = cloud_env(cloudrun.address, HAULAGE_CELERY_BROKER_TRANSPORT_OPTIONS=json.dumps(options))
    first = make_worker(queues="dt_kill", concurrency=1, extra_env=env)
    first.start()
    run = registry.get("dt_one").start(step="kill_probe", sleep=9)
    wait_until(lambda: (step := get_store().get_step(run.id, "0:kill_probe")) and step.execution, timeout=30,
               what="the execution recorded on the step")  # fmt: skip
    wait_until(lambda: redis_client.hlen("haulage:unacked"), timeout=10, what="the driver holding its next poll")
    first.kill()
    killed_at = time.monotonic()
    second = make_worker(queues="dt_kill", concurrency=1, extra_env=env)
    second.start()
    record = run.wait(timeout=60)
    assert record.status is RunStatus.COMPLETE, record.error
    [execution] = executions_of(cloudrun, run.id)  # re-attached: no second execution
    assert step_of(run.id, "0:kill_probe").execution == execution.name
    assert run.results()["ppid"] == os.getpid()
    assert int(redis_client.get(f"test:count:{run.id}:0:kill_probe")) == 1
    # The redelivered driver polled the recorded execution; it never started one.
    log = second.log_path.read_text()
    assert "haulage.dispatch.cloudrun" in log and "Retry in" in log and "started Cloud Run execution" not in log
    print(f"\nSIGKILLed driver: redelivered, re-attached, run complete {time.monotonic() - killed_at:.1f}s "
          "after the kill; 1 execution")  # fmt: skip


@pytest.mark.slow
def test_cancelling_the_run_cancels_its_execution(worker: WorkerProcess, cloud_worker: WorkerProcess,
                                                  cloudrun: LocalCloudRun) -> None:  # fmt: skip
    run = registry.get("dt_one").start(step="cr_probe", sleep=30)

    def running() -> Any:
        found = executions_of(cloudrun, run.id)
        return found and found[0].running_count == 1 and found[0]

    execution = wait_until(running, timeout=30, what="the execution running")
    started = time.monotonic()
    assert run.cancel()

    def ended() -> Any:
        now = cloudrun.executions()
        return next((e for e in now if e.name == execution.name and e.completion_time), None)

    done = wait_until(ended, timeout=30, what="the execution cancelled")
    assert (done.cancelled_count, done.succeeded_count) == (1, 0)
    wait_until(lambda: step_of(run.id, "0:cr_probe").status is StepStatus.CANCELLED, timeout=10, what="step cancelled")
    assert run.status().status is RunStatus.CANCELLED
    print(f"\ncancel: execution ended {time.monotonic() - started:.2f}s after run.cancel()")


def test_cancel_executions_cancels_recorded_running_executions(cloudrun: LocalCloudRun,
                                                               settings_env: Callable[..., None]) -> None:  # fmt: skip
    from haulage.dispatch.driver import cancel_executions
    from haulage.progress.models import RunRecord

    jobs, executions = make_clients(cloudrun.address, TOKEN)
    name = jobs.run_job(name=SLEEPER, timeout=5).metadata.name
    jobs.transport.close()
    run_id = f"cancel-{time.time_ns()}"
    store = get_store()
    store.create_run(RunRecord(id=run_id, workflow="dt_one"))
    store.put_step(run_id, StepRecord("0:a", "a", StepStatus.RUNNING, backend="cloudrun", execution=name))
    store.put_step(run_id, StepRecord("0:b", "b", StepStatus.COMPLETE, backend="cloudrun", execution=name + "x"))
    settings_env(HAULAGE_CLOUDRUN_ENDPOINT=cloudrun.address, HAULAGE_CLOUDRUN_TOKEN=TOKEN)
    assert cancel_executions(run_id) == [name]
    wait_until(lambda: [e for e in cloudrun.executions() if e.name == name and e.completion_time], timeout=10,
               what="the execution cancelled")  # fmt: skip
    assert cancel_executions(run_id) == []  # already ended: nothing to cancel, no error


@pytest.mark.slow
def test_haulage_deadline_cancels_a_stuck_execution(worker: WorkerProcess, cloud_worker: WorkerProcess,
                                                    cloudrun: LocalCloudRun, faults: Faults) -> None:  # fmt: skip
    faults.start_delay = 60  # the task never starts, so Cloud Run's own timeout never fires
    run, seconds = timed_run("dt_one", step="deadline_probe")
    record = run.status()
    assert record.status is RunStatus.FAILED
    assert "ExecutionDeadlineExceeded" in (record.error or "")
    [execution] = executions_of(cloudrun, run.id)
    wait_until(lambda: [e for e in cloudrun.executions() if e.name == execution.name and e.cancelled_count == 1],
               timeout=10, what="the execution cancelled")  # fmt: skip
    step = step_of(run.id, "0:deadline_probe")
    assert (step.status, step.error_type, step.backend) == (StepStatus.FAILED, "ExecutionDeadlineExceeded", "cloudrun")
    # hard_timeout 1 s + the workers' margin of 5 s, counted from the execution's creation.
    assert 5.5 < seconds < 20
    print(f"\nHaulage's deadline (1 s step timeout + 5 s margin): run failed after {seconds:.2f}s")


@pytest.mark.slow
def test_cloud_run_timeout_fails_the_attempt(worker: WorkerProcess, cloud_worker: WorkerProcess,
                                             cloudrun: LocalCloudRun) -> None:  # fmt: skip
    run, _ = timed_run("dt_one", step="timeout_probe", sleep=30)
    record = run.status()
    assert record.status is RunStatus.FAILED
    assert "ExecutionFailed" in (record.error or "") and "timed out" in (record.error or "")
    assert sorted(env_of(e)["HAULAGE_ATTEMPT"] for e in executions_of(cloudrun, run.id)) == ["1", "2"]
    step = step_of(run.id, "0:timeout_probe")
    assert (step.status, step.attempt, step.error_type) == (StepStatus.FAILED, 2, "ExecutionFailed")
