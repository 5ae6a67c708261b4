"""The local Cloud Run Jobs server, driven by the real google-cloud-run (run_v2) clients."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api_core import exceptions
from google.api_core.future import polling
from google.api_core.operation import Operation
from google.cloud import run_v2

from haulage.devtools.local_cloudrun import Faults, LocalCloudRun, make_clients
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
JOB = "projects/test-project/locations/local/jobs/step"
EXECUTION_NAME = re.compile(rf"^{JOB}/executions/step-[a-z0-9]{{5}}$")
State = run_v2.Condition.State
Reason = run_v2.Condition.ExecutionReason
Overrides = run_v2.RunJobRequest.Overrides

# The client's default polling waits 1 s and more between GetOperation calls.
FAST_POLLING = polling.DEFAULT_POLLING.with_delay(initial=0.05, maximum=0.2)

# The task: records its pid, argv and environment, then does what MODE says.
TASK_SCRIPT = r"""
import json, os, signal, sys, time

out_dir = os.environ["OUT_DIR"]
tag = f"task-{os.environ['CLOUD_RUN_TASK_INDEX']}-{os.environ['CLOUD_RUN_TASK_ATTEMPT']}"
record = {"pid": os.getpid(), "argv": sys.argv[1:], "env": dict(os.environ),
          "started": time.time()}
mode = os.environ.get("MODE", "ok")
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(os.path.join(out_dir, tag + ".tmp"), "w") as f:
    json.dump(record, f)
os.replace(os.path.join(out_dir, tag + ".tmp"), os.path.join(out_dir, tag + ".json"))
print(f"{tag} ran", flush=True)
if mode in ("sleep", "ignore-term"):
    time.sleep(120)
elif mode == "nap":
    time.sleep(0.3)
elif mode == "fail":
    sys.exit(3)
elif mode == "fail-first-attempt" and os.environ["CLOUD_RUN_TASK_ATTEMPT"] == "0":
    sys.exit(4)
"""


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "task.py"
    path.write_text(TASK_SCRIPT)
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


class Harness:
    """A server started in-process on port 0, and real clients talking to it."""

    def __init__(self, script: Path, out_dir: Path, tmp_path: Path) -> None:
        self.script = script
        self.out_dir = out_dir
        self.tmp_path = tmp_path
        self.servers: list[LocalCloudRun] = []
        self.channels: list[run_v2.JobsClient] = []

    def start(self, **options: Any) -> tuple[LocalCloudRun, run_v2.JobsClient, run_v2.ExecutionsClient]:
        options.setdefault("command", [sys.executable, str(self.script)])
        options.setdefault("jobs", ["step"])
        options.setdefault("log_dir", self.tmp_path / "logs")
        options.setdefault("cancel_grace", 0.5)
        options.setdefault("allowed_env", None)  # these tests use the server as a generic Cloud Run fake
        server = LocalCloudRun(**options)
        self.servers.append(server)
        server.start(port=0)
        jobs, executions = make_clients(server.address, server.token)
        self.channels.append(jobs)
        return server, jobs, executions

    def run(
        self,
        jobs: run_v2.JobsClient,
        env: dict[str, str] | None = None,
        task_count: int = 0,
        task_timeout: timedelta | None = None,
        args: list[str] | None = None,
        **call: Any,
    ) -> Operation:
        all_env = {"OUT_DIR": str(self.out_dir), **(env or {})}
        overrides = Overrides(
            container_overrides=[
                Overrides.ContainerOverride(
                    env=[run_v2.EnvVar(name=k, value=v) for k, v in all_env.items()],
                    args=args or [],
                )
            ],
            task_count=task_count,
        )
        if task_timeout is not None:
            overrides.timeout = task_timeout
        return jobs.run_job(request=run_v2.RunJobRequest(name=JOB, overrides=overrides), **call)

    def record(self, index: int, attempt: int = 0) -> dict[str, Any]:
        path = self.out_dir / f"task-{index}-{attempt}.json"
        wait_until(path.exists, timeout=10, interval=0.02, what=f"{path.name} to be written")
        record: dict[str, Any] = json.loads(path.read_text())
        return record

    def close(self) -> None:
        for jobs in self.channels:
            jobs.transport.close()
        for server in self.servers:
            server.stop()


@pytest.fixture
def harness(script: Path, out_dir: Path, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(script, out_dir, tmp_path)
    yield h
    h.close()


def wait_completed(executions: run_v2.ExecutionsClient, name: str) -> run_v2.Execution:
    def completed() -> run_v2.Execution | None:
        execution = executions.get_execution(name=name)
        # Unset timestamps read as None in proto-plus.
        return execution if execution.completion_time is not None else None

    return wait_until(completed, timeout=10, interval=0.02, what=f"{name} to complete")


def completed_condition(execution: run_v2.Execution) -> run_v2.Condition:
    (condition,) = [c for c in execution.conditions if c.type_ == "Completed"]
    return condition


# --------------------------------------------------------------------------- running


def test_task_gets_cloud_run_env_overrides_and_args(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_CLOUDRUN_INHERITED", "from-server")
    _, jobs, executions = harness.start()
    operation = harness.run(
        jobs,
        env={"HAULAGE_RUN_ID": "run-1", "HAULAGE_STEP_KEY": "0:s"},
        args=["--flag", "x"],
    )

    # The metadata names the execution in the first answer, before it ends.
    name = operation.metadata.name
    assert EXECUTION_NAME.match(name)
    result = operation.result(timeout=10, polling=FAST_POLLING)
    assert result.name == name
    assert result.succeeded_count == 1
    assert (result.failed_count, result.cancelled_count, result.running_count) == (
        0,
        0,
        0,
    )

    record = harness.record(0)
    env = record["env"]
    assert record["pid"] != os.getpid()
    assert record["argv"] == ["--flag", "x"]
    assert env["CLOUD_RUN_JOB"] == "step"
    assert env["CLOUD_RUN_EXECUTION"] == name.rsplit("/", 1)[1]
    assert (env["CLOUD_RUN_TASK_INDEX"], env["CLOUD_RUN_TASK_COUNT"]) == ("0", "1")
    assert env["CLOUD_RUN_TASK_ATTEMPT"] == "0"
    assert (env["HAULAGE_RUN_ID"], env["HAULAGE_STEP_KEY"]) == ("run-1", "0:s")
    assert env["LOCAL_CLOUDRUN_INHERITED"] == "from-server"

    execution = executions.get_execution(name=name)
    assert (execution.task_count, execution.parallelism, execution.job) == (
        1,
        1,
        "step",
    )
    assert execution.create_time <= execution.start_time <= execution.completion_time
    assert execution.reconciling is False
    condition = completed_condition(execution)
    assert condition.state == State.CONDITION_SUCCEEDED
    assert "succeeded" in condition.message
    container_env = {v.name: v.value for v in execution.template.containers[0].env}
    assert container_env["HAULAGE_RUN_ID"] == "run-1"
    assert execution.log_uri.startswith("file://")
    log = Path(execution.log_uri.removeprefix("file://")) / "task-0-attempt-0.log"
    assert "task-0-0 ran" in log.read_text()


def test_three_tasks_run_with_indexes_0_to_2(harness: Harness) -> None:
    _, jobs, executions = harness.start()
    operation = harness.run(jobs, task_count=3)
    result = operation.result(timeout=10, polling=FAST_POLLING)

    assert (result.task_count, result.succeeded_count, result.failed_count) == (3, 3, 0)
    records = [harness.record(i) for i in range(3)]
    assert sorted(r["env"]["CLOUD_RUN_TASK_INDEX"] for r in records) == ["0", "1", "2"]
    assert {r["env"]["CLOUD_RUN_TASK_COUNT"] for r in records} == {"3"}
    assert len({r["pid"] for r in records}) == 3
    assert executions.get_execution(name=result.name).succeeded_count == 3


def test_parallelism_caps_tasks_running_at_once(harness: Harness) -> None:
    _, jobs, executions = harness.start(parallelism=1)
    operation = harness.run(jobs, env={"MODE": "nap"}, task_count=2)
    name = operation.metadata.name
    seen_running = set()
    deadline = time.monotonic() + 10
    while (execution := executions.get_execution(name=name)).completion_time is None:
        seen_running.add(execution.running_count)
        assert time.monotonic() < deadline, "execution did not complete within 10s"
        time.sleep(0.02)
    assert execution.parallelism == 1
    assert seen_running <= {0, 1}
    assert execution.succeeded_count == 2
    first, second = sorted((harness.record(i) for i in range(2)), key=lambda r: r["started"])
    assert second["started"] >= first["started"] + 0.3  # the second began after the first's nap


def test_failing_task_fails_the_execution(harness: Harness) -> None:
    _, jobs, executions = harness.start()
    operation = harness.run(jobs, env={"MODE": "fail"})

    # The operation of a failed execution completes with an error, so
    # result() raises; the Execution stays readable from the metadata.
    with pytest.raises(exceptions.FailedPrecondition, match="exit code 3"):
        operation.result(timeout=10, polling=FAST_POLLING)
    execution = executions.get_execution(name=operation.metadata.name)
    assert (execution.failed_count, execution.succeeded_count) == (1, 0)
    condition = completed_condition(execution)
    assert condition.state == State.CONDITION_FAILED
    assert condition.execution_reason == Reason.NON_ZERO_EXIT_CODE
    assert "exit code 3" in condition.message


def test_failed_task_is_retried_with_next_attempt_number(harness: Harness) -> None:
    _, jobs, _ = harness.start(max_retries=2)
    result = harness.run(jobs, env={"MODE": "fail-first-attempt"}).result(timeout=10, polling=FAST_POLLING)
    assert (result.succeeded_count, result.failed_count, result.retried_count) == (
        1,
        0,
        1,
    )
    assert harness.record(0, attempt=1)["env"]["CLOUD_RUN_TASK_ATTEMPT"] == "1"


def test_task_failing_every_attempt_fails_after_max_retries(harness: Harness) -> None:
    _, jobs, executions = harness.start(max_retries=1)
    operation = harness.run(jobs, env={"MODE": "fail"})
    execution = wait_completed(executions, operation.metadata.name)
    assert (execution.failed_count, execution.retried_count) == (1, 1)
    assert harness.record(0, attempt=1)
    assert not (harness.out_dir / "task-0-2.json").exists()


def test_timeout_kills_the_task_and_counts_it_failed(harness: Harness) -> None:
    _, jobs, executions = harness.start()
    started = time.monotonic()
    operation = harness.run(jobs, env={"MODE": "sleep"}, task_timeout=timedelta(seconds=0.5))
    pid = harness.record(0)["pid"]
    execution = wait_completed(executions, operation.metadata.name)

    assert time.monotonic() - started < 10
    assert (execution.failed_count, execution.succeeded_count) == (1, 0)
    assert "timed out" in completed_condition(execution).message
    assert execution.template.timeout == timedelta(seconds=0.5)
    assert pid_gone(pid)


# --------------------------------------------------------------------------- cancelling


def test_cancel_kills_running_task_and_skips_pending_ones(harness: Harness) -> None:
    _, jobs, executions = harness.start(parallelism=1)
    run_operation = harness.run(jobs, env={"MODE": "sleep"}, task_count=3)
    name = run_operation.metadata.name
    pid = harness.record(0)["pid"]
    wait_until(
        lambda: executions.get_execution(name=name).running_count == 1, timeout=10, interval=0.02, what="a running task"
    )

    cancelled = executions.cancel_execution(name=name).result(timeout=10, polling=FAST_POLLING)

    assert (
        cancelled.cancelled_count,
        cancelled.succeeded_count,
        cancelled.failed_count,
    ) == (
        3,
        0,
        0,
    )
    assert cancelled.running_count == 0
    assert pid_gone(pid)
    assert not list(harness.out_dir.glob("task-[12]-*.json"))  # pending tasks never started
    condition = completed_condition(cancelled)
    assert (condition.state, condition.execution_reason) == (
        State.CONDITION_FAILED,
        Reason.CANCELLED,
    )
    # As in production, a cancelled execution's RunJob operation ends without an error.
    assert run_operation.result(timeout=10, polling=FAST_POLLING).cancelled_count == 3


def test_cancel_sends_sigkill_when_the_task_ignores_sigterm(harness: Harness) -> None:
    _, jobs, executions = harness.start(cancel_grace=0.3)
    name = harness.run(jobs, env={"MODE": "ignore-term"}).metadata.name
    pid = harness.record(0)["pid"]

    executions.cancel_execution(name=name)
    execution = wait_completed(executions, name)
    assert execution.cancelled_count == 1
    assert pid_gone(pid)


def test_cancel_of_a_completed_execution_is_refused(harness: Harness) -> None:
    _, jobs, executions = harness.start()
    result = harness.run(jobs).result(timeout=10, polling=FAST_POLLING)
    with pytest.raises(exceptions.FailedPrecondition, match="already completed"):
        executions.cancel_execution(name=result.name)


def test_stop_kills_running_tasks(harness: Harness) -> None:
    server, jobs, _ = harness.start()
    harness.run(jobs, env={"MODE": "sleep"})
    pid = harness.record(0)["pid"]
    server.stop()
    assert pid_gone(pid)
    assert server.executions()[0].cancelled_count == 1


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.UNAVAILABLE, exceptions.ServiceUnavailable),
        (grpc.StatusCode.PERMISSION_DENIED, exceptions.PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, exceptions.ResourceExhausted),
    ],
)
def test_run_job_error_raises_in_the_client_and_creates_nothing(
    harness: Harness, code: grpc.StatusCode, error: type[Exception]
) -> None:
    server, jobs, executions = harness.start(faults=Faults(run_job_error=code))
    with pytest.raises(error, match="injected fault"):
        harness.run(jobs)
    assert server.call_counts["RunJob"] == 1  # the client does not retry RunJob
    assert list(executions.list_executions(parent=JOB)) == []


def test_run_job_error_after_create_leaves_a_running_execution(
    harness: Harness,
) -> None:
    _, jobs, executions = harness.start(
        faults=Faults(run_job_error=grpc.StatusCode.UNAVAILABLE, run_job_error_after_create=True)
    )
    with pytest.raises(exceptions.ServiceUnavailable):
        harness.run(jobs, env={"HAULAGE_STEP_KEY": "ambiguous"})
    (execution,) = executions.list_executions(parent=JOB)
    assert {v.name: v.value for v in execution.template.containers[0].env}["HAULAGE_STEP_KEY"] == "ambiguous"
    assert wait_completed(executions, execution.name).succeeded_count == 1


def test_slow_run_job_past_the_client_deadline_still_starts_the_execution(
    harness: Harness,
) -> None:
    _, jobs, executions = harness.start(faults=Faults(run_job_delay=1.0))
    started = time.monotonic()
    with pytest.raises(exceptions.DeadlineExceeded):
        harness.run(jobs, env={"HAULAGE_RUN_ID": "slow"}, timeout=0.2)  # client deadline
    assert time.monotonic() - started < 1.0
    (execution,) = executions.list_executions(parent=JOB)
    assert wait_completed(executions, execution.name).succeeded_count == 1


def test_fail_task_indexes_fail_without_running_the_command(harness: Harness) -> None:
    _, jobs, executions = harness.start(faults=Faults(fail_task_indexes={1}))
    execution = wait_completed(executions, harness.run(jobs, task_count=3).metadata.name)
    assert (execution.succeeded_count, execution.failed_count) == (2, 1)
    assert not list(harness.out_dir.glob("task-1-*.json"))
    assert "injected fault" in completed_condition(execution).message


def test_start_delay_holds_tasks_back(harness: Harness) -> None:
    _, jobs, executions = harness.start(faults=Faults(start_delay=0.5))
    name = harness.run(jobs).metadata.name
    waiting = executions.get_execution(name=name)
    assert waiting.start_time is None
    assert waiting.running_count == 0
    assert completed_condition(waiting).state == State.CONDITION_PENDING

    execution = wait_completed(executions, name)
    assert execution.succeeded_count == 1
    assert (execution.start_time - execution.create_time).total_seconds() >= 0.5


def test_get_execution_error(harness: Harness) -> None:
    server, jobs, executions = harness.start()
    name = harness.run(jobs).metadata.name
    server.faults.get_execution_error = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(exceptions.ServiceUnavailable):
        executions.get_execution(name=name)
    server.faults.get_execution_error = None
    assert wait_completed(executions, name).succeeded_count == 1


def test_faults_file_is_read_on_every_call(harness: Harness) -> None:
    faults_file = harness.tmp_path / "faults.json"
    _, jobs, _ = harness.start(faults_file=faults_file)
    Faults(run_job_error=grpc.StatusCode.PERMISSION_DENIED).write(faults_file)
    with pytest.raises(exceptions.PermissionDenied):
        harness.run(jobs)
    Faults().write(faults_file)
    assert harness.run(jobs).result(timeout=10, polling=FAST_POLLING).succeeded_count == 1


def test_faults_json_names_the_bad_field() -> None:
    assert Faults.from_json({"run_job_error": "UNAVAILABLE", "fail_task_indexes": [2]}) == Faults(
        run_job_error=grpc.StatusCode.UNAVAILABLE, fail_task_indexes={2}
    )
    with pytest.raises(ValueError, match="run_job_eror"):
        Faults.from_json({"run_job_eror": "UNAVAILABLE"})
    with pytest.raises(ValueError, match="run_job_error must be a gRPC status code"):
        Faults.from_json({"run_job_error": "NOPE"})
    with pytest.raises(ValueError, match="start_delay"):
        Faults.from_json({"start_delay": -1})
    faults = Faults(
        run_job_error=grpc.StatusCode.UNAVAILABLE,
        start_delay=1.5,
        fail_task_indexes={0, 3},
    )
    assert Faults.from_json(json.loads(json.dumps(faults.to_json()))) == faults


# --------------------------------------------------------------------------- lookups


def test_list_executions_newest_first_and_found_by_env(harness: Harness) -> None:
    _, jobs, executions = harness.start()
    names = [harness.run(jobs, env={"HAULAGE_RUN_ID": run_id}).metadata.name for run_id in ("a", "b", "c")]
    listed = list(executions.list_executions(parent=JOB))
    assert [e.name for e in listed] == names[::-1]

    def run_id(execution: run_v2.Execution) -> str:
        return {v.name: v.value for v in execution.template.containers[0].env}["HAULAGE_RUN_ID"]

    assert [e.name for e in listed if run_id(e) == "b"] == [names[1]]
    # Paging through the real client's pager gives the same list.
    paged = executions.list_executions(request=run_v2.ListExecutionsRequest(parent=JOB, page_size=2))
    assert [e.name for e in paged] == names[::-1]


def test_unknown_job_and_execution_are_not_found(harness: Harness) -> None:
    _, jobs, executions = harness.start()
    with pytest.raises(exceptions.NotFound, match="'other' .* not known"):
        jobs.run_job(name="projects/test-project/locations/local/jobs/other")
    with pytest.raises(exceptions.NotFound, match="not known"):
        executions.get_execution(name=f"{JOB}/executions/step-zzzzz")
    with pytest.raises(exceptions.NotFound):
        executions.list_executions(parent="projects/test-project/locations/local/jobs/other")
    with pytest.raises(exceptions.InvalidArgument, match="must look like"):
        jobs.get_job(name="step")


def test_get_job(harness: Harness) -> None:
    _, jobs, _ = harness.start(max_retries=2)
    harness.run(jobs).result(timeout=10, polling=FAST_POLLING)
    job = jobs.get_job(name=JOB)
    assert job.name == JOB
    assert job.execution_count == 1
    assert job.template.template.max_retries == 2
    assert job.latest_created_execution.name.startswith(f"{JOB}/executions/step-")


def test_per_job_command(harness: Harness, tmp_path: Path) -> None:
    other = tmp_path / "other.py"
    other.write_text(
        "import os, pathlib\npathlib.Path(os.environ['OUT_DIR'], 'other').write_text(os.environ['CLOUD_RUN_JOB'])\n"
    )
    _, jobs, _ = harness.start(jobs={"step": None, "other": [sys.executable, str(other)]})
    operation = jobs.run_job(
        request=run_v2.RunJobRequest(
            name="projects/test-project/locations/local/jobs/other",
            overrides=Overrides(
                container_overrides=[
                    Overrides.ContainerOverride(env=[run_v2.EnvVar(name="OUT_DIR", value=str(harness.out_dir))])
                ]
            ),
        )
    )
    assert operation.result(timeout=10, polling=FAST_POLLING).succeeded_count == 1
    assert (harness.out_dir / "other").read_text() == "other"


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="parallelism"):
        LocalCloudRun(parallelism=-1)
    with pytest.raises(ValueError, match="command"):
        LocalCloudRun(command=[])
    with pytest.raises(TypeError, match="jobs"):
        LocalCloudRun(jobs="step")


# --------------------------------------------------------------------------- as a program


CLI_TOKEN = "cli-token-0123456789abcdef"


def test_command_line_server_serves_obeys_faults_file_and_stops_on_sigterm(
    script: Path, out_dir: Path, tmp_path: Path
) -> None:
    faults_file = tmp_path / "faults.json"
    with (tmp_path / "server.log").open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "haulage.devtools.local_cloudrun",
                "--port",
                "0",
                "--command",
                f"{sys.executable} {script}",
                "--job",
                "step",
                "--log-dir",
                str(tmp_path / "logs"),
                "--faults-file",
                str(faults_file),
                "--cancel-grace",
                "0.5",
                "--any-env",
            ],
            env={**os.environ, "HAULAGE_CLOUDRUN_TOKEN": CLI_TOKEN},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def read_lines() -> None:
        for line in stdout:
            lines.put(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    jobs: run_v2.JobsClient | None = None
    try:
        first = lines.get(timeout=20)
        match = re.search(r"listening on (127\.0\.0\.1:\d+)", first)
        assert match, first
        jobs, _ = make_clients(match.group(1), CLI_TOKEN)
        harness = Harness(script, out_dir, tmp_path)

        assert harness.run(jobs).result(timeout=10, polling=FAST_POLLING).succeeded_count == 1
        record = harness.record(0)
        assert record["pid"] not in (os.getpid(), proc.pid)

        Faults(run_job_error=grpc.StatusCode.UNAVAILABLE).write(faults_file)
        with pytest.raises(exceptions.ServiceUnavailable):
            harness.run(jobs)
        Faults().write(faults_file)

        (out_dir / "task-0-0.json").unlink()
        harness.run(jobs, env={"MODE": "sleep"})
        sleeping_pid = harness.record(0)["pid"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert pid_gone(sleeping_pid)
        reader.join(timeout=5)
        assert lines.empty()  # the listening line is the only output
    finally:
        if jobs is not None:
            jobs.transport.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        stdout.close()
