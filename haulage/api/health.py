"""Liveness (``/healthz``: the process answers) and readiness (``/readyz``: it can do its job)."""

from __future__ import annotations

import logging

import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from haulage.api.deps import Context
from haulage.api.models import Health
from haulage.redis_client import connect
from haulage.settings import get_settings

log = logging.getLogger("haulage.api")

router = APIRouter()

#: seconds a readiness probe waits for Redis
REDIS_PROBE_TIMEOUT = 2.0


def _ping_redis() -> str:
    client = connect(
        get_settings().redis_url, socket_timeout=REDIS_PROBE_TIMEOUT, socket_connect_timeout=REDIS_PROBE_TIMEOUT
    )
    try:
        client.ping()
        return "ok"
    except (RedisError, OSError) as exc:
        # The address and the reason go to the log; the probe's answer is public.
        log.warning("readiness: Redis is unreachable: %s", exc)
        return "unreachable"
    finally:
        client.close()


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: Redis answers and authentication is configured",
    responses={503: {"model": Health, "description": "not ready; checks say why"}},
)
async def readyz(ctx: Context) -> JSONResponse:
    # An instance that would refuse every call (no auth configured) is not ready to take traffic.
    checks = {
        "redis": await anyio.to_thread.run_sync(_ping_redis),
        "auth": ctx.authenticator.mode if ctx.authenticator.mode != "none" else "not configured (HAULAGE_API_AUTH)",
        "workflows": str(len(ctx.workflows)),
    }
    ready = checks["redis"] == "ok" and ctx.authenticator.mode != "none"
    body = Health(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
