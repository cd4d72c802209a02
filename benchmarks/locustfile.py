"""The locust side of `python -m mdlserve.benchmarks.anchors` (`locust -f` this file).

Each user sends the next of the request bodies the anchor built before the run (one JSON
body per line of $ANCHOR_BODIES, encoded as `bench serve` encodes its own) to
/v1/chat/completions and waits for the whole answer, with no pause between requests: `-u`
users hold that many requests in flight, a closed loop. Once every body has been answered
the run stops, and $ANCHOR_RECORD receives locust's own statistics of the requests (count,
failures, median and mean response time), the time of every send and of the last answer
(from the first send to the last answer is the window of vLLM's req/s definition, which
locust's statistics do not keep; the sends also show whether the users send in step) and
the answers' output tokens (their `usage`).
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

with open(os.environ["ANCHOR_BODIES"], "rb") as _bodies:
    BODIES = [line for line in _bodies.read().split(b"\n") if line]
_api_key = os.environ.get("ANCHOR_API_KEY")
HEADERS = {"Content-Type": "application/json", **({"Authorization": f"Bearer {_api_key}"} if _api_key else {})}
TIMEOUT_S = 600.0


@dataclass
class Progress:
    answered: int = 0
    output_tokens: int = 0
    send_times: list[float] = field(default_factory=list)  # time.time() of every send
    last_answer: float | None = None


_unsent = iter(range(len(BODIES)))
_progress = Progress()


class ChatUser(FastHttpUser):
    wait_time = constant(0)
    connection_timeout = TIMEOUT_S
    network_timeout = TIMEOUT_S

    @task
    def chat(self) -> None:
        index = next(_unsent, None)
        if index is None:
            raise StopUser()
        _progress.send_times.append(time.time())
        body = BODIES[index]  # bytes, which geventhttpclient sends as they are (its stubs say str)
        with self.client.post("/v1/chat/completions", data=body, headers=HEADERS, catch_response=True) as r:  # type: ignore[arg-type]
            problem = None if r.status_code == 200 else f"HTTP {r.status_code}: {(r.text or '')[:200]}"
            if problem is None:
                try:
                    _progress.output_tokens += json.loads(r.content)["usage"]["completion_tokens"]
                except (ValueError, KeyError, TypeError) as exc:  # counted, so that the run still ends
                    problem = f"an answer without usage: {exc!r}"
            if problem is not None:
                r.failure(problem)
        _progress.answered += 1
        _progress.last_answer = time.time()
        if _progress.answered == len(BODIES):
            # From a greenlet of its own: quit() stops every user, and one stopping its own
            # greenlet inside quit() would never finish it (the run then lasts its --run-time).
            gevent.spawn(self.environment.runner.quit)
            raise StopUser()


@events.quitting.add_listener
def _write_record(environment, **kwargs) -> None:
    total = environment.stats.total
    record = {
        **asdict(_progress),
        "num_requests": total.num_requests,
        "num_failures": total.num_failures,
        "median_response_time_ms": total.median_response_time,
        "avg_response_time_ms": total.avg_response_time,
    }
    with open(os.environ["ANCHOR_RECORD"], "w") as out:
        json.dump(record, out)
