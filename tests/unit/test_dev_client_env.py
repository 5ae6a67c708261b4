"""A second shell reads `.haulage/env` by itself: what it adopts, what wins, and a stale file ignored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from haulage.devtools.client_env import adopt_dev_env


def write_env(folder: Path, pid: int) -> None:
    (folder / ".haulage").mkdir()
    (folder / ".haulage" / "env").write_text(
        f"# written by haulage dev, pid {pid}; removed when it stops\n"
        "export HAULAGE_REDIS_URL=redis://127.0.0.1:6390/0\nexport HAULAGE_STORE=firestore\n"
    )


def test_the_running_stacks_settings_are_adopted_and_the_shells_own_win(tmp_path: Path) -> None:
    write_env(tmp_path, os.getpid())
    env = {"HAULAGE_DEV_DIR": str(tmp_path / ".haulage"), "HAULAGE_STORE": "redis"}
    note = adopt_dev_env(env)
    assert "using the dev stack's settings" in note and "redis://127.0.0.1:6390/0" in note
    assert env["HAULAGE_REDIS_URL"] == "redis://127.0.0.1:6390/0"
    assert env["HAULAGE_STORE"] == "redis"  # set in the shell: kept


def test_nothing_is_read_when_the_shell_names_its_redis(tmp_path: Path) -> None:
    write_env(tmp_path, os.getpid())
    env = {"HAULAGE_DEV_DIR": str(tmp_path / ".haulage"), "HAULAGE_REDIS_URL": "redis://elsewhere:6379/0"}
    assert adopt_dev_env(env) == ""
    assert "HAULAGE_STORE" not in env


def test_a_file_left_by_a_killed_stack_is_ignored_with_a_word(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_env(tmp_path, int(gone.stdout))
    env = {"HAULAGE_DEV_DIR": str(tmp_path / ".haulage")}
    assert "is gone" in adopt_dev_env(env)
    assert "HAULAGE_REDIS_URL" not in env


def test_a_planted_env_file_is_trusted_only_as_far_as_haulage_dev_writes_it(tmp_path: Path) -> None:
    """A cloned folder's .haulage/env cannot point the CLI at a remote Redis or set other variables."""
    folder = tmp_path / ".haulage"
    folder.mkdir()
    env_file = folder / "env"
    env: dict[str, str] = {"HAULAGE_DEV_DIR": str(folder)}
    env_file.write_text("export HAULAGE_REDIS_URL=redis://127.0.0.1:6390/0\n")
    assert "no pid line" in adopt_dev_env(env) and "HAULAGE_REDIS_URL" not in env
    env_file.write_text(f"# written by haulage dev, pid {os.getpid()}\nexport HAULAGE_REDIS_URL=redis://evil.example:6379/0\n")
    assert "not on this machine's loopback" in adopt_dev_env(env) and "HAULAGE_REDIS_URL" not in env
    env_file.write_text(f"# written by haulage dev, pid {os.getpid()}\nexport HAULAGE_REDIS_URL=redis://127.0.0.1:6390/0\n"
                        "export GOOGLE_APPLICATION_CREDENTIALS=/tmp/theirs.json\nexport PYTHONPATH=/tmp/theirs\n")
    assert "using the dev stack's settings" in adopt_dev_env(env)
    assert env["HAULAGE_REDIS_URL"] == "redis://127.0.0.1:6390/0"
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env and "PYTHONPATH" not in env
