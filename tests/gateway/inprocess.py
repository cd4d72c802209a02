"""The gateway in this process around a fake engine, driven through httpx's ASGITransport
(which does not run the app's lifespan, so `running_gateway` enters it), and a raw ASGI
caller for what a transport cannot do (disconnecting, withholding the body)."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI

from mdlserve.server.app import create_app
from mdlserve.server.settings import Settings
from mdlserve.server.state import GatewayState

from .fake_engine import FakeEngine

MODEL = "midashenglm-7b"
DEADLINE_S = 60.0  # generous: how long a condition may take on a busy machine


async def until(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    """Wait for `condition`, polling; fails only after `deadline_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


@dataclass
class Gateway:
    app: FastAPI
    engine: FakeEngine
    client: httpx.AsyncClient

    @property
    def state(self) -> GatewayState:
        return self.app.state.gateway


@asynccontextmanager
async def running_gateway(engine: FakeEngine | None = None, **settings: object) -> AsyncIterator[Gateway]:
    engine = engine or FakeEngine()
    app = create_app(Settings(model="fake", **settings), engine=engine)
    async with app.router.lifespan_context(app):
        await until(lambda: app.state.gateway.ready, "the fake engine is up")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=DEADLINE_S) as client:
            yield Gateway(app, engine, client)


def chat_body(content: object = "hi", **fields: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


@dataclass
class RawExchange:
    """One request sent straight into the ASGI app: `disconnect()` makes the next receive()
    say http.disconnect; `body_reads` counts how often the app asked for the body, which is
    withheld until `body_ready` is set (when given). `leave_at_headers`: the client leaves as
    the response's headers go out, and the send of them never completes. `on_chunk` sees
    each body chunk as the app sends it."""

    app: FastAPI
    path: str
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    status: int | None = None
    chunks: list[bytes] = field(default_factory=list)
    body_reads: int = 0
    content_type: bytes = b"application/json"
    body_ready: asyncio.Event | None = None
    leave_at_headers: bool = False
    on_chunk: Callable[[bytes], None] | None = None
    _gone: asyncio.Event = field(default_factory=asyncio.Event)

    def disconnect(self) -> None:
        self._gone.set()

    async def run(self) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
            "query_string": b"", "root_path": "", "server": ("gateway", 80), "client": ("127.0.0.1", 1),
            "headers": [(b"content-type", self.content_type), (b"content-length", str(len(self.body)).encode()),
                        *self.headers],
        }  # fmt: skip
        sent_body = False

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                self.body_reads += 1
                if self.body_ready is not None:
                    await self.body_ready.wait()
                return {"type": "http.request", "body": self.body, "more_body": False}
            await self._gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                if self.leave_at_headers:
                    self.disconnect()
                    await asyncio.Event().wait()  # until the app, told of the disconnect, cancels the send
            elif message.get("body"):
                self.chunks.append(message["body"])
                if self.on_chunk is not None:
                    self.on_chunk(message["body"])

        await self.app(scope, receive, send)


def raw_chat(app: FastAPI, headers: list[tuple[bytes, bytes]] | None = None, **fields: object) -> RawExchange:
    return RawExchange(app, "/v1/chat/completions", json.dumps(chat_body(**fields)).encode(), headers or [])


def raw_upload(
    app: FastAPI, path: str, audio: bytes, body_ready: asyncio.Event | None = None, **fields: str
) -> RawExchange:
    """A multipart/form-data request: `audio` as the `file` part, `fields` (and `model`) beside it."""
    request = httpx.Request(
        "POST", "http://gateway" + path, files={"file": ("clip", audio)}, data={"model": MODEL, **fields}
    )
    content_type = request.headers["content-type"].encode()
    return RawExchange(app, path, request.read(), content_type=content_type, body_ready=body_ready)


def spawn(work: Awaitable) -> asyncio.Task:
    return asyncio.ensure_future(work)
