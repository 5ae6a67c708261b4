"""haulage/progress/firestore/firestore.rules on the emulator, rule by rule, as a web client's requests meet them.

The emulator is started the way `haulage dev` starts it (``start_emulator`` with
its default rules), so these tests also show that the rules are loaded there.
Requests go through the emulator's REST API with unsigned ID tokens (the
emulator's rules engine accepts them), the identities a Firebase web client sends.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "haulage-rules"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from haulage.devtools.firestore_emulator import EmulatorMissing, start_emulator

    try:
        host, stop = start_emulator(PROJECT, log_path=tmp_path_factory.mktemp("fs") / "emulator.log")
    except EmulatorMissing as exc:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"Firestore emulator missing in CI: {exc}")
        pytest.skip(f"Firestore emulator not installed: {exc}")
    before = os.environ.get("FIRESTORE_EMULATOR_HOST")
    os.environ["FIRESTORE_EMULATOR_HOST"] = host
    try:
        yield host
    finally:
        if before is None:
            os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
        else:
            os.environ["FIRESTORE_EMULATOR_HOST"] = before
        stop()


def token(uid: str, email: str | None = None, verified: bool | None = None) -> str:
    """An unsigned Firebase ID token, as the web SDK's mockUserToken makes."""

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    claims: dict[str, Any] = {"sub": uid, "user_id": uid, "aud": PROJECT, "iss": f"https://securetoken.google.com/{PROJECT}",
                              "iat": 1, "exp": 9999999999, "auth_time": 1,
                              "firebase": {"sign_in_provider": "password"}}  # fmt: skip
    if email is not None:
        claims["email"] = email
    if verified is not None:
        claims["email_verified"] = verified
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


def call(url: str, who: str | None, *, method: str = "GET", body: dict[str, Any] | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if who:
        headers["Authorization"] = f"Bearer {who}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:  # noqa: S310 - loopback emulator
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.fixture
def runs(emulator: str) -> Iterator[dict[str, str]]:
    """Two runs written by the engine (the admin path, which rules do not govern): one by uid, one by email."""
    from google.cloud import firestore

    admin = firestore.Client(project=PROJECT)
    ids = {"by_uid": f"r-{uuid.uuid4().hex[:8]}", "by_email": f"r-{uuid.uuid4().hex[:8]}"}
    run = admin.collection("tasks").document(ids["by_uid"])
    run.set({"status": "PROCESSING", "created_by": "owner-uid", "created_at": 2.0, "workflow": "wf"})
    run.collection("steps").document("0:a").set({"status": "COMPLETE"})
    run.collection("checkpoints").document("0:a").set({"value": "secret"})
    run.collection("guards").document("g").set({"state": "done"})
    run.collection("private").document("state").set({"params_hash": "x"})
    other = admin.collection("tasks").document(ids["by_email"])
    other.set({"status": "COMPLETE", "created_by": "ana@example.com", "created_at": 1.0, "workflow": "wf"})
    other.collection("steps").document("0:a").set({"status": "COMPLETE"})
    ids["base"] = f"http://{emulator}/v1/projects/{PROJECT}/databases/(default)/documents"
    yield ids
    for rid in (ids["by_uid"], ids["by_email"]):
        ref = admin.collection("tasks").document(rid)
        for sub in ("steps", "checkpoints", "guards", "private"):
            for doc in ref.collection(sub).list_documents():
                doc.delete()
        ref.delete()


OWNER = token("owner-uid")
OUTSIDER = token("someone-else")
ANA_VERIFIED = token("uid-ana", "ana@example.com", verified=True)
ANA_UNVERIFIED = token("uid-mallory", "ana@example.com", verified=False)
ANA_NO_CLAIM = token("uid-mallory", "ana@example.com")


def test_owner_by_uid_reads_the_run_and_its_steps(runs: dict[str, str]) -> None:
    base, rid = runs["base"], runs["by_uid"]
    assert call(f"{base}/tasks/{rid}", OWNER) == 200
    assert call(f"{base}/tasks/{rid}/steps/0:a", OWNER) == 200
    assert call(f"{base}/tasks/{rid}/steps", OWNER) == 200  # listing its steps, as a frontend's rows do


def test_outsider_and_anonymous_are_refused(runs: dict[str, str]) -> None:
    base, rid = runs["base"], runs["by_uid"]
    for who in (OUTSIDER, None):
        assert call(f"{base}/tasks/{rid}", who) == 403
        assert call(f"{base}/tasks/{rid}/steps/0:a", who) == 403
        assert call(f"{base}/tasks/{rid}/steps", who) == 403


def test_engine_state_is_never_readable_even_by_the_owner(runs: dict[str, str]) -> None:
    base, rid = runs["base"], runs["by_uid"]
    for sub, doc in (("checkpoints", "0:a"), ("guards", "g"), ("private", "state")):
        assert call(f"{base}/tasks/{rid}/{sub}/{doc}", OWNER) == 403, sub


def test_clients_write_nothing(runs: dict[str, str]) -> None:
    base, rid = runs["base"], runs["by_uid"]
    patch = {"fields": {"status": {"stringValue": "COMPLETE"}}}
    assert call(f"{base}/tasks/{rid}", OWNER, method="PATCH", body=patch) == 403
    assert call(f"{base}/tasks/{rid}/steps/0:a", OWNER, method="PATCH", body=patch) == 403
    assert call(f"{base}/tasks/{rid}", OWNER, method="DELETE") == 403
    assert call(f"{base}/tasks?documentId=new", OWNER, method="POST",
                body={"fields": {"created_by": {"stringValue": "owner-uid"}}}) == 403  # fmt: skip


def test_email_ownership_needs_a_verified_email(runs: dict[str, str]) -> None:
    base, rid = runs["base"], runs["by_email"]
    assert call(f"{base}/tasks/{rid}", ANA_VERIFIED) == 200
    assert call(f"{base}/tasks/{rid}/steps/0:a", ANA_VERIFIED) == 200
    # Anyone can sign up with someone else's address; until it is verified it proves nothing.
    for forged in (ANA_UNVERIFIED, ANA_NO_CLAIM):
        assert call(f"{base}/tasks/{rid}", forged) == 403
        assert call(f"{base}/tasks/{rid}/steps/0:a", forged) == 403
        assert call(f"{base}/tasks/{rid}/steps", forged) == 403


def _list_query(created_by: str | None, **equal: str) -> dict[str, Any]:
    filters = [{"fieldFilter": {"field": {"fieldPath": k}, "op": "EQUAL", "value": {"stringValue": v}}}
               for k, v in ({"created_by": created_by} if created_by else {}).items() | equal.items()]  # fmt: skip
    order = [{"field": {"fieldPath": "created_at"}, "direction": "DESCENDING"}]
    query: dict[str, Any] = {"from": [{"collectionId": "tasks"}], "orderBy": order}
    if filters:
        query["where"] = {"compositeFilter": {"op": "AND", "filters": filters}}
    return {"structuredQuery": query}


def test_list_query_only_for_ones_own_runs(runs: dict[str, str]) -> None:
    url = f"{runs['base']}:runQuery"
    assert call(url, OWNER, method="POST", body=_list_query("owner-uid")) == 200
    assert call(url, OWNER, method="POST", body=_list_query("owner-uid", workflow="wf", status="PROCESSING")) == 200
    assert call(url, ANA_VERIFIED, method="POST", body=_list_query("ana@example.com")) == 200
    assert call(url, OWNER, method="POST", body=_list_query(None)) == 403  # could return others' runs
    assert call(url, OWNER, method="POST", body=_list_query("ana@example.com")) == 403
    assert call(url, ANA_UNVERIFIED, method="POST", body=_list_query("ana@example.com")) == 403
    assert call(url, None, method="POST", body=_list_query("owner-uid")) == 403


def test_a_rules_file_that_does_not_compile_is_refused_loudly(emulator: str, tmp_path: Path) -> None:
    from haulage.devtools.firestore_emulator import load_rules
    from haulage.errors import HaulageError

    broken = tmp_path / "broken.rules"
    broken.write_text("rules_version = '2'; service cloud.firestore { match /x { allow read: if ; } }")
    with pytest.raises(HaulageError, match="refused the rules"):
        load_rules(emulator, f"{PROJECT}-broken", broken)


def test_indexes_cover_every_list_query_the_code_makes() -> None:
    """Each combination of list_runs's equality filters, ordered by created_at desc, has a composite index."""
    import itertools

    spec = json.loads((ROOT / "deploy" / "firestore.indexes.json").read_text())
    have = set()
    for index in spec["indexes"]:
        assert index["collectionGroup"] == "tasks" and index["queryScope"] == "COLLECTION"
        fields = index["fields"]
        assert fields[-1] == {"fieldPath": "created_at", "order": "DESCENDING"}
        have.add(frozenset(f["fieldPath"] for f in fields[:-1]))
    for n in range(1, 4):
        for combo in itertools.combinations(("created_by", "workflow", "status"), n):
            assert frozenset(combo) in have, f"no composite index for {combo} + created_at desc"
