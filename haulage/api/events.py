"""Live run state: ``GET /v1/runs/{id}/events`` as server-sent events until the run ends.

:func:`watch_run` is the one place that knows how changes are noticed: the
Redis store publishes on ``keys.changes_channel(run_id)`` at every write, so
it waits on that channel and re-reads the document; a periodic re-read is the
safety net (a missed message, or a store that does not publish, such as
Firestore). Every stream of a process shares one pub/sub connection
(:class:`ChangeHub`); each user may hold a few streams at once
(:class:`StreamLimits`), and a stream ends when the token that opened it expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import anyio
import anyio.to_thread
import redis.asyncio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.background import BackgroundTask

from haulage import keys
from haulage.api.deps import Context, CurrentUser, VisibleRun
from haulage.api.models import ERROR_RESPONSES, ErrorResponse, RunDocument
from haulage.errors import RunNotFound
from haulage.jsonutil import dumps
from haulage.redis_client import connect_async
from haulage.settings import get_settings
from haulage.workflows import Run, RunRecord

log = logging.getLogger("haulage.api")

#: milliseconds an EventSource waits before reconnecting after the stream closes
RETRY_MS = 3000

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


class ChangeHub:
    """One Redis pub/sub connection per event loop of the API process, fanned out to every stream.

    Each stream used to open a connection of its own: a hundred streams were a
    hundred connections. Here a stream registers a flag for its run's channel;
    one reader task sets the flags of a channel when a message arrives. When
    Redis fails, flags are all set (streams re-read at once) and streams fall
    back to their periodic re-read until the hub reconnects.
    """

    def __init__(self) -> None:
        self._flags: dict[str, set[anyio.Event]] = {}
        self._pubsub: Any = None
        self._client: redis.asyncio.Redis | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def subscribe(self, channel: str) -> anyio.Event:
        """A flag set at the next message on ``channel``; :meth:`rearm` gives a fresh one."""
        flag = anyio.Event()
        async with self._lock:
            first = channel not in self._flags and self._pubsub is not None  # else _connect subscribes it
            self._flags.setdefault(channel, set()).add(flag)
            await self._connect()
            if first and self._pubsub is not None:
                try:
                    await self._pubsub.subscribe(channel)
                except (RedisError, OSError) as exc:
                    await self._lost(exc)
        return flag

    def rearm(self, channel: str, flag: anyio.Event) -> anyio.Event:
        """Swap a (set) flag for a fresh one, before the stream re-reads the run."""
        flags = self._flags.get(channel)
        fresh = anyio.Event()
        if flags is not None:
            flags.discard(flag)
            flags.add(fresh)
        return fresh

    async def unsubscribe(self, channel: str, flag: anyio.Event) -> None:
        async with self._lock:
            flags = self._flags.get(channel)
            if flags is None:
                return
            flags.discard(flag)
            if flags:
                return
            del self._flags[channel]
            if self._pubsub is not None:
                try:
                    await self._pubsub.unsubscribe(channel)
                except (RedisError, OSError) as exc:
                    await self._lost(exc)

    async def _connect(self) -> None:
        if self._pubsub is not None:
            return
        try:
            self._client = connect_async(get_settings().redis_url, socket_connect_timeout=5)
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            # The hub's own channel: the connection is subscribed (so readable) even with no stream.
            await pubsub.subscribe(keys.api_hub_channel(), *self._flags)
        except (RedisError, OSError) as exc:
            log.warning("events: cannot subscribe to change notices (%s); streams poll instead", exc)
            await self._close_client()
            return
        self._pubsub = pubsub
        self._reader = asyncio.get_running_loop().create_task(self._read(pubsub))

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                channel = message["channel"].decode()
                for flag in list(self._flags.get(channel, ())):
                    flag.set()
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            async with self._lock:
                if self._pubsub is pubsub:
                    await self._lost(exc)

    async def _lost(self, exc: BaseException) -> None:
        log.warning("events: lost the change-notice subscription (%s); streams poll until it is back", exc)
        for flags in self._flags.values():
            for flag in flags:
                flag.set()  # re-read now: a change may have been missed
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        await self._close_client()

    async def _close_client(self) -> None:
        pubsub, client, self._pubsub, self._client = self._pubsub, self._client, None, None
        # Closing must not raise into a stream: the connection may already be gone.
        try:
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
        except (RedisError, OSError) as exc:
            log.debug("events: closing the subscription: %s", exc)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ChangeHub] = weakref.WeakKeyDictionary()


def change_hub() -> ChangeHub:
    """The hub of the running event loop (uvicorn runs one loop per process)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = ChangeHub()
    return hub


class _Notices:
    """Change notices for one run, through the process's shared hub."""

    def __init__(self, run_id: str) -> None:
        self.channel = keys.changes_channel(run_id)
        self.hub: ChangeHub | None = None
        self.flag: anyio.Event | None = None

    async def open(self) -> None:
        self.hub = change_hub()
        self.flag = await self.hub.subscribe(self.channel)

    async def wait(self, timeout: float) -> None:
        """Return when a change is announced, or after ``timeout`` seconds."""
        assert self.flag is not None
        with anyio.move_on_after(timeout):
            await self.flag.wait()

    async def drain(self) -> None:
        """Forget notices that arrived meanwhile: the next read sees all of their changes at once."""
        if self.hub is not None and self.flag is not None:
            self.flag = self.hub.rearm(self.channel, self.flag)

    async def close(self) -> None:
        if self.hub is not None and self.flag is not None:
            hub, flag, self.hub, self.flag = self.hub, self.flag, None, None
            # Shielded: a stream closes because its client went away, i.e. inside a cancelled scope.
            with anyio.CancelScope(shield=True):
                await hub.unsubscribe(self.channel, flag)


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


async def event_stream(run_id: str, ctx: Context, *, expires_at: float | None = None,
                       release: Callable[[], None] | None = None) -> AsyncIterator[bytes]:  # fmt: skip
    """The SSE byte stream of one run: ``run`` events with the document, then ``end`` with the final status.

    A stream is only as good as the token that opened it: at ``expires_at``
    (Unix time, the token's ``exp``) it sends ``expired`` and closes, so a
    client must come back with a fresh token. ``release`` frees the user's
    stream slot however the stream ends.
    """
    try:
        settings = ctx.settings
        yield f"retry: {RETRY_MS}\n\n".encode()
        started = last_write = time.monotonic()
        updates = watch_run(run_id, poll=settings.events_poll, min_interval=settings.events_min_interval)
        async with aclosing(updates):  # the subscription is closed when the stream ends, however it ends
            async for record in updates:
                if expires_at is not None and time.time() >= expires_at:
                    yield sse("expired", {"message": "the token expired; reconnect with a fresh one"})
                    return
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
    finally:
        if release is not None:
            release()


@router.get(
    "/runs/{run_id}/events",
    response_class=StreamingResponse,
    summary="Follow a run: server-sent events until it ends",
    responses={
        200: {
            "description": "text/event-stream: a `run` event with the run document (as GET /v1/runs/{id}) now and "
            "after each change; an `end` event with the final status; `expired` when the token expires (reconnect "
            "with a fresh one); `: keep-alive` comments while quiet",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        429: {"model": ErrorResponse, "description": "the user already holds HAULAGE_API_MAX_STREAMS_PER_USER streams"},
    },
)
async def run_events(record: VisibleRun, user: CurrentUser, ctx: Context) -> StreamingResponse:
    release = ctx.streams.acquire(user.id)
    return StreamingResponse(
        event_stream(record.id, ctx, expires_at=user.expires_at, release=release),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # proxies must not buffer the stream
        background=BackgroundTask(release),  # also when the stream never started (idempotent)
    )
