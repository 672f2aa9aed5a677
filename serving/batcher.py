"""Dynamic batching (as Triton's dynamic batcher): rows from concurrent requests run through a model together.

One `DynamicBatcher` per loaded model. A request submits its rows (one sample each) with a deadline; a single
worker task collects up to `max_batch` rows, waiting at most `max_queue_delay` after the oldest one arrived,
drops rows whose request was cancelled or whose deadline passed (they never reach the model), runs the batch in
a thread pool (ONNX Runtime and TensorRT release the GIL) and resolves each row's future. The queue is bounded:
a request whose rows do not fit is refused with QueueFull (RESOURCE_EXHAUSTED), all or nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from typing import Callable, Sequence

import numpy as np

from .errors import DeadlineExceeded, QueueFull, ServingError, Unavailable
from .logs import log
from .metrics import Metrics

logger = logging.getLogger("serving.batcher")


class BatchItem:
    """One queued row: its input, its future, its absolute deadline (time.monotonic) and its timestamps."""

    __slots__ = ("row", "future", "deadline", "enqueued", "started")

    def __init__(self, row: np.ndarray, future: asyncio.Future, deadline: float | None, enqueued: float):
        self.row = row
        self.future = future
        self.deadline = deadline
        self.enqueued = enqueued
        self.started: float | None = None

    @property
    def queue_s(self) -> float:
        return (self.started - self.enqueued) if self.started is not None else 0.0


class DynamicBatcher:
    """Batch rows of the same shape from any number of requests.

    Args:
        name: model name (metrics label).
        run_batch: blocking function [B, ...] -> [B, ...] run in `executor`.
        max_batch: most rows per call of run_batch.
        max_queue_delay_s: how long the oldest queued row waits for more rows before a partial batch runs.
        max_queue: most rows waiting (not counting the batch being run).
    """

    def __init__(self, name: str, run_batch: Callable[[np.ndarray], np.ndarray], *, max_batch: int,
                 max_queue_delay_s: float, max_queue: int, executor: Executor | None = None,
                 metrics: Metrics | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.name = name
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)
        self.max_queue = max_queue
        self.executor = executor
        self.metrics = metrics
        self._queue: collections.deque[BatchItem] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.batches_run = 0
        self.rows_run = 0

    # ------------------------------------------------------------------------------------------------------
    # Producer side

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return not self._closing

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker(), name=f"batcher-{self.name}")

    def enqueue(self, rows: Sequence[np.ndarray] | np.ndarray, deadline: float | None = None) -> list[BatchItem]:
        """Queue rows now (all or none) and return their items; await `item.future` for each row's output.

        Cancel a future (or let its deadline pass) to have the row dropped before it reaches the model.

        Raises:
            QueueFull: the rows do not fit in the queue.
            Unavailable: the batcher is closing.
        """
        if self._closing:
            raise Unavailable(f"model {self.name!r} is being unloaded")
        n = len(rows)
        if n > self.max_queue:
            raise QueueFull(f"{n} rows can never fit the queue of model {self.name!r} ({self.max_queue} rows)")
        if len(self._queue) + n > self.max_queue:
            self._purge()
            if len(self._queue) + n > self.max_queue:
                raise QueueFull(f"queue of model {self.name!r} is full ({len(self._queue)} of {self.max_queue} rows "
                                f"waiting); retry later")
        self.start()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [BatchItem(rows[i], loop.create_future(), deadline, now) for i in range(n)]
        for it in items:
            it.future.add_done_callback(self._on_done)
        self._queue.extend(items)
        self._set_depth()
        self._wakeup.set()
        return items

    async def submit(self, rows: Sequence[np.ndarray] | np.ndarray, deadline: float | None = None,
                     ) -> tuple[np.ndarray, float]:
        """Queue rows and wait for all of them; returns (outputs stacked [n, ...], longest queue wait in s).

        Cancelling the awaiting task cancels the rows that have not run yet.
        """
        items = self.enqueue(rows, deadline)
        try:
            outs = [await it.future for it in items]
        finally:
            cancel_items(items)
        return np.stack(outs), max(it.queue_s for it in items)

    async def close(self) -> None:
        """Stop accepting rows, finish the queued ones, stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    def _on_done(self, fut: asyncio.Future) -> None:
        if fut.cancelled():  # wake the worker: the row leaves the queue now, not when the batch window ends
            self._wakeup.set()

    # ------------------------------------------------------------------------------------------------------
    # Worker side

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))

    def _dead(self, it: BatchItem, now: float) -> str | None:
        if it.future.done():  # cancelled by its request (or resolved with an error already)
            return "cancelled"
        if it.deadline is not None and now >= it.deadline:
            it.future.set_exception(DeadlineExceeded("deadline exceeded while queued"))
            return "expired"
        return None

    def _drop(self, reason: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.rows_dropped.labels(self.name, reason).inc(n)

    def _purge(self) -> None:
        """Remove cancelled and expired rows from the whole queue."""
        now = time.monotonic()
        keep: collections.deque[BatchItem] = collections.deque()
        for it in self._queue:
            reason = self._dead(it, now)
            if reason is None:
                keep.append(it)
            else:
                self._drop(reason)
        self._queue = keep
        self._set_depth()

    def _take(self) -> list[BatchItem]:
        now = time.monotonic()
        batch: list[BatchItem] = []
        while self._queue and len(batch) < self.max_batch:
            it = self._queue.popleft()
            reason = self._dead(it, now)
            if reason is None:
                batch.append(it)
            else:
                self._drop(reason)
        self._set_depth()
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._purge()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for the batch to fill, at most max_queue_delay after the oldest live row arrived. Any wake-up
            # (new rows, a cancelled row, close) starts over: purge, then re-check against the oldest live row.
            if len(self._queue) < self.max_batch and not self._closing:
                now = time.monotonic()
                window_left = self._queue[0].enqueued + self.max_queue_delay_s - now
                if window_left > 0:
                    deadlines = [it.deadline for it in self._queue if it.deadline is not None]
                    timeout = min(window_left, max(0.0, min(deadlines) - now) + 1e-4) if deadlines else window_left
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout)
                        continue
                    except asyncio.TimeoutError:
                        if timeout < window_left:
                            continue  # a row's deadline passed: drop it and keep waiting for the batch
            batch = self._take()
            if not batch:
                continue
            started = time.monotonic()
            for it in batch:
                it.started = started
            try:
                x = np.stack([it.row for it in batch])
                out = await loop.run_in_executor(self.executor, self.run_batch, x)
            except Exception as exc:  # the model failed: every row of the batch gets the error
                log(logger, logging.ERROR, "batch failed", model=self.name, rows=len(batch), error=repr(exc))
                err = exc if isinstance(exc, ServingError) else ServingError(f"model {self.name!r} failed: {exc}")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(err)
                continue
            elapsed = time.monotonic() - started
            self.batches_run += 1
            self.rows_run += len(batch)
            if self.metrics is not None:
                m = self.metrics
                m.batch_size.labels(self.name).observe(len(batch))
                m.batch_latency.labels(self.name).observe(elapsed)
                m.rows_executed.labels(self.name).inc(len(batch))
                for it in batch:
                    m.queue_time.labels(self.name).observe(it.queue_s)
            for i, it in enumerate(batch):
                if not it.future.done():
                    it.future.set_result(out[i])


def cancel_items(items: Sequence[BatchItem]) -> None:
    """Cancel the rows that have not been resolved (the worker drops them before running the model)."""
    for it in items:
        if not it.future.done():
            it.future.cancel()
        elif not it.future.cancelled():
            it.future.exception()  # mark retrieved: no "exception was never retrieved" warnings
