"""How many inferences run at once, and how many may wait.

One inference of a legal 512 x 512 x 1000 CT takes gigabytes and a minute on a small machine, and
MONAI Label 0.8.5 runs as many at once as requests arrive (its thread pool has 40 threads): a few
clients, or one script, could take every byte of memory. :class:`InferenceSlots` lets
``max_running`` inferences run (``--conf max_concurrent_infer``, default: one per two cores) and up
to ``max_waiting`` more wait for a slot (``--conf max_queued_infer``, default 8) in the order they
came; a request beyond that is refused at once with 503 and a ``Retry-After`` that estimates when
a slot frees, and waits nowhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import deque

from fastapi import HTTPException

from contourcl.serving.conf import conf_int

DEFAULT_MAX_QUEUED = 8


def default_running() -> int:
    """One inference per two cores (each uses several threads), at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


class InferenceSlots:
    """A first-come, first-served limit on running inferences with a bounded queue."""

    def __init__(self, max_running: int, max_waiting: int = DEFAULT_MAX_QUEUED):
        self.max_running = int(max_running)
        self.max_waiting = int(max_waiting)
        self._cond = threading.Condition()
        self._running = 0
        self._queue: deque[object] = deque()
        self._seconds: deque[float] = deque(maxlen=20)  # recent inference times, for Retry-After

    @classmethod
    def from_conf(cls, conf: dict) -> InferenceSlots:
        return cls(conf_int(conf, "max_concurrent_infer", default_running(), minimum=1),
                   conf_int(conf, "max_queued_infer", DEFAULT_MAX_QUEUED, minimum=0))

    def status(self) -> dict:
        with self._cond:
            return {"max_concurrent_infer": self.max_running, "max_queued_infer": self.max_waiting,
                    "running": self._running, "queued": len(self._queue)}

    def retry_after(self) -> int:
        """Seconds until a queued place is likely to free: the median recent inference time (10 s
        before the first) times the queue's length over the running slots."""
        times = sorted(self._seconds)
        typical = times[len(times) // 2] if times else 10.0
        return max(1, math.ceil(typical * (len(self._queue) + 1) / self.max_running))

    @contextlib.contextmanager
    def slot(self):
        """Run the ``with`` block in a slot: at once, after waiting its turn, or not at all (503)."""
        me = object()
        with self._cond:
            if self._running >= self.max_running or self._queue:
                if len(self._queue) >= self.max_waiting:
                    raise HTTPException(503, f"the server is busy: {self._running} inference(s) running and {len(self._queue)} waiting "
                                             f"(--conf max_concurrent_infer {self.max_running}, --conf max_queued_infer {self.max_waiting}); "
                                             "try again later", headers={"Retry-After": str(self.retry_after())})
                self._queue.append(me)
                while self._running >= self.max_running or self._queue[0] is not me:
                    self._cond.wait()
                self._queue.popleft()
            self._running += 1
        started = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._seconds.append(time.monotonic() - started)
                self._cond.notify_all()
