"""Once-guards on Firestore: one document per guard in the run's ``guards`` subcollection.

A claim is one ``create`` (it fails if the document exists: create-if-absent
is the whole claim, no transaction); the rare paths that change a claim
someone else may also touch (a release, a take-over from a dead claimant) read
the document and write with its ``update_time`` as a precondition, which is
the compare in compare-and-set.
"""

from __future__ import annotations

from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from haulage.errors import StoreConflict
from haulage.progress.firestore.writer import CONFLICTS, MAX_ATTEMPTS


def _state(snap: Any) -> str | None:
    return str((snap.to_dict() or {}).get("state")) if snap.exists else None


def claim(ref: Any, key: str, token: str) -> str | None:
    """Claim the guard at ``ref`` for ``token``: None if claimed, else the state already there."""
    for _ in range(MAX_ATTEMPTS):
        try:
            ref.create({"key": key, "state": f"pending:{token}"})
            return None
        except gexc.AlreadyExists:
            state = _state(ref.get())
            if state is not None:
                return state
            # released between our create and our read: claim it again
    raise StoreConflict(f"guard {key!r} ({ref.path}) kept being claimed and released")


def replace(db: firestore.Client, ref: Any, expected: str, state: str) -> bool:
    """Set the guard to ``state`` only if it holds ``expected``; True if this call replaced it."""
    snap = ref.get()
    if _state(snap) != expected:
        return False
    try:
        ref.update({"state": state}, option=db.write_option(last_update_time=snap.update_time))
    except CONFLICTS:
        return False  # changed since we read it: someone else replaced it first
    return True


def finish(db: firestore.Client, ref: Any, key: str, token: str, done: bool) -> None:
    """Mark the guard done, or release it if ``token`` still holds the claim."""
    if done:
        ref.set({"key": key, "state": "done"})
        return
    for _ in range(MAX_ATTEMPTS):
        snap = ref.get()
        if _state(snap) != f"pending:{token}":
            return  # not held by this token (any more): leave it
        try:
            # Release only the claim we read: a precondition on its update_time
            # is the compare in compare-and-delete.
            ref.delete(option=db.write_option(last_update_time=snap.update_time))
            return
        except CONFLICTS:
            continue
    raise StoreConflict(f"guard {key!r} ({ref.path}) kept changing while being released")


def read_all(collection: Any) -> dict[str, Any]:
    """Every guard of a run: key -> state."""
    out = {}
    for snap in collection.stream():
        data = snap.to_dict() or {}
        out[data.get("key", snap.id)] = data.get("state")
    return out
