"""The Cloud Run job container's entrypoint: ``python -I -m haulage.dispatch.job`` (the workers' image and code).

Cloud Run starts it with the env overrides the dispatcher gave the execution
(``JOB_NAME`` = the step's name, ``HAULAGE_RUN_ID``, ``HAULAGE_STEP_KEY``,
``HAULAGE_ATTEMPT``, ``HAULAGE_HANDOFF_SIGNATURE``) and its own ``CLOUD_RUN_*``
variables. Whoever may run the job with overrides chooses that environment,
so the entrypoint trusts nothing else in it. In order:

1. checks the overrides (:class:`~haulage.dispatch.job_env.JobEnv`);
2. reads its config file (HAULAGE_JOB_CONFIG_FILE: settings, the folders to
   import the application from, the hand-off key's path) and replaces its
   environment with the overrides, the platform's variables and the file's
   settings (:mod:`haulage.dispatch.job_config`), before any module that reads
   settings is imported;
3. reads the hand-off key from its mounted secret file;
4. runs the step (:mod:`haulage.dispatch.job_runner`), which refuses a payload
   whose signature does not match.

``-I`` matters: without it, ``PYTHONWARNINGS`` (which imports a module named in
its value) and ``PYTHONSTARTUP``-like variables run before this file does. It
also leaves the current folder and PYTHONPATH off ``sys.path``, so the
application's folders come from the config file's ``python_path``.

It exits 0 when the step is done (or has nothing to do) and 1 when it failed
or was refused, with one log line saying which.

Example (what the local Cloud Run server runs for each task)::

    HAULAGE_JOB_CONFIG_FILE=.haulage/job/config.json JOB_NAME=analyze_page HAULAGE_RUN_ID=... \\
    HAULAGE_STEP_KEY='1:analyze_page[0]' HAULAGE_ATTEMPT=1 HAULAGE_HANDOFF_SIGNATURE=... \\
    CLOUD_RUN_TASK_INDEX=0 CLOUD_RUN_TASK_COUNT=1 python -I -m haulage.dispatch.job
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import MutableMapping

from haulage.dispatch.job_config import JobConfig, config_path, read_key, regular_file
from haulage.dispatch.job_env import JobEnv
from haulage.errors import ConfigError, JobError
from haulage.logs import configure
from haulage.settings import reset_settings

log = logging.getLogger("haulage.dispatch.job")


def configure_job(environ: MutableMapping[str, str]) -> tuple[JobEnv, bytes]:
    """Steps 1-3: the checked overrides and the hand-off key; ``environ`` now holds the config's settings.

    Raises JobError or ConfigError naming what is missing or wrong.
    """
    env = JobEnv.from_environ(environ)
    config = JobConfig.load(config_path(environ))
    removed = config.apply(environ)
    if removed:
        # Names only: values may be secrets. An override the job does not take is visible here.
        log.warning("haulage job: ignoring environment variable(s) %s: the job takes its settings from its "
                    "config file and only the documented overrides from its environment",
                    ", ".join(removed))  # fmt: skip
    for folder in reversed(config.python_path):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    reset_settings()
    key = read_key(regular_file(config.handoff_key_file, what="the hand-off key file"))
    return env, key


def main(environ: MutableMapping[str, str] | None = None) -> int:
    """Run the step named by the environment; return the exit status (0 done, 1 failed or refused)."""
    configure(logging.INFO)
    started = time.monotonic()
    try:
        env, key = configure_job(os.environ if environ is None else environ)
    except (JobError, ConfigError) as exc:
        log.error("haulage job: cannot start: %s", exc)
        return 1
    # Only now: importing the runner builds the Celery app, which reads the settings just applied.
    from haulage.dispatch import job_runner

    return job_runner.execute(env, key, started)


if __name__ == "__main__":
    sys.exit(main())
