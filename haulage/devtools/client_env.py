"""A second shell finds the dev stack by itself: the CLI reads `.haulage/env` when nothing says otherwise.

`haulage dev` writes the settings its workers run with to ``<dev dir>/env``
(``export NAME=VALUE`` lines, for ``source`` too) and removes the file when it
stops. A `haulage` command run in the same folder without HAULAGE_REDIS_URL
adopts them, so that it writes runs where the workers read them, and says so
on stderr. A file whose stack was killed (its pid is gone) is ignored, also
with a word.

The file sits in a folder that may come from anywhere (a cloned repository),
so it is trusted only as far as `haulage dev` writes it: it must name the pid
of its stack, only Haulage's own variables and the emulator's are taken, and
only when its Redis is on this machine's loopback.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import MutableMapping
from pathlib import Path
from urllib.parse import urlsplit

_PID = re.compile(r"^# written by haulage dev, pid (\d+)")
#: what `haulage dev` writes besides HAULAGE_* (never credentials or paths to them)
_ALSO_TAKEN = {"FIRESTORE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_env_file(path: Path) -> tuple[int | None, dict[str, str]]:
    """The pid of the stack that wrote ``path`` (None if unnamed) and its variables."""
    pid: int | None = None
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        found = _PID.match(line)
        if found:
            pid = int(found.group(1))
            continue
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            values[name] = value
    return pid, values


def adopt_dev_env(environ: MutableMapping[str, str] | None = None) -> str:
    """Take the running dev stack's settings into the environment when HAULAGE_REDIS_URL is unset.

    Returns the line to tell the user ("" when nothing was read). Variables
    already set in the environment win over the file's.
    """
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    if env.get("HAULAGE_REDIS_URL", "").strip():
        return ""
    path = Path(env.get("HAULAGE_DEV_DIR", "").strip() or ".haulage") / "env"
    try:
        pid, values = read_env_file(path)
    except (OSError, ValueError):
        return ""
    if pid is None:
        return f"haulage: ignoring {path}: `haulage dev` did not write it (no pid line)"
    if not _alive(pid):
        return f"haulage: ignoring {path}: the `haulage dev` that wrote it (pid {pid}) is gone"
    if urlsplit(values.get("HAULAGE_REDIS_URL", "")).hostname not in _LOOPBACK:
        return f"haulage: ignoring {path}: its HAULAGE_REDIS_URL is not on this machine's loopback"
    for name, value in values.items():
        if name.startswith("HAULAGE_") or name in _ALSO_TAKEN:
            env.setdefault(name, value)
    return f"haulage: using the dev stack's settings from {path} (HAULAGE_REDIS_URL={values.get('HAULAGE_REDIS_URL')})"
