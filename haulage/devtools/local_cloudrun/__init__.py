"""A local Cloud Run Jobs server: the real Cloud Run v2 gRPC protocol, tasks as subprocesses.

Development and tests drive it with the real ``google.cloud.run_v2`` clients, so
the dispatch code that talks to production Cloud Run is exercised unchanged.
It implements the methods that code calls (``services``):

- ``google.cloud.run.v2.Jobs``: ``RunJob`` (a long-running operation) and ``GetJob``;
- ``google.cloud.run.v2.Executions``: ``GetExecution``, ``ListExecutions``,
  ``CancelExecution`` (a long-running operation);
- ``google.longrunning.Operations``: ``GetOperation``, which the client's
  operation future polls on the same channel.

Each ``RunJob`` creates an execution (``executions``) whose tasks run as
subprocesses of a configurable command (default ``python -I -m haulage.dispatch.job``),
each in its own process group, with the environment Cloud Run gives a task
container (``runner``). Task output goes to one log file per attempt, under the
folder named by the execution's ``log_uri``.

As in production, the ``RunJob`` operation (``operations``) carries the
``Execution`` as its metadata from the first answer and is done only when the
execution completes: with the ``Execution`` as its response when no task failed
(a cancelled execution included), with an error when a task failed. Calling
``operation.result()`` therefore blocks for the whole execution.

Faults for tests (``Faults``) are set on the server object or, out of process,
in a JSON file that is re-read on every call.

Example::

    server = LocalCloudRun(command=[sys.executable, "-m", "haulage.dispatch.job"])
    server.start(port=0)
    jobs, executions = make_clients(server.address, server.token)
    operation = jobs.run_job(name="projects/p/locations/l/jobs/step")
    execution_name = operation.metadata.name   # available at once
    execution = executions.get_execution(name=execution_name)
    server.stop()

Command line::

    HAULAGE_CLOUDRUN_TOKEN=... python -m haulage.devtools.local_cloudrun --port 8123 --job haulage-step
"""

from __future__ import annotations

from haulage.devtools.local_cloudrun.cli import main
from haulage.devtools.local_cloudrun.clients import make_clients
from haulage.devtools.local_cloudrun.faults import Faults
from haulage.devtools.local_cloudrun.operations import FAILED_EXECUTION_CODE
from haulage.devtools.local_cloudrun.options import (
    DEFAULT_CANCEL_GRACE,
    DEFAULT_COMMAND,
    DEFAULT_HOST,
    DOCUMENTED_OVERRIDES,
)
from haulage.devtools.local_cloudrun.server import LocalCloudRun

__all__ = [
    # the server and its clients
    "LocalCloudRun",
    "make_clients",
    "Faults",
    # defaults and the failed-execution status code
    "DEFAULT_CANCEL_GRACE",
    "DEFAULT_COMMAND",
    "DEFAULT_HOST",
    "FAILED_EXECUTION_CODE",
    "DOCUMENTED_OVERRIDES",
    # the command line
    "main",
]
