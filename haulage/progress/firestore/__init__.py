"""The Firestore backend of the Store: the production store (the ``firestore`` extra).

Layout (schema 1; the README's table and deploy/haulage-documents.d.ts describe each field): one
document per run in the collection (id = run id) with the fields of
:class:`~haulage.progress.models.RunRecord` that clients may read: ``stages`` (a list,
written whole), ``steps.{total,done,failed}`` and ``cost.<model>.*`` as nested maps,
``failures`` and ``history`` as lists of maps, every time a Timestamp (``updated_ts`` the
server's), and ``status_at`` (when the status last changed). The parameters and the
engine's own fields (``params_hash``, ``on_failure``, ``recoveries``, the heartbeat) live
in the subdocument ``private/engine``, which the rules refuse to every client. Steps,
checkpoints and guards live in the subcollections ``steps``, ``checkpoints`` and
``guards`` (document id = key, with "/" and "%" percent-encoded). User data that a
Firestore document cannot hold natively (arrays inside arrays, integers beyond 64 bits,
empty or reserved map keys) is stored as JSON text in a ``<field>_json`` companion field.

Write coalescing: Firestore sustains about one write per second per document,
while a fan-out reports progress, cost and completions many times a second.
``update_run`` (and the run part of ``start_step``/``complete_step``) only
merges the change into a per-run buffer in memory; a background thread writes
each buffer at most once per ``HAULAGE_FIRESTORE_COALESCE_SECONDS``. The pace is
kept across processes too: a flush reads the document's ``update_time`` and
writes with it as a precondition no sooner than one interval after it, so all
workers together stay near one coalesced write per interval. Status
transitions, a step completion that ends a stage, ``flush()``/``close()`` and
process exit (atexit, and Celery's ``worker_process_shutdown`` for prefork
children, which skip atexit) write at once. ``get_run`` shows this process's
pending changes (read your writes).

Every coalesced write reads the status, stages, percent, failures and cost and
is sent under a precondition on the update time it read, so the stages list,
the percent derived from it and exact money are computed from what is stored,
and a terminal document takes nothing but its ``settled`` marker.

What readers in other processes see: a terminal status at once; counters and
cost buffered by other workers land up to about one interval later while the
run goes on (the finish waits for them), and not at all once it has ended. A status change is a barrier
for buffered ``set`` fields: one asked for before it is dropped rather than
written over what the transition set. A change buffered by a process that is
killed (SIGKILL) is lost: counters may stay short, checkpoints never do.

Modules: ``encoding`` (records to documents and back), ``buffer`` (the
coalescing buffer), ``writer`` (the paced writer and its thread), ``store``
(the FirestoreStore), ``guards`` (once-guards), ``feed`` (change listeners),
``exit_hooks`` (writes at process exit).
"""

from __future__ import annotations

from haulage.progress.firestore.store import FirestoreStore

__all__ = ["FirestoreStore"]
