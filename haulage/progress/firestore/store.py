"""The FirestoreStore: the Store protocol on Firestore, the production store.

Environment variables read here (see :meth:`FirestoreStore.from_settings`):

- ``HAULAGE_FIRESTORE_PROJECT``: the Google Cloud project; default ``GOOGLE_CLOUD_PROJECT``, else "haulage-dev".
- ``GOOGLE_CLOUD_PROJECT``: the fallback for the project above.
- ``HAULAGE_FIRESTORE_COLLECTION``: the collection of run documents; default "tasks".
- ``HAULAGE_FIRESTORE_DATABASE``: the Firestore database id; default "(default)".
- ``HAULAGE_FIRESTORE_COALESCE_SECONDS``: seconds between coalesced writes to one run document; default 1.0.

Read elsewhere but relevant: ``HAULAGE_HISTORY_LIMIT`` (events kept per run, via
``haulage.settings``) and ``FIRESTORE_EMULATOR_HOST`` (honoured by the client itself).

The layout of the documents and what readers in other processes see: the
package docstring (:mod:`haulage.progress.firestore`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from haulage.errors import ConfigError, StoreConflict
from haulage.progress.firestore import guards
from haulage.progress.firestore.buffer import Pending
from haulage.progress.firestore.encoding import (
    PRIVATE,
    decode_checkpoint,
    decode_run,
    decode_step,
    doc_id,
    encode_checkpoint,
    encode_run,
    encode_step,
    split_private,
    to_timestamp,
    user_fields,
)
from haulage.progress.firestore.exit_hooks import close_at_exit
from haulage.progress.firestore.feed import SnapshotFeed
from haulage.progress.firestore.writer import CONFLICTS, MAX_ATTEMPTS, PacedWriter
from haulage.progress.models import Checkpoint, RunRecord, RunStatus, RunUpdate, StepRecord, StepStatus, now
from haulage.settings import get_settings

DEFAULT_COLLECTION = "tasks"
DEFAULT_DATABASE = "(default)"
DEFAULT_PROJECT = "haulage-dev"
DEFAULT_COALESCE_SECONDS = 1.0  #: seconds between coalesced writes to one run document

STEPS, CHECKPOINTS, GUARDS, PRIVATE_COLLECTION = "steps", "checkpoints", "guards", "private"
#: the private subdocument's id (encoding.PRIVATE lists its fields)
ENGINE_DOC = "engine"
#: seconds between one process's heartbeat writes to a run's private subdocument (the reaper allows
#: HAULAGE_STALE_AFTER, 600 s by default; a 1,000-item fan-out must not write it 1,000 times a second)
HEARTBEAT_WRITE_SECONDS = 10.0
#: writes in one batch commit (Firestore allows 500)
ROWS_PER_BATCH = 500


class FirestoreStore:
    """Store backend on Firestore; see :class:`haulage.progress.store.Store` for the contract.

    Example::

        store = FirestoreStore(project="my-project", collection="tasks")
        store.update_run(run_id, RunUpdate(incr={"steps.done": 1}))  # buffered, written within a second
        store.close()  # writes what is buffered

    ``writes[run_id]`` counts the writes this instance made to each run
    document; ``conflicts[run_id]`` the commits a precondition refused (they
    wrote nothing and were retried). Both forget a run IDLE_SECONDS after this
    process last touched it.
    """

    def __init__(
        self,
        *,
        project: str = DEFAULT_PROJECT,
        collection: str = DEFAULT_COLLECTION,
        database: str = DEFAULT_DATABASE,
        coalesce_seconds: float = DEFAULT_COALESCE_SECONDS,
        client: firestore.Client | None = None,
    ) -> None:
        if not (coalesce_seconds >= 0 and math.isfinite(coalesce_seconds)):
            raise ConfigError(f"coalesce_seconds must be a finite number at least 0, got {coalesce_seconds!r}")
        self.project = project
        self.collection_name = collection
        self.database = database
        self.interval = coalesce_seconds  #: seconds
        #: other workers' buffered counters land within about two intervals
        self.settle_seconds = 2 * coalesce_seconds + 1.0
        self.writes: Counter[str] = Counter()
        self._beats: dict[str, float] = {}  #: run id -> monotonic time of this process's last heartbeat write
        self.conflicts: Counter[str] = Counter()
        self._given_client = client
        self._reset_process_state(closed=False)
        close_at_exit(self)

    @classmethod
    def from_settings(cls) -> FirestoreStore:
        """A store configured from the environment (HAULAGE_FIRESTORE_*; see the module docstring)."""
        project = (
            os.environ.get("HAULAGE_FIRESTORE_PROJECT", "").strip()
            or os.environ.get("GOOGLE_CLOUD_PROJECT", "").strip()
            or DEFAULT_PROJECT
        )
        collection = os.environ.get("HAULAGE_FIRESTORE_COLLECTION", "").strip() or DEFAULT_COLLECTION
        if "/" in collection:
            raise ConfigError(f"HAULAGE_FIRESTORE_COLLECTION must be a collection id without '/', got {collection!r}")
        database = os.environ.get("HAULAGE_FIRESTORE_DATABASE", "").strip() or DEFAULT_DATABASE
        raw = os.environ.get("HAULAGE_FIRESTORE_COALESCE_SECONDS", "").strip()
        try:
            interval = float(raw) if raw else DEFAULT_COALESCE_SECONDS
        except ValueError:
            raise ConfigError(f"HAULAGE_FIRESTORE_COALESCE_SECONDS must be a number of seconds, got {raw!r}") from None
        if not (interval >= 0 and math.isfinite(interval)):
            raise ConfigError(f"HAULAGE_FIRESTORE_COALESCE_SECONDS must be a finite number at least 0, got {raw!r}")
        return cls(project=project, collection=collection, database=database, coalesce_seconds=interval)

    # --- process state ---------------------------------------------------------------------------
    def _reset_process_state(self, *, closed: bool) -> None:
        # gRPC channels and threads do not survive fork: a Celery prefork child
        # builds its own client and writer, and leaves the parent's buffer to the parent.
        self._pid = os.getpid()
        self._client: firestore.Client | None = self._given_client
        self._writer = PacedWriter(interval=self.interval, db=lambda: self.db, collection=self.collection_name,
                                   writes=self.writes, conflicts=self.conflicts, closed=closed)  # fmt: skip

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._given_client = None
            self._reset_process_state(closed=self._writer.closed)

    @property
    def db(self) -> firestore.Client:
        self._check_fork()
        if self._client is None:
            self._client = firestore.Client(project=self.project, database=self.database)
        return self._client

    def _runs_ref(self) -> Any:
        return self.db.collection(self.collection_name)

    def _run_ref(self, run_id: str) -> Any:
        return self._runs_ref().document(run_id)

    def _sub_ref(self, run_id: str, sub: str, key: str) -> Any:
        return self._run_ref(run_id).collection(sub).document(doc_id(key))

    @property
    def _limit(self) -> int:
        return get_settings().history_limit

    # --- runs -----------------------------------------------------------------------------------
    def _private_ref(self, run_id: str) -> Any:
        return self._run_ref(run_id).collection(PRIVATE_COLLECTION).document(ENGINE_DOC)

    def create_run(self, run: RunRecord) -> RunRecord | None:
        self._check_fork()
        public, private = split_private(encode_run(run, self._limit))
        batch = self.db.batch()
        batch.create(self._run_ref(run.id), public)
        batch.set(self._private_ref(run.id), private)
        try:
            batch.commit()
        except gexc.AlreadyExists:
            return self.get_run(run.id)
        self._writer.count(run.id)
        self._writer.state(run.id).due = time.monotonic() + self.interval
        return None

    def watch_changes(self, run_id: str) -> SnapshotFeed:
        return SnapshotFeed(self._run_ref(run_id))

    def get_run(self, run_id: str) -> RunRecord | None:
        self._check_fork()
        st = self._writer.existing(run_id)
        if st is None:
            snap, private = self._read_with_private(run_id)
            return self._decode_run(snap, [], private)
        # Under the run's io lock no write of ours is in flight, so the document
        # plus what is buffered is exactly what this process has asked for.
        with st.io:
            snap, private = self._read_with_private(run_id)
            return self._decode_run(snap, self._writer.queue_of(st), private)

    def _read_with_private(self, run_id: str) -> tuple[Any, dict[str, Any]]:
        """The run document and its private subdocument's fields, in one BatchGetDocuments call."""
        snaps = {s.reference.path: s for s in self.db.get_all([self._run_ref(run_id), self._private_ref(run_id)])}
        private = snaps.get(self._private_ref(run_id).path)
        return snaps[self._run_ref(run_id).path], (private.to_dict() or {}) if private and private.exists else {}

    def _privates(self, run_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not run_ids:
            return {}
        refs = [self._private_ref(r) for r in run_ids]
        return {s.reference.parent.parent.id: s.to_dict() or {} for s in self.db.get_all(refs) if s.exists}

    def _decode_run(self, snap: Any, queue: list[Pending], private: dict[str, Any] | None = None) -> RunRecord | None:
        if not snap.exists:
            return None
        data: dict[str, Any] = {**(snap.to_dict() or {}), **(private or {})}
        for segment in queue:
            segment.overlay(data, self._limit)
        return decode_run(snap.id, data)

    def list_runs(
        self,
        *,
        workflow: str | None = None,
        status: RunStatus | None = None,
        created_by: str | None = None,
        limit: int = 50,
        offset: int = 0,
        after: tuple[float, str] | None = None,
    ) -> list[RunRecord]:
        # Equality filters ordered by created_at need composite indexes in
        # production (one per combination used); the emulator needs none.
        query = self._runs_ref()
        filters = {"workflow": workflow, "status": None if status is None else RunStatus(status).value,
                   "created_by": created_by}  # fmt: skip
        for name, value in filters.items():
            if value is not None:
                query = query.where(filter=FieldFilter(name, "==", value))
        query = query.order_by("created_at", direction=firestore.Query.DESCENDING)
        if after is not None:
            # The last document of the previous page is the cursor: Firestore orders ties by
            # document name, so none is skipped or repeated. One deleted meanwhile falls back to its time.
            last = self._run_ref(after[1]).get()
            query = query.start_after(last if last.exists else {"created_at": to_timestamp(after[0])})
        if offset:
            query = query.offset(offset)
        out = []
        snaps = list(query.limit(limit).stream())
        privates = self._privates([snap.id for snap in snaps])  # one call for the page's private fields
        for snap in snaps:
            # No io lock here: a write in flight may be missing from a listing
            # for a moment, but is never counted twice (it left the buffer first).
            record = self._decode_run(snap, self._writer.queue_of(self._writer.existing(snap.id)),
                                      privates.get(snap.id))  # fmt: skip
            if record is not None:
                out.append(record)
        return out

    def update_run(self, run_id: str, update: RunUpdate) -> None:
        if not update:
            return
        self._check_fork()
        update = self._take_private(run_id, update)
        if "status" in update.set:
            update = RunUpdate(set={**update.set, "status_at": now()}, incr=update.incr, maximum=update.maximum,
                               events=update.events, failures=update.failures)  # fmt: skip
        if update:
            self._writer.buffer(run_id, update)

    def _take_private(self, run_id: str, update: RunUpdate) -> RunUpdate:
        """Write the update's private fields (encoding.PRIVATE) to the private subdocument; return the rest.

        The heartbeat is written at most once per HEARTBEAT_WRITE_SECONDS by this process.
        """
        sets = {k: v for k, v in update.set.items() if k in PRIVATE}
        incr = {k: v for k, v in update.incr.items() if k in PRIVATE}
        if not sets and not incr:
            return update
        fields: dict[str, Any] = {}
        for k, v in sets.items():
            if k == "heartbeat":
                mono = time.monotonic()
                if mono - self._beats.get(run_id, -math.inf) < HEARTBEAT_WRITE_SECONDS:
                    continue
                self._beats[run_id] = mono
                v = to_timestamp(v)
            fields.update(user_fields(k, v, creating=False) if k == "params" else {k: v})
        fields.update({k: firestore.Increment(v) for k, v in incr.items()})
        if fields:
            # NotFound: the run is gone (deleted), or was created before schema 1 without one.
            with contextlib.suppress(gexc.NotFound):
                self._private_ref(run_id).update(fields)
        return RunUpdate(set={k: v for k, v in update.set.items() if k not in PRIVATE},
                         incr={k: v for k, v in update.incr.items() if k not in PRIVATE},
                         maximum=dict(update.maximum), events=list(update.events),
                         failures=list(update.failures))  # fmt: skip

    def transition(
        self,
        run_id: str,
        to: RunStatus,
        *,
        allowed_from: Collection[RunStatus],
        update: RunUpdate | None = None,
    ) -> bool:
        self._check_fork()
        allowed = {RunStatus(s).value for s in allowed_from}
        change = RunUpdate()
        if update is not None:
            change = RunUpdate(set=dict(update.set), incr=dict(update.incr), maximum=dict(update.maximum),
                               events=list(update.events), failures=list(update.failures))  # fmt: skip
        change.set.update({"status": RunStatus(to).value, "status_at": now()})
        # Most calls find the condition false (every item of a stage-0 fan-out
        # marks the run PROCESSING): one small read, no lock, no write. A status
        # is never buffered, so the stored one is the one to test.
        head = self._run_ref(run_id).get(field_paths=["status"])
        if not head.exists or (head.to_dict() or {}).get("status") not in allowed:
            return False
        private = RunUpdate(set={k: v for k, v in change.set.items() if k in PRIVATE},
                            incr={k: v for k, v in change.incr.items() if k in PRIVATE})  # fmt: skip
        public = RunUpdate(set={k: v for k, v in change.set.items() if k not in PRIVATE},
                           incr={k: v for k, v in change.incr.items() if k not in PRIVATE},
                           maximum=change.maximum, events=change.events, failures=change.failures)  # fmt: skip
        if not self._writer.write_transition(run_id, public, allowed):
            return False
        if private:
            self._beats.pop(run_id, None)  # a transition's heartbeat (a resume) is always written
            self._take_private(run_id, private)
        return True

    def delete_run(self, run_id: str) -> None:
        self._check_fork()
        with self._writer.deleting(run_id):
            ref = self._run_ref(run_id)
            # The run document goes last, so a delete cut short is finished by calling it again.
            for sub in (STEPS, CHECKPOINTS, GUARDS, PRIVATE_COLLECTION):
                self._delete_collection(ref.collection(sub))
            ref.delete()

    def _delete_collection(self, coll: Any) -> None:
        while True:
            docs = list(coll.list_documents(page_size=500))
            if not docs:
                return
            batch = self.db.batch()
            for doc in docs:
                batch.delete(doc)
            batch.commit()

    # --- steps ----------------------------------------------------------------------------------
    def get_step(self, run_id: str, step_key: str) -> StepRecord | None:
        snap = self._sub_ref(run_id, STEPS, step_key).get()
        return decode_step(snap.to_dict()) if snap.exists else None

    def put_step(self, run_id: str, step: StepRecord) -> None:
        ref = self._sub_ref(run_id, STEPS, step.key)
        if step.status is StepStatus.COMPLETE:
            ref.set(encode_step(step))
            return
        # A step that completed stays COMPLETE: a late writer (a cancel, a driver's last poll) cannot
        # rewrite it. Read, then write under the read's update time (or "still absent").
        for _ in range(MAX_ATTEMPTS):
            snap = ref.get(field_paths=["status"])
            if snap.exists and (snap.to_dict() or {}).get("status") == StepStatus.COMPLETE.value:
                return
            option = self.db.write_option(last_update_time=snap.update_time) if snap.exists else None
            try:
                if option is None:
                    ref.create(encode_step(step))
                else:  # every field of the record, so the update replaces the document as set() would
                    ref.update(encode_step(step), option=option)
                return
            except (*CONFLICTS, gexc.AlreadyExists):
                continue
        raise StoreConflict(f"put_step {step.key!r} of run {run_id}: the step document kept changing")

    def create_item_rows(self, run_id: str, rows: Sequence[StepRecord]) -> None:
        for start in range(0, len(rows), ROWS_PER_BATCH):
            chunk = rows[start:start + ROWS_PER_BATCH]
            batch = self.db.batch()
            for row in chunk:
                batch.create(self._sub_ref(run_id, STEPS, row.key), encode_step(row))
            try:
                batch.commit()
            except gexc.AlreadyExists:
                # One row exists (an expansion repeated after a crash): create the others one by one.
                for row in chunk:
                    try:
                        self._sub_ref(run_id, STEPS, row.key).create(encode_step(row))
                    except gexc.AlreadyExists:
                        continue

    def step_progress(self, run_id: str, step_key: str, percent: float, message: str) -> None:
        ref = self._sub_ref(run_id, STEPS, step_key)
        snap = ref.get(field_paths=["status"])
        if not snap.exists or (snap.to_dict() or {}).get("status") != StepStatus.RUNNING.value:
            return
        try:
            # Under the read's update time: a step that finished meanwhile keeps its final record.
            ref.update({"percent": float(percent), "message": message, "updated_at": to_timestamp(now())},
                       option=self.db.write_option(last_update_time=snap.update_time))  # fmt: skip
        except (*CONFLICTS, gexc.NotFound):
            return

    def list_steps(self, run_id: str) -> list[StepRecord]:
        steps = (decode_step(s.to_dict()) for s in self._run_ref(run_id).collection(STEPS).stream())
        return sorted(steps, key=lambda s: s.key)

    def start_step(self, run_id: str, step: StepRecord, update: RunUpdate) -> Checkpoint | None:
        cp_ref = self._sub_ref(run_id, CHECKPOINTS, step.key)
        for _ in range(3):
            batch = self.db.batch()
            # A delete that must find no document is a "no checkpoint yet" check:
            # when one exists it fails the whole batch, the step write with it.
            batch.delete(cp_ref, option=self.db.write_option(exists=False))
            batch.set(self._sub_ref(run_id, STEPS, step.key), encode_step(step))
            try:
                batch.commit()
            except (gexc.AlreadyExists, gexc.FailedPrecondition):
                existing = cp_ref.get()
                if existing.exists:
                    return decode_checkpoint(existing.to_dict())
                continue  # deleted with its run meanwhile: look again
            # The run's part is buffered: a fan-out starts many steps a second.
            self.update_run(run_id, update)
            return None
        raise StoreConflict(f"start_step {step.key!r} of run {run_id}: its checkpoint kept appearing and vanishing")

    def load_step_state(self, run_id: str, step_keys: Sequence[str]) -> tuple[RunStatus | None, dict[str, Checkpoint]]:
        run_ref = self._run_ref(run_id)
        refs = [run_ref, *(self._sub_ref(run_id, CHECKPOINTS, k) for k in dict.fromkeys(step_keys))]
        status: RunStatus | None = None
        found: dict[str, Checkpoint] = {}
        # One BatchGetDocuments call: the documents are read at one point in time.
        for snap in self.db.get_all(refs):
            if not snap.exists:
                continue
            if snap.reference.path == run_ref.path:
                status = RunStatus((snap.to_dict() or {})["status"])
            else:
                cp = decode_checkpoint(snap.to_dict())
                found[cp.step_key] = cp
        return status, {k: found[k] for k in step_keys if k in found}

    # --- checkpoints ----------------------------------------------------------------------------
    def get_checkpoints(self, run_id: str, step_keys: Sequence[str]) -> dict[str, Checkpoint]:
        if not step_keys:
            return {}
        refs = [self._sub_ref(run_id, CHECKPOINTS, k) for k in dict.fromkeys(step_keys)]
        found = {}
        for snap in self.db.get_all(refs):
            if snap.exists:
                cp = decode_checkpoint(snap.to_dict())
                found[cp.step_key] = cp
        return {k: found[k] for k in step_keys if k in found}

    def put_checkpoint(self, run_id: str, checkpoint: Checkpoint) -> bool:
        try:
            self._sub_ref(run_id, CHECKPOINTS, checkpoint.step_key).create(encode_checkpoint(checkpoint))
        except gexc.AlreadyExists:
            return False
        return True

    def complete_step(self, run_id: str, checkpoint: Checkpoint, step: StepRecord, update: RunUpdate) -> Checkpoint:
        cp_ref = self._sub_ref(run_id, CHECKPOINTS, checkpoint.step_key)
        batch = self.db.batch()
        # create() fails the whole batch when a checkpoint exists: the first one
        # stands and the step record is left as it was.
        batch.create(cp_ref, encode_checkpoint(checkpoint))
        batch.set(self._sub_ref(run_id, STEPS, step.key), encode_step(step))
        try:
            batch.commit()
        except gexc.AlreadyExists:
            existing = cp_ref.get()
            if existing.exists:
                return decode_checkpoint(existing.to_dict())
            raise
        # The run's part is buffered like any update (a fan-out item's counters),
        # unless it ends a stage: users watch for that, so it is written now.
        self.update_run(run_id, update)
        if ends_stage(update):
            self._writer.flush_run(run_id, paced=False)
        return checkpoint

    # --- once-guards (haulage.progress.firestore.guards) ----------------------------------------
    def claim_guard(self, run_id: str, key: str, token: str) -> str | None:
        return guards.claim(self._sub_ref(run_id, GUARDS, key), key, token)

    def replace_guard(self, run_id: str, key: str, expected: str, state: str) -> bool:
        return guards.replace(self.db, self._sub_ref(run_id, GUARDS, key), expected, state)

    def finish_guard(self, run_id: str, key: str, token: str, done: bool) -> None:
        guards.finish(self.db, self._sub_ref(run_id, GUARDS, key), key, token, done)

    def get_guards(self, run_id: str) -> dict[str, Any]:
        return guards.read_all(self._run_ref(run_id).collection(GUARDS))

    # --- coalescing -----------------------------------------------------------------------------
    def flush(self, run_id: str | None = None) -> None:
        """Write what is buffered now (for one run, or every run), without waiting for the interval."""
        self._check_fork()
        self._writer.flush(run_id)

    def buffered(self, run_id: str) -> bool:
        """True while changes to the run wait in this process's buffer (tests wait on it going False)."""
        self._check_fork()
        return self._writer.buffered(run_id)

    def close(self) -> None:
        """Write what is buffered and stop the background writer; later updates are written at once."""
        self._check_fork()
        self._writer.close()

    def close_at_exit(self) -> None:
        """close(), unless this process is a fork that never used the store (the buffer is the parent's)."""
        if self._pid == os.getpid():
            self.close()


def ends_stage(update: RunUpdate) -> bool:
    """True if the update is the engine's completion of a whole stage, which users watch for."""
    # It carries the run's percent and a history event; a fan-out item's carries only counters.
    return bool(update.events) or "percent" in update.maximum or "percent" in update.set
