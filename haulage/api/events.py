"""Live run state: ``GET /v1/runs/{id}/events`` as server-sent events until the run ends.

:func:`watch_run` is the one place that knows how changes are noticed: the
Redis store publishes on ``keys.changes_channel(run_id)`` at every write, so
it waits on that channel and re-reads the document; a periodic re-read is the
safety net (a missed message, or a store that does not publish, such as
Firestore). When ``Run.watch()`` lands in the engine, only this function changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import anyio.to_thread
import redis.asyncio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from haulage import keys
from haulage.api.deps import Context, VisibleRun
from haulage.api.models import ERROR_RESPONSES, RunDocument
from haulage.errors import RunNotFound
from haulage.jsonutil import dumps
from haulage.settings import get_settings
from haulage.workflows import Run, RunRecord

log = logging.getLogger("haulage.api")

#: milliseconds an EventSource waits before reconnecting after the stream closes
RETRY_MS = 3000

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


class _Notices:
    """Change notices for one run from Redis pub/sub; degrades to plain polling if Redis fails."""

    def __init__(self, run_id: str) -> None:
        self.channel = keys.changes_channel(run_id)
        self.client: redis.asyncio.Redis | None = None
        self.pubsub: Any = None

    async def open(self) -> None:
        try:
            self.client = redis.asyncio.Redis.from_url(get_settings().redis_url, socket_connect_timeout=5)
            self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            await self.pubsub.subscribe(self.channel)
        except (RedisError, OSError) as exc:
            log.warning("events: cannot subscribe to %s (%s); polling instead", self.channel, exc)
            await self.close()

    async def wait(self, timeout: float) -> None:
        """Return when a change is announced, or after ``timeout`` seconds."""
        if self.pubsub is None:
            await anyio.sleep(timeout)
            return
        try:
            await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        except (RedisError, OSError) as exc:
            log.warning("events: lost the subscription to %s (%s); polling instead", self.channel, exc)
            await self.close()

    async def drain(self) -> None:
        """Drop notices that arrived meanwhile: the next read sees all of their changes at once."""
        try:
            while self.pubsub is not None and await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0):
                pass
        except (RedisError, OSError):
            await self.close()

    async def close(self) -> None:
        pubsub, client, self.pubsub, self.client = self.pubsub, self.client, None, None
        # Closing must not raise into the stream's teardown: the connection may already be gone.
        try:
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
        except (RedisError, OSError) as exc:
            log.debug("events: closing the subscription: %s", exc)


def _read(run_id: str) -> RunRecord | None:
    try:
        return Run(run_id).status()
    except RunNotFound:
        return None


async def watch_run(run_id: str, *, poll: float, min_interval: float) -> AsyncGenerator[RunRecord | None, None]:
    """Yield the run's document now and after each change, ending with its terminal state.

    Yields ``None`` after a quiet ``poll`` interval, so a caller can send
    keep-alives and notice a client that went away. Changes closer together
    than ``min_interval`` seconds are coalesced into one document.
    """
    notices = _Notices(run_id)
    await notices.open()  # subscribe before the first read, so no change slips between them
    try:
        seen: tuple[float, str] | None = None
        while True:
            read_at = time.monotonic()
            record = await anyio.to_thread.run_sync(_read, run_id)
            if record is None:
                return  # deleted while followed (retention): nothing more will come
            version = (record.updated_at, record.status.value)
            yield record if version != seen else None
            seen = version
            if record.terminal:
                return
            await notices.wait(poll)
            await anyio.sleep(max(0.0, read_at + min_interval - time.monotonic()))
            await notices.drain()
    finally:
        await notices.close()


def sse(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One server-sent event; the JSON is a single line, so one ``data:`` field carries it."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return f"{head}data: {dumps(data)}\n\n".encode()


async def event_stream(run_id: str, ctx: Context) -> AsyncIterator[bytes]:
    """The SSE byte stream of one run: ``run`` events with the document, then ``end`` with the final status."""
    settings = ctx.settings
    yield f"retry: {RETRY_MS}\n\n".encode()
    started = last_write = time.monotonic()
    updates = watch_run(run_id, poll=settings.events_poll, min_interval=settings.events_min_interval)
    async with aclosing(updates):  # the subscription is closed when the stream ends, however it ends
        async for record in updates:
            now = time.monotonic()
            if record is not None:
                doc = RunDocument.from_record(record).model_dump(mode="json")
                yield sse("run", doc, event_id=f"{record.updated_at:.6f}")
                last_write = now
                if record.terminal:
                    yield sse("end", {"status": record.status.value})
                    return
            elif now - last_write >= settings.events_keepalive:
                yield b": keep-alive\n\n"
                last_write = now
            if now - started >= settings.events_max_seconds:
                return  # the client reconnects (retry:) and gets the current state first


@router.get(
    "/runs/{run_id}/events",
    response_class=StreamingResponse,
    summary="Follow a run: server-sent events until it ends",
    responses={
        200: {
            "description": "text/event-stream: a `run` event with the run document (as GET /v1/runs/{id}) now and "
            "after each change; an `end` event with the final status; `: keep-alive` comments while quiet",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def run_events(record: VisibleRun, ctx: Context) -> StreamingResponse:
    return StreamingResponse(
        event_stream(record.id, ctx),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # proxies must not buffer the stream
    )
