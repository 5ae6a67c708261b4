"""The Cloud Run job's settings come from a mounted file, not from its environment.

Anyone allowed to run the job with overrides (``run.jobs.runWithOverrides``)
chooses its environment: with settings read from there, such a caller pointed
``HAULAGE_REDIS_URL`` at a Redis of their own and ran any step with any
parameters, or set ``PYTHONWARNINGS`` and ``BROWSER`` to run a shell command
before the job started. So the job (run as ``python -I``, which ignores every
``PYTHON*`` variable and leaves the current folder off ``sys.path``):

- reads its settings (Redis URL, store, project, modules...), the folders to
  import the application from and the path of its hand-off key from a JSON file
  (``HAULAGE_JOB_CONFIG_FILE``, default :data:`DEFAULT_CONFIG_FILE`: a mounted
  ConfigMap-like secret on Cloud Run, a 0600 file under ``.haulage`` in dev);
- keeps, of its environment, only the overrides Haulage documents
  (:data:`OVERRIDES`), the variables Cloud Run and the OS set, and the names the
  file lists in ``keep_env``; every other variable is removed before anything
  reads it, and named in the log.

The file must be a regular file outside ``/proc``, ``/sys`` and ``/dev`` (an
override cannot point it at ``/proc/self/environ``, whose text the caller
writes) and carry the ``haulage_job_config`` marker, which no file written for
another purpose has.

Example file::

    {"haulage_job_config": 1,
     "settings": {"HAULAGE_REDIS_URL": "redis://10.0.0.3:6379/0", "HAULAGE_MODULES": "workflows",
                  "HAULAGE_STORE": "firestore", "HAULAGE_FIRESTORE_PROJECT": "my-project"},
     "python_path": ["/app"],
     "handoff_key_file": "/secrets/haulage/handoff-key",
     "keep_env": []}
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from haulage.errors import ConfigError

CONFIG_ENV = "HAULAGE_JOB_CONFIG_FILE"
DEFAULT_CONFIG_FILE = "/etc/haulage/job/config.json"
DEFAULT_KEY_FILE = "/secrets/haulage/handoff-key"
#: the marker (and format version) a job config file must carry
MARKER = "haulage_job_config"
VERSION = 1

# The env overrides the dispatcher gives an execution: the only variables a caller's override may set.
ENV_JOB_NAME = "JOB_NAME"
ENV_RUN_ID = "HAULAGE_RUN_ID"
ENV_STEP_KEY = "HAULAGE_STEP_KEY"
ENV_ATTEMPT = "HAULAGE_ATTEMPT"
#: the job's full resource name, so the container can name its own execution
ENV_JOB = "HAULAGE_CLOUDRUN_JOB"
#: the dispatcher's HMAC over the hand-off (:func:`haulage.dispatch.handoff.sign`)
ENV_SIGNATURE = "HAULAGE_HANDOFF_SIGNATURE"
OVERRIDES = frozenset({ENV_JOB_NAME, ENV_RUN_ID, ENV_STEP_KEY, ENV_ATTEMPT, ENV_JOB, ENV_SIGNATURE})

#: what the OS and Cloud Run set, kept as they are (Cloud Run reserves CLOUD_RUN_* and K_*)
_KEPT = frozenset({"PATH", "HOME", "HOSTNAME", "LANG", "LC_ALL", "TZ", "TERM", "PWD", "TMPDIR", "PORT", CONFIG_ENV})
_KEPT_PREFIXES = ("CLOUD_RUN_", "K_", "LC_")  # LC_CTYPE: Python sets it itself in a C locale (PEP 538)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: where a config or key file may not live: their text is the process's own, or a caller's
_SPECIAL = (Path("/proc"), Path("/sys"), Path("/dev"))
_FIELDS = {MARKER, "settings", "python_path", "handoff_key_file", "keep_env"}
#: bytes; a shorter hand-off key is refused (HMAC-SHA256 wants at least its output's length)
MIN_KEY_BYTES = 32


@dataclass(frozen=True)
class JobConfig:
    """What the job reads from its config file."""

    settings: dict[str, str]  #: environment variables the job runs with (HAULAGE_* and the like)
    python_path: tuple[str, ...]  #: folders put first on sys.path: the application's code (``-I`` drops cwd)
    handoff_key_file: Path
    keep_env: tuple[str, ...]  #: more variable names to keep from the environment (the application's own)

    @classmethod
    def load(cls, path: Path) -> JobConfig:
        """Read and check ``path``; ConfigError names the file and what is wrong with it."""
        checked = regular_file(path, what="the job config file")
        try:
            data = json.loads(checked.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"cannot read the job config file {path}: {exc}") from None
        if not isinstance(data, dict) or data.get(MARKER) != VERSION:
            raise ConfigError(f"{path} is not a Haulage job config file (it needs \"{MARKER}\": {VERSION})")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ConfigError(f"the job config file {path} has unknown field(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(_FIELDS))}")  # fmt: skip
        settings = data.get("settings", {})
        if not isinstance(settings, dict) or not all(
            isinstance(k, str) and _NAME.match(k) and isinstance(v, str) for k, v in settings.items()
        ):
            raise ConfigError(f"{path}: settings must map variable names to strings")
        if CONFIG_ENV in settings or set(settings) & OVERRIDES:
            raise ConfigError(f"{path}: settings may not set {CONFIG_ENV} or the per-execution overrides")
        python_path, keep_env = data.get("python_path", []), data.get("keep_env", [])
        for field, value in (("python_path", python_path), ("keep_env", keep_env)):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{path}: {field} must be a list of strings")
        key_file = data.get("handoff_key_file", DEFAULT_KEY_FILE)
        if not isinstance(key_file, str) or not key_file:
            raise ConfigError(f"{path}: handoff_key_file must be a path")
        return cls(dict(settings), tuple(python_path), Path(key_file), tuple(keep_env))

    def apply(self, environ: MutableMapping[str, str]) -> list[str]:
        """Replace ``environ`` with the kept variables and the file's settings; return the names removed."""
        keep = set(self.keep_env)
        removed = sorted(name for name in environ if not _kept(name, keep))
        for name in removed:
            del environ[name]  # os.environ: unsetenv too, so C libraries (gRPC's proxy lookup) see it gone
        environ.update(self.settings)
        return removed


def _kept(name: str, keep: set[str]) -> bool:
    return name in OVERRIDES or name in _KEPT or name in keep or name.startswith(_KEPT_PREFIXES)


def regular_file(path: Path, *, what: str) -> Path:
    """``path`` resolved, if it is a regular file outside /proc, /sys and /dev; ConfigError otherwise."""
    real = Path(os.path.realpath(path))
    if any(real == special or special in real.parents for special in _SPECIAL):
        raise ConfigError(f"{what} {path} resolves to {real}, under /proc, /sys or /dev; it must be a mounted file")
    if not real.is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a regular file")
    return real


def read_key(path: Path) -> bytes:
    """The hand-off key in ``path`` (a mounted secret); ConfigError says what is wrong with it."""
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the hand-off key file {path}: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the hand-off key file {path} holds {len(key)} bytes; it needs at least {MIN_KEY_BYTES} "
                          "(e.g. head -c 48 /dev/urandom | base64)")  # fmt: skip
    return key


def config_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(CONFIG_ENV, "").strip() or DEFAULT_CONFIG_FILE)


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (0600), whatever the umask; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        out.write(text)
    return path


def write_key_file(path: Path) -> Path:
    """A fresh random hand-off key in ``path`` (0600), as a mounted secret would hold it."""
    return write_private(path, secrets.token_urlsafe(48) + "\n")


def write_job_config(path: Path, *, settings: Mapping[str, str], python_path: Iterable[str], handoff_key_file: Path,
                     keep_env: Iterable[str] = ()) -> Path:  # fmt: skip
    """Write a job config file (0600) that :meth:`JobConfig.load` accepts; return its path."""
    data = {MARKER: VERSION, "settings": dict(settings), "python_path": [str(p) for p in python_path],
            "handoff_key_file": str(handoff_key_file), "keep_env": list(keep_env)}  # fmt: skip
    return write_private(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
