"""The engine session: admit, prepare, submit, stream, abort, with one deadline per request.

`Session.start` admits the request (its admission units), has the request builder load
the audio and tokenize, submits to the engine and waits for the first output, so that
everything that can fail for a client reason fails before a response (or SSE stream)
starts. The returned `Run` yields the remaining outputs until the deadline
(--request-timeout, covering fetch, decode and generation). However a request ends
(answered, failed, timed out, client gone), `Run.close` aborts its engine request and
releases its admission units; a request whose every choice finished has released them already.

A client that goes away must not leave work in the engine: non-streaming work races the
`http.disconnect` message (`unless_disconnected`); SSE responses listen for it and close
their event iterator, which closes the Run.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mdlserve.server.admission import CLIP_SLOTS, Admission, Ticket, request_weight
from mdlserve.server.engine import EngineHandle, Step, TokenLogprob
from mdlserve.server.errors import (
    CLIENT_CLOSED_FLAG,
    ApiError,
    ClientDisconnected,
    EngineDead,
    RequestTimedOut,
    error_event,
)
from mdlserve.server.metrics import GatewayMetrics
from mdlserve.server.request import Conversation, RequestBuilder
from mdlserve.server.schemas import SamplingFields

logger = logging.getLogger("mdlserve.server")
T = TypeVar("T")
DONE = "data: [DONE]\n\n"


@dataclass
class Choice:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Delta:
    index: int
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


class Session:
    def __init__(
        self,
        handle: EngineHandle,
        builder: RequestBuilder,
        admission: Admission,
        metrics: GatewayMetrics,
        request_timeout: float,
    ):
        self.handle = handle
        self.builder = builder
        self.admission = admission
        self.metrics = metrics
        self.request_timeout = request_timeout

    def admit(self, request: Request, weight: int, *, slots: str = CLIP_SLOTS) -> Ticket:
        """The request's units, all at once (Admission.admit), taking over the one
        AdmissionGateMiddleware reserved when its headers arrived."""
        reservation = getattr(request.state, "admission_reservation", None)
        return self.admission.admit(weight, reserved=reservation, slots=slots)

    async def start(
        self,
        request: Request,
        conversation: Conversation,
        fields: SamplingFields,
        prefix: str,
        *,
        stream: bool,
        ticket: Ticket | None = None,
    ) -> "Run":
        """Admit, prepare and submit; the running request with its first deltas. Raises
        ClientDisconnected when the client went away meanwhile; every failure releases
        the admission units and aborts the engine request. Without `stream` the engine
        sends only the finished answer, so its first deltas are all of it. `ticket`: units
        admitted already, for one engine request of several that were admitted together."""
        if ticket is None:
            ticket = self.admit(request, request_weight(len(conversation.audio), fields.n))
        run = Run(
            self,
            f"{prefix}-{uuid.uuid4().hex}",
            request.state.request_id,
            ticket,
            request.state.arrival,
            final_only=not stream,
        )
        logger.info("request %s -> engine request %s (%d clips)", run.http_id, run.request_id, len(conversation.audio))
        try:
            grant = getattr(request.state, "body_grant", None)  # BodySizeLimitMiddleware's
            await unless_disconnected(
                request, run.begin(conversation, fields, on_prepared=grant and grant.release), self.handle.died
            )
        except BaseException:
            await run.close()
            raise
        return run

    async def finish(self, request: Request, run: "Run") -> None:
        """Collect the remaining outputs of a non-streaming request."""

        async def drain() -> None:
            async for _ in run.rest():
                pass

        try:
            await unless_disconnected(request, drain(), self.handle.died)
        finally:
            await run.close()


class Arrival(NamedTuple):
    """When a request's headers reached the gateway: `time.perf_counter()` for durations and
    `time.time()` for vLLM's arrival_time and the response's `created`."""

    monotonic: float
    wall: float


class Run:
    """One request's trip through the engine, with its deadline and latency metrics."""

    def __init__(
        self,
        session: Session,
        request_id: str,
        http_id: str,
        ticket: Ticket,
        arrival: Arrival,
        *,
        final_only: bool = False,
    ):
        self.session = session
        self.final_only = final_only
        self.request_id = request_id
        self.http_id = http_id
        self.ticket = ticket
        self.arrival, self.arrival_time = arrival
        self.created = int(self.arrival_time)
        self.deadline = asyncio.get_running_loop().time() + session.request_timeout
        self.prompt_tokens = 0
        self.audio_seconds = 0.0
        self.n = 1
        self.choices: dict[int, Choice] = {}
        self.first: list[Delta] = []
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._stream: AsyncGenerator[Step, None] | None = None

    async def begin(
        self, conversation: Conversation, fields: SamplingFields, on_prepared: Callable[[], None] | None = None
    ) -> None:
        """Prepare and submit; `on_prepared` is called once the request is built (the body's
        bytes go back to the body budget: what it holds from now on, admission bounds)."""
        handle = self.session.handle
        try:
            async with asyncio.timeout_at(self.deadline):
                prepared = await self.session.builder.prepare(
                    conversation, fields, handle.engine.tokenizer, final_only=self.final_only
                )
                if on_prepared is not None:
                    on_prepared()
                self.prompt_tokens, self.audio_seconds, self.n = (
                    prepared.prompt_tokens,
                    prepared.audio_seconds,
                    prepared.sampling.n,
                )
                self.session.metrics.time_to_engine.observe(time.perf_counter() - self.arrival)
                self._stream = handle.engine.generate(prepared, self.request_id, self.arrival_time)
                self.first = await self._next()
        except TimeoutError:
            raise RequestTimedOut(self.session.request_timeout) from None

    async def rest(self) -> AsyncIterator[list[Delta]]:
        """Remaining deltas until every choice finished. Raises RequestTimedOut at the deadline."""
        while not self.finished and self._stream is not None:
            try:
                async with asyncio.timeout_at(self.deadline):
                    deltas = await self._next()
            except TimeoutError:
                raise RequestTimedOut(self.session.request_timeout) from None
            yield deltas

    @property
    def finished(self) -> bool:
        """Every one of the n choices has ended. vLLM reports a choice only once it produced
        something, and with n > 1 (data parallel replicas above all) one step's output may
        carry some choices' last tokens before others have started."""
        return len(self.choices) == self.n and all(c.finish_reason is not None for c in self.choices.values())

    async def _next(self) -> list[Delta]:
        if self._stream is None:
            return []
        try:
            step = await anext(self._stream)
        except StopAsyncIteration:
            self._stream = None
            return []
        except EngineDead:
            self.session.handle.mark_dead()
            raise
        now = time.perf_counter()
        if step.prompt_tokens:
            self.prompt_tokens = step.prompt_tokens
        deltas = []
        for completion in step.completions:
            choice = self.choices.setdefault(completion.index, Choice())
            if completion.num_tokens:
                if self._first_token_at is None:
                    self._first_token_at = now if step.first_token_s is None else self.arrival + step.first_token_s
                    self.session.metrics.ttft.observe(self._first_token_at - self.arrival)
                self._last_token_at = now
            choice.tokens += completion.num_tokens
            choice.text += completion.text
            choice.logprobs.extend(completion.logprobs or ())
            if completion.finish_reason is not None:
                choice.finish_reason = completion.finish_reason
            deltas.append(Delta(completion.index, completion.text, completion.finish_reason, completion.logprobs))
        if self.finished:
            self._observe_decode()
            # The units bound what is in the engine, and this request's part there is over:
            # freed before its last delta goes out, so a client that sends its next request
            # on this one's end never finds this one still counted.
            self.ticket.release()
        return deltas

    def _observe_decode(self) -> None:
        tokens = max((c.tokens for c in self.choices.values()), default=0)
        if tokens >= 2 and self._first_token_at is not None and self._last_token_at is not None:
            self.session.metrics.decode.observe((self._last_token_at - self._first_token_at) / (tokens - 1))

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices.values())

    def text(self, index: int = 0) -> str:
        choice = self.choices.get(index)
        return choice.text if choice else ""

    async def close(self) -> None:
        """Abort in the engine if still running (closing its iterator), release the units."""
        self.ticket.release()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()

    async def events(self, events: AsyncIterator[str]) -> AsyncGenerator[str, None]:
        """Relay `events`, then `[DONE]`. An error after the stream began (its headers are
        sent) becomes a last `data: {"error": ...}` event. SSEResponse closes the run however
        the stream ends (client disconnects included)."""
        try:
            async for event in events:
                yield event
        except ApiError as exc:
            if exc.reason:
                self.session.metrics.rejections.labels(reason=exc.reason).inc()
            yield error_event(exc, self.http_id)
        except Exception as exc:  # our bug: logged, reported with the request id only
            yield error_event(exc, self.http_id)
        yield DONE


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T], engine_died: asyncio.Event) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientDisconnected;
    if the engine dies first, cancel it and raise EngineDead (503): the server is about to
    exit, and a request cancelled by that exit would get a bare 500."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    death = asyncio.create_task(engine_died.wait())
    try:
        done, _ = await asyncio.wait({task, watcher, death}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if death in done:
            raise EngineDead()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        death.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def sse_event(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, ensure_ascii=True)
    return f"data: {data}\n\n"


class SSEResponse(StreamingResponse):
    """text/event-stream of a Run's events that stops when the client leaves. `close` (the
    Run's by default; a transcript's closes all its windows) is the one place a streamed
    request is closed, however the response ends, even if the body never started: a client that leaves as the headers
    go out cancels the stream before the events' generator runs, and closing a generator
    that never ran skips its `finally`."""

    media_type = "text/event-stream"
    body_iterator: AsyncGenerator[str, None]

    def __init__(
        self, run: Run, events: Callable[[], AsyncIterator[str]], close: Callable[[], Awaitable[None]] | None = None
    ):
        super().__init__(run.events(events()), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.close = close or run.close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Streams until the last event is sent or the client leaves, whichever is first.
        uvicorn answers a pending `receive` with a disconnect as soon as the response's last
        chunk is sent, and the listener can resume before the cancellation reaches it; a
        disconnect after the stream ended is the end, not the client leaving."""
        sent = False
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    nonlocal sent
                    await self.stream_response(send)
                    sent = True
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                if not sent:
                    scope.setdefault("state", {})[CLIENT_CLOSED_FLAG] = True  # logged and counted as 499, not 200
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.close()
