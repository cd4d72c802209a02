"""Client-disconnect handling for both response styles.

A client that goes away must not leave work in the engine: non-streaming handlers race
the work against `http.disconnect`; SSE responses always listen for the disconnect (on
every ASGI spec version) and close their body iterator, which closes the engine stream,
which makes vLLM abort the request.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
# nginx's "client closed request": recorded in metrics and logs, never seen by the client.
CLIENT_CLOSED = 499


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def sse_event(payload: BaseModel | dict | str) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude_none=False)
    elif isinstance(payload, dict):
        data = json.dumps(payload)
    else:
        data = payload
    return f"data: {data}\n\n"


class SSEResponse(StreamingResponse):
    """text/event-stream that stops (and closes its iterator) when the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], **kwargs):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
