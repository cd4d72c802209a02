"""A fake engine implementing server/engine.py's Engine protocol, for gateway behaviour the
model does not affect: timeouts, client disconnects, engine death, backpressure.

Each request answers `tokens` words ("w0 w1 ..."), one per step; `gate` (an asyncio.Event)
holds every step after the first `free_steps` until it is set, so a test decides when the
engine makes progress instead of guessing how fast it is. `running` holds the ids of requests in the engine
(added on submission, removed when the request finishes or is aborted); `aborted` lists
the ids removed before they finished.
"""

import asyncio
from collections.abc import AsyncIterator

from mdlserve.server.engine import Completion, Step
from mdlserve.server.errors import EngineDead
from mdlserve.server.request import PreparedRequest


class FakeTokenizer:
    """One token per character of the rendered chat; an audio part renders as one <|AUDIO|>."""

    AUDIO = "\U000f0000"  # a private-use code point: no test's text holds it (a real placeholder is a special token)

    def apply_chat_template(self, conversation: list[dict], *, tokenize: bool, add_generation_prompt: bool) -> str:
        lines = []
        for message in conversation:
            parts = [self.AUDIO if p["type"] == "audio" else p["text"] for p in message["content"]]
            lines.append(f"{message['role']}:{''.join(parts)}")
        return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")

    def encode(self, text: str, *, add_special_tokens: bool, split_special_tokens: bool = False) -> list[int]:
        text.encode("utf-8")  # a real tokenizer fails on lone surrogates too
        return [ord(ch) for ch in text]

    def __len__(self) -> int:
        return 0x110000  # every code point is a token


class FakeEngine:
    def __init__(self, tokens: int = 4, free_steps: int = 0):
        self.tokenizer = FakeTokenizer()
        self.tokens = tokens
        self.free_steps = free_steps
        self.gate = asyncio.Event()
        self.gate.set()
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.submitted: list[PreparedRequest] = []
        self.arrival_times: list[float] = []  # what the gateway passed as each request's arrival
        self.dead = False
        self.started = asyncio.Event()
        self.fail_start = False

    async def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("the fake engine was told not to start")
        self.started.set()

    def kill(self) -> None:
        """The engine dies: running requests and new ones raise EngineDead."""
        self.dead = True
        self.gate.set()

    async def generate(self, request: PreparedRequest, request_id: str, arrival_time: float) -> AsyncIterator[Step]:
        if self.dead:
            raise EngineDead()
        self.submitted.append(request)
        self.arrival_times.append(arrival_time)
        self.running.add(request_id)
        finished = False
        try:
            for i in range(min(self.tokens, request.sampling.max_tokens)):
                if i >= self.free_steps:
                    await self.gate.wait()
                if self.dead:
                    raise EngineDead()
                last = i == min(self.tokens, request.sampling.max_tokens) - 1
                reason = "length" if last else None
                yield Step(
                    [Completion(k, f"w{i} ", 1, reason) for k in range(request.sampling.n)], request.prompt_tokens
                )
            finished = True
        finally:
            self.running.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDead()

    async def log_stats(self) -> None:
        pass

    def shutdown(self) -> None:
        self.dead = True
        self.gate.set()
