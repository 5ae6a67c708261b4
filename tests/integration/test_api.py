"""The HTTP service on real parts: a real Redis, real Celery workers, google-auth's real token verification.

Most tests call the app in-process (FastAPI's TestClient); the end-to-end
tests run ``python -m haulage.api`` as its own process and drive it over HTTP with
Firebase-shaped tokens signed by a local issuer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import tests.api_flows  # noqa: F401 - registers t_api_slow and t_api_fan in this process
from haulage.api import ApiSettings, User, create_app
from haulage.api.auth import FirebaseAuthenticator
from haulage.devtools.api_server import ApiServer, FirebaseIssuer
from haulage.errors import ConfigError
from tests.conftest import API_MODULES, ROOT, WorkerProcess, wait_until

DEV_TOKEN = "dev-token-0123456789abcdef"
PROJECT = "haulage-test"
MODULES = API_MODULES


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


DEV = bearer(DEV_TOKEN)


def run_count(redis_client: Any) -> int:
    return int(redis_client.zcard("haulage:runs"))


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs of a server-sent event stream; comments and retry lines are skipped."""
    event, data = "message", ""
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads(data)
            event, data = "message", ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def issuer() -> Iterator[FirebaseIssuer]:
    with FirebaseIssuer(PROJECT) as iss:
        yield iss


@pytest.fixture(scope="module")
def dev(redis_server: str) -> TestClient:
    """The service in development mode: one static token, user "dev" (not an admin)."""
    return TestClient(create_app(ApiSettings(auth="dev", dev_token=DEV_TOKEN, dev_admin=False, max_batch=5)))


@pytest.fixture(scope="module")
def fb(redis_server: str, issuer: FirebaseIssuer) -> TestClient:
    """The service in production mode: Firebase ID tokens, verified against the local issuer's certificates."""
    settings = ApiSettings(auth="firebase", firebase_project=PROJECT, firebase_certs_url=issuer.certs_url)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def tokens(issuer: FirebaseIssuer) -> dict[str, dict[str, str]]:
    return {
        "ana": bearer(issuer.token("ana", email="ana@example.com", claims={"roles": {"p1": "editor"}})),
        "bob": bearer(issuer.token("bob", email="bob@example.com", claims={"roles": {"p1": "viewer"}})),
        "root": bearer(issuer.token("root", email="root@example.com", claims={"admin": True})),
    }


def wait_status(client: TestClient, run_id: str, headers: dict[str, str], *statuses: str,
                timeout: float = 30) -> dict[str, Any]:  # fmt: skip
    def check() -> dict[str, Any] | None:
        doc: dict[str, Any] = client.get(f"/v1/runs/{run_id}", headers=headers).json()
        return doc if doc["status"] in statuses else None

    return wait_until(check, timeout=timeout, what=f"run {run_id} to be {'/'.join(statuses)}")  # type: ignore[no-any-return]


# --- authentication ----------------------------------------------------------------------------
def test_a_service_without_auth_configuration_refuses_every_call(redis_server: str) -> None:
    client = TestClient(create_app(ApiSettings()))
    for headers in ({}, DEV, bearer("anything")):
        r = client.get("/v1/workflows", headers=headers)
        assert r.status_code == 401, r.text
        assert "HAULAGE_API_AUTH" in r.json()["error"]["message"]
    r = client.post("/v1/workflows/t_chain/runs", json={"params": {"x": 1}}, headers=DEV)
    assert r.status_code == 401
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "not configured" in ready.json()["checks"]["auth"]


def test_dev_mode_is_off_unless_explicitly_enabled_with_a_strong_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HAULAGE_API_AUTH", raising=False)
    monkeypatch.setenv("HAULAGE_API_DEV_TOKEN", DEV_TOKEN)
    assert ApiSettings.from_env().auth == ""  # a token alone does not turn dev mode on
    monkeypatch.setenv("HAULAGE_API_AUTH", "dev")
    assert ApiSettings.from_env().auth == "dev"
    monkeypatch.setenv("HAULAGE_API_DEV_TOKEN", "short")
    with pytest.raises(ConfigError, match="HAULAGE_API_DEV_TOKEN of at least 16"):
        ApiSettings.from_env()
    monkeypatch.setenv("HAULAGE_API_AUTH", "firebase")
    with pytest.raises(ConfigError, match="HAULAGE_API_FIREBASE_PROJECT"):
        ApiSettings.from_env()
    monkeypatch.setenv("HAULAGE_API_AUTH", "open")
    with pytest.raises(ConfigError, match="HAULAGE_API_AUTH must be one of"):
        ApiSettings.from_env()


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong-token-0123456789"), {"Authorization": DEV_TOKEN}, {"Authorization": f"Basic {DEV_TOKEN}"},
     bearer("x" * 9000)],
    ids=["missing", "wrong", "no-scheme", "basic", "oversize"],
)  # fmt: skip
def test_dev_mode_refuses_anything_but_its_token(dev: TestClient, headers: dict[str, str]) -> None:
    r = dev.get("/v1/runs", headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert dev.get("/v1/runs", headers=DEV).status_code == 200


def test_firebase_token_is_verified_by_google_auth(fb: TestClient, tokens: dict[str, dict[str, str]]) -> None:
    me = fb.get("/v1/me", headers=tokens["ana"]).json()
    assert me == {"id": "ana", "email": "ana@example.com", "admin": False, "roles": {"p1": "editor"},
                  "auth": "firebase"}  # fmt: skip
    assert fb.get("/v1/me", headers=tokens["root"]).json()["admin"] is True


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"forged": True}, "signature"),
        ({"audience": "another-project"}, "audience"),
        ({"issuer": "https://evil.example.com/haulage-test"}, "issuer"),
        ({"expires_in": -600}, "expired"),
        ({"provider": "anonymous"}, "anonymous"),
    ],
    ids=["forged", "audience", "issuer", "expired", "anonymous"],
)
def test_firebase_refuses_bad_tokens(fb: TestClient, issuer: FirebaseIssuer, kwargs: dict[str, Any],
                                     reason: str) -> None:  # fmt: skip
    r = fb.get("/v1/me", headers=bearer(issuer.token("mallory", claims={"admin": True}, **kwargs)))
    assert r.status_code == 401, r.text
    assert reason in r.json()["error"]["message"].lower()


def test_firebase_refuses_garbage_and_the_dev_token(fb: TestClient) -> None:
    for token in ("not.a.jwt", "abc", DEV_TOKEN, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."):
        assert fb.get("/v1/me", headers=bearer(token)).status_code == 401


def test_firebase_certificates_are_cached_and_their_outage_is_a_503(redis_server: str,
                                                                    issuer: FirebaseIssuer) -> None:  # fmt: skip
    settings = ApiSettings(auth="firebase", firebase_project=PROJECT, firebase_certs_url=issuer.certs_url)
    client = TestClient(create_app(settings))
    before = issuer.fetches
    for _ in range(5):
        assert client.get("/v1/me", headers=bearer(issuer.token("ana"))).status_code == 200
    assert issuer.fetches - before == 1
    down = FirebaseAuthenticator(PROJECT, certs_url="http://127.0.0.1:9/certs")  # nothing listens on port 9
    offline = TestClient(create_app(settings, authenticator=down))
    r = offline.get("/v1/me", headers=bearer(issuer.token("ana")))
    assert r.status_code == 503 and "certificates" in r.json()["error"]["message"]


# --- authorisation -------------------------------------------------------------------------------
def test_starting_needs_a_role_in_the_project(fb: TestClient, tokens: dict[str, dict[str, str]],
                                              redis_client: Any) -> None:  # fmt: skip
    before = run_count(redis_client)
    for who, project in (("bob", "p1"), ("ana", "p2")):
        r = fb.post("/v1/workflows/plan_review/runs", json={"params": {"project_id": project}}, headers=tokens[who])
        assert r.status_code == 403, r.text
        assert f"project {project!r}" in r.json()["error"]["message"]
    r = fb.post("/v1/workflows/plan_review/batches", headers=tokens["ana"],
                json={"items": [{"project_id": "p1"}, {"project_id": "p2"}]})  # fmt: skip
    assert r.status_code == 403 and r.json()["error"]["message"].startswith("items.1: ")
    assert run_count(redis_client) == before  # nothing was created
    assert fb.post("/v1/workflows/plan_review/runs", json={"params": {"project_id": "p1"}},
                   headers=tokens["ana"]).status_code == 202  # fmt: skip
    assert fb.post("/v1/workflows/plan_review/runs", json={"params": {"project_id": "p9"}},
                   headers=tokens["root"]).status_code == 202  # fmt: skip


def test_users_see_only_their_own_runs_unless_admin(fb: TestClient, tokens: dict[str, dict[str, str]]) -> None:
    run_id = fb.post("/v1/workflows/t_chain/runs", json={"params": {"x": 1}}, headers=tokens["ana"]).json()["run_id"]
    assert fb.get(f"/v1/runs/{run_id}", headers=tokens["ana"]).json()["created_by"] == "ana"
    for path in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/results", f"/v1/runs/{run_id}/events"):
        r = fb.get(path, headers=tokens["bob"])
        assert r.status_code == 404 and r.json()["error"]["type"] == "RunNotFound"
    assert fb.post(f"/v1/runs/{run_id}/cancel", headers=tokens["bob"]).status_code == 404
    assert run_id not in [d["id"] for d in fb.get("/v1/runs?limit=200", headers=tokens["bob"]).json()["runs"]]
    assert all(d["created_by"] == "bob" for d in fb.get("/v1/runs", headers=tokens["bob"]).json()["runs"])
    assert fb.get("/v1/runs?created_by=ana", headers=tokens["bob"]).status_code == 403
    assert fb.get(f"/v1/runs/{run_id}", headers=tokens["root"]).status_code == 200
    listed = fb.get("/v1/runs?created_by=ana&limit=200", headers=tokens["root"]).json()["runs"]
    assert run_id in [d["id"] for d in listed]


def only_bulk_invoices(user: User, workflow: str, params: Any) -> bool:
    """A custom authoriser loaded by path (HAULAGE_API_AUTHORIZER=tests.integration.test_api:only_bulk_invoices)."""
    return workflow == "bulk_invoices"


def test_the_authorisation_check_is_pluggable(redis_server: str) -> None:
    settings = ApiSettings(auth="dev", dev_token=DEV_TOKEN, authorizer="tests.integration.test_api:only_bulk_invoices")
    client = TestClient(create_app(settings))
    assert client.post("/v1/workflows/t_chain/runs", json={"params": {"x": 1}}, headers=DEV).status_code == 403
    r = client.post("/v1/workflows/bulk_invoices/runs", json={"params": {"invoices": []}}, headers=DEV)
    assert r.status_code == 202, r.text
    with pytest.raises(ConfigError, match="cannot load"):
        create_app(ApiSettings(auth="dev", dev_token=DEV_TOKEN, authorizer="tests.integration.test_api:missing"))


def test_idempotency_keys_are_per_user(fb: TestClient, tokens: dict[str, dict[str, str]]) -> None:
    body = {"params": {"x": 5}, "idempotency_key": "order-17"}
    first = fb.post("/v1/workflows/t_chain/runs", json=body, headers=tokens["ana"]).json()["run_id"]
    again = fb.post("/v1/workflows/t_chain/runs", json=body, headers=tokens["ana"]).json()["run_id"]
    other = fb.post("/v1/workflows/t_chain/runs", json=body, headers=tokens["bob"]).json()["run_id"]
    assert first == again and other != first
    r = fb.post("/v1/workflows/t_chain/runs", json={**body, "params": {"x": 6}}, headers=tokens["ana"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "IdempotencyConflict"


# --- bad input: clear 4xx, nothing created --------------------------------------------------------
def _raw(client: TestClient, content: bytes | Iterator[bytes], content_type: str | None = "application/json",
         path: str = "/v1/workflows/t_chain/runs") -> httpx.Response:  # fmt: skip
    headers = dict(DEV)
    if content_type:
        headers["Content-Type"] = content_type
    return client.post(path, content=content, headers=headers)


@pytest.mark.parametrize(
    ("content", "content_type", "status", "says"),
    [
        (b'{"params": {"x": 1}}', "text/plain", 415, "must be JSON"),
        (b"x=1", "application/x-www-form-urlencoded", 415, "must be JSON"),
        (b'{"params": {"x": 1}}', None, 415, "must be JSON"),
        (b'{"params": {"x": 1}', "application/json", 400, "malformed JSON"),
        (b'{"params": {"x": NaN}}', "application/json", 400, "NaN is not valid JSON"),
        (b"\xff\xfe\x00", "application/json", 400, "malformed JSON"),
        (b"[1, 2]", "application/json", 422, "(body)"),
        (b'{"params": {"x": 1}, "priority": 9}', "application/json", 422, "priority"),
        (b'{"params": [1]}', "application/json", 422, "params"),
        (b'{"params": {"x": 1}, "tags": "urgent"}', "application/json", 422, "tags"),
        (b'{"params": {"x": "seven"}}', "application/json", 422, "params.x"),
        (b'{"params": {}}', "application/json", 422, "params.x"),
        (b'{"params": {"x": 1, "bogus": 2}}', "application/json", 422, "params.bogus"),
        (b'{"params": {"x": 1, "created_by": "root"}}', "application/json", 422, "params.created_by"),
    ],
    ids=["text", "form", "no-type", "truncated", "nan", "not-utf8", "array", "unknown-field", "params-array",
         "tags-string", "wrong-type", "missing", "unknown-param", "reserved-param"],
)  # fmt: skip
def test_bad_bodies_are_refused_and_create_nothing(
    dev: TestClient, redis_client: Any, content: bytes, content_type: str | None, status: int, says: str
) -> None:
    before = run_count(redis_client)
    r = _raw(dev, content, content_type)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] + json.dumps(error.get("fields", [])), error
    assert run_count(redis_client) == before


def test_oversize_bodies_are_refused_before_they_are_read(redis_server: str, redis_client: Any) -> None:
    client = TestClient(create_app(ApiSettings(auth="dev", dev_token=DEV_TOKEN, max_body_bytes=2048)))
    before = run_count(redis_client)
    big = json.dumps({"params": {"x": 1}, "tags": ["t" * 90] * 30}).encode()
    r = _raw(client, big)
    assert r.status_code == 413 and "limit is 2048" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        yield b'{"params": {"x": 1}, "tags": ['
        for _ in range(100):
            yield b'"' + b"t" * 50 + b'",'
        yield b'"end"]}'

    r = _raw(client, chunks())
    assert r.status_code == 413, r.text
    # Unauthenticated callers get 401 before any body rule applies.
    anonymous = client.post("/v1/workflows/t_chain/runs", content=big, headers={"Content-Type": "text/plain"})
    assert anonymous.status_code == 401
    assert run_count(redis_client) == before


def test_batches_are_capped_and_validated_whole(dev: TestClient, redis_client: Any) -> None:
    before = run_count(redis_client)
    r = dev.post("/v1/workflows/t_chain/batches", json={"items": [{"x": i} for i in range(6)]}, headers=DEV)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "items"
    assert "at most 5 items" in r.json()["error"]["message"]
    r = dev.post("/v1/workflows/t_chain/batches", json={"items": []}, headers=DEV)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "items"
    r = dev.post("/v1/workflows/t_chain/batches", json={"items": [{"x": 1}, {"x": "b"}, {"y": 2}]}, headers=DEV)
    assert r.status_code == 422
    assert [f["field"] for f in r.json()["error"]["fields"]] == ["items.1.x", "items.2.x", "items.2.y"]
    assert run_count(redis_client) == before


def test_unknown_and_unexposed_workflows_are_404(redis_server: str, dev: TestClient) -> None:
    r = dev.post("/v1/workflows/nope/runs", json={"params": {}}, headers=DEV)
    assert r.status_code == 404 and "t_chain" in r.json()["error"]["message"]
    narrow = TestClient(create_app(ApiSettings(auth="dev", dev_token=DEV_TOKEN, workflows=("t_chain",))))
    r = narrow.post("/v1/workflows/bulk_invoices/runs", json={"params": {"invoices": []}}, headers=DEV)
    assert r.status_code == 404 and "known workflows: t_chain" in r.json()["error"]["message"]
    assert [w["name"] for w in narrow.get("/v1/workflows", headers=DEV).json()["workflows"]] == ["t_chain"]
    with pytest.raises(ConfigError, match="HAULAGE_API_WORKFLOWS"):
        create_app(ApiSettings(auth="dev", dev_token=DEV_TOKEN, workflows=("t_chain", "nope")))


@pytest.mark.parametrize(
    ("path", "status", "field"),
    [("/v1/runs?limit=0", 422, "limit"), ("/v1/runs?limit=5000", 422, "limit"), ("/v1/runs?offset=-1", 422, "offset"),
     ("/v1/runs?status=DONE", 422, "status"), ("/v1/runs/not%20an%20id", 422, "run_id"),
     ("/v1/runs/0123456789abcdef", 422, "run_id"), ("/v1/runs/0123456789abcdef0123456789abcdef", 404, None),
     ("/v1/nothing", 404, None)],
)  # fmt: skip
def test_bad_queries_name_the_parameter(dev: TestClient, path: str, status: int, field: str | None) -> None:
    r = dev.get(path, headers=DEV)
    assert r.status_code == status, r.text
    if field:
        assert r.json()["error"]["fields"][0]["field"] == field


# --- real runs through the session worker -----------------------------------------------------------
def test_start_follow_and_collect_a_run(dev: TestClient, worker: WorkerProcess) -> None:
    r = dev.post("/v1/workflows/t_chain/runs", json={"params": {"x": 4}, "tags": ["http"]}, headers=DEV)
    assert r.status_code == 202 and r.headers["location"] == r.json()["status_url"]
    run_id = r.json()["run_id"]
    with dev.stream("GET", f"/v1/runs/{run_id}/events", headers=DEV) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = list(parse_sse(stream.iter_lines()))
    docs = [data for name, data in events if name == "run"]
    assert events[-1] == ("end", {"status": "COMPLETE"})
    assert docs[-1]["status"] == "COMPLETE" and docs[-1]["percent"] == 100
    assert [d["percent"] for d in docs] == sorted(d["percent"] for d in docs)
    assert docs[-1]["tags"] == ["http"] and docs[-1]["created_by"] == "dev"
    assert dev.get(f"/v1/runs/{run_id}/results", headers=DEV).json() == {
        "run_id": run_id, "status": "COMPLETE", "value": 20, "successes": None, "failures": [], "error": None,
    }  # fmt: skip
    # A finished run's stream is its final document, then the end.
    with dev.stream("GET", f"/v1/runs/{run_id}/events", headers=DEV) as stream:
        assert [name for name, _ in parse_sse(stream.iter_lines())] == ["run", "end"]
    page = dev.get("/v1/runs?workflow=t_chain&status=COMPLETE&limit=1", headers=DEV).json()
    assert page["runs"][0]["id"] == run_id and page["next_offset"] in (1, None)


def test_results_carry_failures_with_their_parameters(dev: TestClient, worker: WorkerProcess) -> None:
    run_id = dev.post("/v1/workflows/t_api_fan/runs", json={"params": {"n": 4, "fail_on": [1, 3]}},
                      headers=DEV).json()["run_id"]  # fmt: skip
    wait_status(dev, run_id, DEV, "COMPLETE", "FAILED")
    results = dev.get(f"/v1/runs/{run_id}/results", headers=DEV).json()
    assert results["status"] == "COMPLETE" and results["successes"] == [0, 4]
    assert [(f["params"]["x"], f["error_type"]) for f in results["failures"]] == [(1, "ValueError"), (3, "ValueError")]
    assert "bad item 1" in results["failures"][0]["message"]
    failed = dev.post("/v1/workflows/t_dynamic_fail/runs", json={"params": {"n": 3, "fail_on": [2]}},
                      headers=DEV).json()["run_id"]  # fmt: skip
    assert wait_status(dev, failed, DEV, "COMPLETE", "FAILED")["status"] == "FAILED"
    outcome = dev.get(f"/v1/runs/{failed}/results", headers=DEV).json()
    assert outcome["status"] == "FAILED" and "1 of 3 fan-out items failed" in outcome["error"]
    assert [f["params"]["x"] for f in outcome["failures"]] == [2]


def test_a_batch_starts_one_run_per_item(dev: TestClient, worker: WorkerProcess) -> None:
    body = {"items": [{"x": 1}, {"x": 2}, {"x": 3}], "idempotency_key": "batch-1", "tags": ["nightly"]}
    r = dev.post("/v1/workflows/t_chain/batches", json=body, headers=DEV)
    assert r.status_code == 202, r.text
    batch = r.json()
    assert [item["index"] for item in batch["runs"]] == [0, 1, 2]
    assert dev.post("/v1/workflows/t_chain/batches", json=body, headers=DEV).json() == batch  # idempotent
    values = []
    for item in batch["runs"]:
        doc = wait_status(dev, item["run_id"], DEV, "COMPLETE")
        assert doc["tags"] == ["nightly", f"batch:{batch['batch_id']}"]
        values.append(dev.get(f"/v1/runs/{item['run_id']}/results", headers=DEV).json()["value"])
    assert values == [8, 12, 16]


def test_cancel_is_idempotent_and_results_say_cancelled(dev: TestClient) -> None:
    # t_api_slow's steps wait on a queue no worker of this test consumes: the run stays PENDING.
    run_id = dev.post("/v1/workflows/t_api_slow/runs", json={"params": {"ticks": 2}}, headers=DEV).json()["run_id"]
    assert dev.get(f"/v1/runs/{run_id}/results", headers=DEV).status_code == 409
    assert dev.post(f"/v1/runs/{run_id}/cancel", headers=DEV).json() == {
        "run_id": run_id, "cancelled": True, "status": "CANCELLED"}  # fmt: skip
    assert dev.post(f"/v1/runs/{run_id}/cancel", headers=DEV).json()["cancelled"] is False
    r = dev.get(f"/v1/runs/{run_id}/results", headers=DEV)
    assert r.status_code == 409 and r.json()["error"]["type"] == "RunCancelled"


# --- the document and the page -----------------------------------------------------------------------
def test_openapi_document_names_workflows_limits_and_auth(dev: TestClient) -> None:
    doc = dev.get("/openapi.json").json()
    assert {"/v1/workflows/{name}/runs", "/v1/workflows/{name}/batches", "/v1/runs", "/v1/runs/{run_id}",
            "/v1/runs/{run_id}/results", "/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/events", "/v1/workflows",
            "/healthz", "/readyz"} <= set(doc["paths"])  # fmt: skip
    name = doc["paths"]["/v1/workflows/{name}/runs"]["post"]["parameters"][0]
    assert "t_chain" in name["schema"]["enum"]
    assert doc["components"]["schemas"]["StartBatch"]["properties"]["items"]["maxItems"] == 5
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "text/event-stream" in doc["paths"]["/v1/runs/{run_id}/events"]["get"]["responses"]["200"]["content"]
    workflows = {w["name"]: w for w in dev.get("/v1/workflows", headers=DEV).json()["workflows"]}
    assert workflows["t_chain"]["parameters"]["required"] == ["x"]


def test_the_page_is_served_with_a_strict_content_security_policy(dev: TestClient) -> None:
    page = dev.get("/")
    assert page.status_code == 200 and "<title>Haulage runs</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert dev.get("/static/app.js").status_code == 200


def test_python_m_api_stops_with_a_clear_message_on_bad_settings(redis_server: str) -> None:
    env = {**os.environ, "HAULAGE_API_AUTH": "dev", "HAULAGE_API_DEV_TOKEN": "short", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "haulage.api", "--port", "1"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("haulage: error: HAULAGE_API_AUTH=dev needs HAULAGE_API_DEV_TOKEN")


# --- another process, over HTTP, with Firebase tokens --------------------------------------------------
@pytest.fixture(scope="module")
def server(redis_server: str, issuer: FirebaseIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    env = {"HAULAGE_API_AUTH": "firebase", "HAULAGE_API_FIREBASE_PROJECT": PROJECT,
           "HAULAGE_API_FIREBASE_CERTS_URL": issuer.certs_url, "HAULAGE_MODULES": MODULES,
           "HAULAGE_API_EVENTS_MIN_INTERVAL": "0.05", "PYTHONPATH": str(ROOT)}  # fmt: skip
    with ApiServer(tmp_path_factory.mktemp("api-server") / "api.log", env, cwd=ROOT) as srv:
        yield srv


def follow(http: httpx.Client, run_id: str, headers: dict[str, str]) -> list[tuple[str, Any]]:
    with http.stream("GET", f"/v1/runs/{run_id}/events", headers=headers, timeout=60) as stream:
        assert stream.status_code == 200
        return list(parse_sse(stream.iter_lines()))


def test_another_process_starts_follows_cancels_and_collects(server: ApiServer, api_worker: WorkerProcess,
                                                             issuer: FirebaseIssuer) -> None:  # fmt: skip
    ana = bearer(issuer.token("ana", email="ana@example.com"))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/readyz").json()["status"] == "ready"
        assert http.get("/v1/runs").status_code == 401
        assert http.get("/v1/runs", headers=bearer(issuer.token("ana", forged=True))).status_code == 401
        assert http.post("/v1/workflows/t_api_slow/runs", json={"params": {}}, headers=DEV).status_code == 401

        started = time.monotonic()
        r = http.post("/v1/workflows/t_api_slow/runs", json={"params": {"ticks": 5, "sleep": 0.3}}, headers=ana)
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        assert time.monotonic() - started < 2  # returns at once; the work happens on the worker
        events = follow(http, run_id, ana)
        percents = [data["percent"] for name, data in events if name == "run"]
        assert events[-1] == ("end", {"status": "COMPLETE"})
        assert len(set(percents)) >= 4 and percents == sorted(percents), percents
        assert http.get(f"/v1/runs/{run_id}/results", headers=ana).json()["value"] == {"ticks": 5}

        long_run = http.post("/v1/workflows/t_api_slow/runs", json={"params": {"ticks": 100, "sleep": 0.1}},
                             headers=ana).json()["run_id"]  # fmt: skip
        wait_until(lambda: http.get(f"/v1/runs/{long_run}", headers=ana).json()["percent"] > 0, timeout=30,
                   what="the long run to make progress")  # fmt: skip
        assert http.post(f"/v1/runs/{long_run}/cancel", headers=ana).json()["cancelled"] is True
        assert follow(http, long_run, ana)[-1] == ("end", {"status": "CANCELLED"})
        assert http.get(f"/v1/runs/{long_run}/results", headers=ana).status_code == 409
        history = [e["kind"] for e in http.get(f"/v1/runs/{long_run}", headers=ana).json()["history"]]
        assert "cancelled" in history


def test_dev_environment_and_page_url_for_the_dev_stack() -> None:
    from haulage.api.server import dev_environment, page_url

    env = dev_environment()
    assert env["HAULAGE_API_AUTH"] == "dev" and len(env["HAULAGE_API_DEV_TOKEN"]) >= 16
    assert dev_environment()["HAULAGE_API_DEV_TOKEN"] != env["HAULAGE_API_DEV_TOKEN"]
    assert page_url("127.0.0.1", 8000, "a/b") == "http://127.0.0.1:8000/#token=a%2Fb"
