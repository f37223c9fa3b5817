"""The bounded worker pool that queries and thumbnails run on: workers, a capped queue, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from delf_retrieval.query.engine import Deadline, DeadlineExceeded


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()


class Pool:
    """``workers`` threads and a queue of at most ``max_queue`` jobs in front of them: a job that
    finds the queue full is refused (QueueFull) rather than kept. A job whose request passed its
    deadline while queued never starts; a running one stops at its next deadline check, and
    holds its worker until then."""

    class QueueFull(Exception):
        pass

    def __init__(self, name: str, workers: int, max_queue: int):
        self.name, self.workers, self.max_queue = name, workers, max_queue
        self.waiting = 0
        self.running = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=name)

    def _forget_if_cancelled(self, future) -> None:
        if future.cancelled():
            with self._lock:
                self.waiting -= 1

    async def run(self, job, deadline: Deadline):
        """``job(queued_seconds)`` on a worker; DeadlineExceeded when the deadline passes first."""
        with self._lock:
            if self.waiting + self.running >= self.workers + self.max_queue:
                raise Pool.QueueFull(f"{self.running} {self.name} jobs running and {self.waiting} waiting")
            self.waiting += 1
        queued = time.perf_counter()

        def work():
            with self._lock:
                self.waiting -= 1
                self.running += 1
            try:
                deadline.check("queued")
                return job(time.perf_counter() - queued)
            finally:
                with self._lock:
                    self.running -= 1

        future = self._executor.submit(work)
        future.add_done_callback(self._forget_if_cancelled)
        result = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(result), max(deadline.remaining(), 0))
        except TimeoutError:
            result.add_done_callback(_retrieve)  # its late outcome is nobody's: not "never retrieved"
            stage = "queued" if future.cancel() else "running"
            raise DeadlineExceeded(stage, deadline.seconds) from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
