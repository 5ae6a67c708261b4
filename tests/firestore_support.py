"""The Firestore emulator for tests (and benchmarks, and `haulage dev`).

:func:`start_emulator` starts one on free ports and returns its host and a
stop function; :func:`firestore_store_for_tests` is the contract suite's
fixture body: one emulator per test session, a FirestoreStore on a fresh
collection per test, and the emulator's data wiped after it.

The emulator comes with the Google Cloud CLI (``gcloud components install
cloud-firestore-emulator``, or Debian's ``google-cloud-cli-firestore-emulator``)
and needs Java. Without it the Firestore tests skip locally, and fail when the
environment variable CI is "true": in CI they must run.
"""

from __future__ import annotations

import atexit
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from haulage.devtools.firestore_emulator import EmulatorMissing, reset_emulator, start_emulator

if TYPE_CHECKING:
    from haulage.progress.firestore import FirestoreStore

#: the project id the tests' emulator serves
TEST_PROJECT = "haulage-test"

_session: tuple[str, Callable[[], None]] | None = None
_session_missing: str | None = None  # why the emulator could not start, so later tests do not try again
_session_lock = threading.Lock()


def session_emulator() -> str:
    """The emulator shared by this test session (started on first use, stopped at exit); sets FIRESTORE_EMULATOR_HOST.

    Skips the calling test when the emulator is not installed, or fails it when CI is "true".
    """
    global _session, _session_missing
    with _session_lock:
        if _session is None and _session_missing is None:
            try:
                _session = start_emulator(TEST_PROJECT)
                atexit.register(_session[1])
            except EmulatorMissing as exc:
                _session_missing = str(exc)
        if _session is None:
            if os.environ.get("CI", "").strip().lower() == "true":
                pytest.fail(
                    f"Firestore emulator not installed, and CI must run the Firestore tests: {_session_missing}"
                )
            pytest.skip(f"Firestore emulator not installed: {_session_missing}")
    host = _session[0]
    os.environ["FIRESTORE_EMULATOR_HOST"] = host
    return host


def firestore_store_for_tests(coalesce_seconds: float = 1.0) -> Iterator[FirestoreStore]:
    """Yield a FirestoreStore on a fresh collection of the session's emulator; write, close and wipe after."""
    host = session_emulator()
    # Imported here: google-cloud-firestore is an optional extra, and this module is imported without it.
    from haulage.progress.firestore import FirestoreStore

    store = FirestoreStore(project=TEST_PROJECT, collection=f"tasks-{uuid.uuid4().hex[:12]}",
                           coalesce_seconds=coalesce_seconds)  # fmt: skip
    try:
        yield store
    finally:
        try:
            store.close()
        finally:
            reset_emulator(host, TEST_PROJECT)
