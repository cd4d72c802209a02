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
reservation over at the request's real weight, or gives it back at once when it refuses.

A request that becomes several engine requests (a transcript's 30 s windows) is admitted
at its whole weight in one `admit`, then `Ticket.split` into one ticket per engine request:
all of it fits or none of it goes to the engine.

With --api-processes N the count lives in shared memory (a multiprocessing Value, made by
the supervisor in api_processes.py) so the limits bound the whole server, not each
process; `in_flight` stays this process's own share, what its drain waits for.
"""

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Protocol

from mdlserve.server.errors import ApiError
from mdlserve.server.metrics import GatewayMetrics

# What a request's units count, for the 400 of a request that could never fit.
CLIP_SLOTS = "n x audio clips"


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

    def split(self, parts: int) -> list["Ticket"]:
        """These units as `parts` tickets of equal weight, each released on its own (by the
        engine request it goes with, as that one ends); this ticket no longer holds them."""
        share, rest = divmod(self.weight, parts)
        if self.released or rest:
            raise ValueError(f"cannot split a released ticket or {self.weight} units into {parts} equal parts")
        self.released = True
        return [Ticket(self.admission, share) for _ in range(parts)]


class Units(Protocol):
    """The clip units in flight: `value` read and changed under `get_lock()` (the interface
    of multiprocessing.Value)."""

    value: int

    def get_lock(self) -> contextlib.AbstractContextManager: ...


class LocalUnits:
    """Units of a gateway that is one process: its event loop serialises every change."""

    value = 0

    def get_lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class Admission:
    def __init__(self, max_num_seqs: int, max_queue: int, metrics: GatewayMetrics, units: Units | None = None):
        """`units`: the count shared by every API process (--api-processes); None: this
        process's own."""
        self.max_running = max_num_seqs
        self.capacity = max_num_seqs + max_queue
        self.metrics = metrics
        self.units = units if units is not None else LocalUnits()
        self.in_flight = 0  # this process's units (of `units.value`, the server's)
        self._idle = asyncio.Event()
        self._idle.set()

    def reserve(self) -> Ticket | None:
        """One unit for a request whose body has not been read yet; None when full."""
        with self.units.get_lock():
            if self.units.value >= self.capacity:
                return None
            return self._take(1)

    def admit(self, weight: int, reserved: Ticket | None = None, *, slots: str = CLIP_SLOTS) -> Ticket:
        """Admit now or raise: 400 when the request could never fit, 429 when full now.
        A `reserved` ticket's units count towards `weight` and pass to the new ticket; a
        refused request gives them back at once, so that requests refused together cannot
        all be refused for each other's reservations. `slots` says in the 400 what `weight`
        counts."""
        if weight > self.capacity:
            if reserved is not None:
                reserved.release()
            raise ApiError(
                400,
                f"the request needs {weight} sequence slots ({slots}) but the server admits at most {self.capacity}",
                code="request_too_large",
            )
        held = 0 if reserved is None or reserved.released else reserved.weight
        with self.units.get_lock():
            if self.units.value - held + weight <= self.capacity:
                if reserved is not None and held:
                    reserved.released = True  # its units now belong to the returned ticket
                    self._add(-held)
                return self._take(weight)
            refusal = self.full(weight, held)
        if reserved is not None:
            reserved.release()
        raise refusal

    def full(self, weight: int = 1, held: int = 0) -> ApiError:
        """The 429 for a request of `weight` units that had `held` of those in use reserved."""
        needs = f", this request needs {weight}" if weight > 1 else ""
        return ApiError(
            429,
            f"server is at capacity ({self.units.value - held} of {self.capacity} clip slots in use{needs}); "
            "retry shortly",
            code="queue_full",
            headers={"Retry-After": "1"},
        )

    def _take(self, weight: int) -> Ticket:
        self._add(weight)
        return Ticket(self, weight)

    def _release(self, weight: int) -> None:
        with self.units.get_lock():
            self._add(-weight)

    def _add(self, delta: int) -> None:
        """Called with the units' lock held."""
        self.units.value += delta
        self.in_flight += delta
        if self.in_flight == 0:
            self._idle.set()
        else:
            self._idle.clear()
        self.metrics.clips_in_flight.set(self.units.value)
        self.metrics.queue_length.set(max(0, self.units.value - self.max_running))

    async def wait_idle(self) -> None:
        await self._idle.wait()
