"""Requests that arrive together, answered together: the queue in front of a Personalizer (`mta serve`).

One worker thread owns the Personalizer (it is not thread-safe) and calls its `answer_many` on groups. It takes the
oldest waiting request and lets others join its group for up to `max_wait_ms` from that request's arrival: requests
of the same method, one per user id, at most `group_size`. Requests of other methods wait for a group of their own.
The queue is bounded (`Full` when it holds `queue_size`), a request still queued `timeout_s` after its arrival, or
whose future was cancelled, is skipped, and an exception other than a request's InputError fails only its group
(`Crashed`). `close` refuses new requests (`Draining`); `drain` also lets the worker finish what is queued and stop."""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mta.errors import InputError
from mta.log import log

if TYPE_CHECKING:
    from mta.run.personalizer import Answered, Request


class Full(Exception):
    """The queue holds `queue_size` requests (HTTP 429)."""


class Draining(Exception):
    """The gatherer is closed to new requests (HTTP 503)."""


class Expired(Exception):
    """A request waited `timeout_s` in the queue and was skipped (HTTP 504)."""


class Crashed(Exception):
    """`answer_many` raised something other than an InputError; the requests of its group fail (HTTP 500)."""


@dataclass(frozen=True)
class GatherConfig:
    """How requests are gathered into groups. `group_size` None: the run profile's (`mta serve` fills it in)."""

    max_wait_ms: float = 200.0  # latency budget: how long the oldest waiting request waits for others to join it
    queue_size: int = 64  # requests waiting, not counting the group in flight
    timeout_s: float = 600.0  # per request, from its arrival to its answer
    group_size: int | None = None

    def __post_init__(self):
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms: {self.max_wait_ms}; 0 or more (0: a group is whatever is waiting)")
        if self.queue_size < 1:
            raise ValueError(f"queue_size: {self.queue_size}; 1 or more")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: {self.timeout_s}; more than 0")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size}; 1 or more, or None for the run profile's")


@dataclass
class Outcome:
    """What a request's future resolves to: its Answered or the InputError that refused it, the seconds it waited
    in the queue and the seconds from its arrival to its answer."""

    result: Answered | InputError
    queued_s: float
    total_s: float


@dataclass
class Waiting:
    request: Request
    future: Future
    arrived: float  # time.perf_counter()


class Gatherer:
    """The queue and its worker loop (`work`), on a thread started here or, with `start` False, on the caller's
    thread; `answer_many` is called from that one thread only. `mta serve` runs the loop on the main thread: torch's
    OpenMP element-wise kernels run about twice as slow from a second thread (measured in docs/serving.md)."""

    def __init__(self, answer_many: Callable[[Sequence[Request]], list[Answered | InputError]],
                 config: GatherConfig, start: bool = True):
        if config.group_size is None:
            raise ValueError("group_size: None; the Gatherer needs a number (mta serve takes the run profile's)")
        self.answer_many = answer_many
        self.config = config
        self.waiting: deque[Waiting] = deque()
        self.cond = threading.Condition()  # guards waiting and closed; an RLock, so a signal handler may close
        self.closed = False
        self.stopped = threading.Event()  # set when `work` returns
        if start:
            threading.Thread(target=self.work, name="mta-gatherer", daemon=True).start()

    def submit(self, request: Request) -> Future:
        """A future of the request's Outcome; raises Draining once closed, Full when `queue_size` wait."""
        with self.cond:
            if self.closed:
                raise Draining("draining: the server is shutting down and takes no new requests")
            self.prune(time.perf_counter())
            if len(self.waiting) >= self.config.queue_size:
                raise Full(f"queue: {len(self.waiting)} requests waiting, queue_size = {self.config.queue_size}; "
                           f"retry later")
            item = Waiting(request, Future(), time.perf_counter())
            self.waiting.append(item)
            self.cond.notify_all()
        return item.future

    def queued(self) -> int:
        with self.cond:
            return len(self.waiting)

    def close(self) -> None:
        """Refuse new requests; the worker stops once the queue is empty."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Close, then wait up to `timeout` seconds (None: as long as it takes) for the worker to answer every
        queued request and the group in flight and stop; True when it has stopped."""
        self.close()
        return self.stopped.wait(timeout)

    def work(self) -> None:
        """Answer groups until the gatherer is closed and nothing waits."""
        try:
            while (taken := self.take()) is not None:
                group, started = taken
                if group:
                    self.run(group, started)
        finally:
            self.stopped.set()

    def take(self) -> tuple[list[Waiting], float] | None:
        """The next group once it is full, its oldest request has waited `max_wait_ms` or the gatherer is closed;
        None when closed and nothing waits."""
        size, budget = self.config.group_size, self.config.max_wait_ms / 1000
        with self.cond:
            while True:
                now = time.perf_counter()
                self.prune(now)
                if not self.waiting:
                    if self.closed:
                        return None
                    self.cond.wait()
                    continue
                first = self.waiting[0]
                group, users = [], set()
                for item in self.waiting:
                    if item.request.method == first.request.method and item.request.user_id not in users:
                        group.append(item)
                        users.add(item.request.user_id)
                        if len(group) == size:
                            break
                left = first.arrived + budget - now
                if len(group) == size or left <= 0 or self.closed:
                    for item in group:
                        self.waiting.remove(item)
                    return [item for item in group if item.future.set_running_or_notify_cancel()], now
                self.cond.wait(left)

    def prune(self, now: float) -> None:
        """Drop the cancelled requests and fail those queued for `timeout_s` (caller holds the lock)."""
        for item in list(self.waiting):
            if item.future.cancelled():
                self.waiting.remove(item)
            elif now - item.arrived >= self.config.timeout_s:
                self.waiting.remove(item)
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(Expired(f"timeout: queued {now - item.arrived:.1f} s, timeout_s = "
                                                      f"{self.config.timeout_s:g}; skipped"))

    def run(self, group: list[Waiting], started: float) -> None:
        try:
            results = list(zip(group, self.answer_many([item.request for item in group]), strict=True))
        except Exception as e:
            log(f"gatherer: a group of {len(group)} failed, the server goes on:\n{traceback.format_exc()}")
            for item in group:
                item.future.set_exception(Crashed(f"crash: {type(e).__name__}: {e}; the {len(group)} requests of "
                                                  f"its group failed, the server goes on"))
            return
        done = time.perf_counter()
        for item, result in results:
            item.future.set_result(Outcome(result, queued_s=started - item.arrived, total_s=done - item.arrived))
