"""Admission control: how many clip units may be in the engine before we answer 429.

Every admitted request goes to the engine at once (vLLM's scheduler batches continuously
and queues what does not fit); this object only bounds the total. A request weighs
`n * max(1, clips)` units: each of its `n` sequences carries all of its clips. Capacity is
`max_num_seqs` (what one batch runs) plus `max_queue` (what may wait for a slot).
"""

import asyncio
from dataclasses import dataclass

from mdlserve.server.errors import ApiError
from mdlserve.server.metrics import GatewayMetrics


def request_weight(num_clips: int, n: int) -> int:
    return n * max(1, num_clips)


@dataclass
class Ticket:
    """An admitted request's units; `release()` is idempotent so every exit path may call it."""

    admission: "Admission"
    weight: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self.weight)


class Admission:
    def __init__(self, max_num_seqs: int, max_queue: int, metrics: GatewayMetrics):
        self.max_running = max_num_seqs
        self.capacity = max_num_seqs + max_queue
        self.metrics = metrics
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, weight: int) -> Ticket:
        """Admit now or raise: 400 when the request could never fit, 429 when full now."""
        if weight > self.capacity:
            raise ApiError(
                400,
                f"the request needs {weight} sequence slots (n x audio clips) but the server admits at most "
                f"{self.capacity}",
                code="request_too_large",
            )
        if self.in_flight + weight > self.capacity:
            raise ApiError(
                429,
                f"server is at capacity ({self.in_flight} of {self.capacity} clip slots in use); retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.in_flight += weight
        self._idle.clear()
        self._publish()
        return Ticket(self, weight)

    def _release(self, weight: int) -> None:
        self.in_flight -= weight
        if self.in_flight == 0:
            self._idle.set()
        self._publish()

    def _publish(self) -> None:
        self.metrics.clips_in_flight.set(self.in_flight)
        self.metrics.queue_length.set(max(0, self.in_flight - self.max_running))

    async def wait_idle(self) -> None:
        await self._idle.wait()
