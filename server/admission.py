"""Admission control: how many clip units may be in the engine before we answer 429.

Every admitted request goes to the engine at once (vLLM's scheduler batches continuously
and queues what does not fit); this object only bounds the total. A request weighs
`n * max(1, clips)` units: each of its `n` sequences carries all of its clips. Capacity is
`max_num_seqs` (what one batch runs) plus `max_queue` (what may wait for a slot), each
times --data-parallel-size (Settings.admitted_running / admitted_queued): every engine
replica runs its own batch and queue.

A unit is reserved as soon as a work request's headers arrive (`reserve`, from
AdmissionGateMiddleware), before its body is read: under overload a request that would be
refused gets its 429 at once instead of after its 1.3 MB of JSON has been parsed, and
bodies still uploading count against capacity. The route's `admit` then takes the
reservation over at the request's real weight.
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

    def reserve(self) -> Ticket | None:
        """One unit for a request whose body has not been read yet; None when full."""
        if self.in_flight >= self.capacity:
            return None
        return self._take(1)

    def admit(self, weight: int, reserved: Ticket | None = None) -> Ticket:
        """Admit now or raise: 400 when the request could never fit, 429 when full now.
        A `reserved` ticket's units count towards `weight` and pass to the new ticket."""
        if weight > self.capacity:
            raise ApiError(
                400,
                f"the request needs {weight} sequence slots (n x audio clips) but the server admits at most "
                f"{self.capacity}",
                code="request_too_large",
            )
        held = 0 if reserved is None or reserved.released else reserved.weight
        if self.in_flight - held + weight > self.capacity:
            raise self.full()
        if reserved is not None and held:
            reserved.released = True  # its units now belong to the returned ticket
            self.in_flight -= held
        return self._take(weight)

    def full(self) -> ApiError:
        return ApiError(
            429,
            f"server is at capacity ({self.in_flight} of {self.capacity} clip slots in use); retry shortly",
            code="queue_full",
            headers={"Retry-After": "1"},
        )

    def _take(self, weight: int) -> Ticket:
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
