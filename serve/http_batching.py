"""Dynamic batching for the HTTP feature service: requests that arrive together run as one forward pass.

As Triton's dynamic batcher: a request joins a queue; one worker task takes the oldest request and every
queued request of the same network input size (frames in one batch must match), up to ``max_batch`` frames
(and ``max_batch_pixels`` pixels, so a batch of large frames cannot take the memory of eight), waiting at
most ``max_delay_s`` after the oldest request arrived for the batch to fill. While a batch runs, new requests
queue, so under load batches form without any waiting. The forward pass runs in one dedicated thread: torch
modules and ONNX Runtime sessions are cheapest used serially, and a second concurrent forward pass would
only oversubscribe the CPU.

The queue holds at most ``max_queue`` waiting requests (default ``4 * max_batch``: four batches' worth, so a
full queue drains in about four forward passes); beyond it :meth:`DynamicBatcher.submit` raises
:class:`QueueFull` with a ``Retry-After`` estimate from the measured batch time. Every request has a deadline:
one still queued at its deadline is dropped before it reaches the network, and one whose batch has not
finished by then stops waiting; both raise :class:`DeadlineExceeded`.

``max_batch=1`` is the unbatched server (one request per forward pass, no delay), kept for comparison.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from densekit.serve.errors import DensekitError

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_DELAY_S = 0.005
# A batch of 2048x2048 frames would hold gigabytes of activations; cap a batch's pixels instead.
DEFAULT_MAX_BATCH_PIXELS = 2048 * 2048
DEFAULT_DEADLINE_S = 30.0

# frames (all resizing to ``key``), key (H, W) -> (B, D, h, w) float32
RunBatch = Callable[[list[np.ndarray], tuple[int, int]], np.ndarray]


class QueueFull(Exception):
    """The batching queue is full; ``retry_after`` is whole seconds until it has likely drained."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """A request was not answered by its deadline (queued too long, or its forward pass ran past it)."""


@dataclass
class _Item:
    frame: np.ndarray
    key: tuple[int, int]
    deadline: float  # time.monotonic()
    arrived: float
    future: asyncio.Future[np.ndarray] = field(repr=False)


@dataclass
class BatchStats:
    """Counters for ``/model`` and the tests: how many batches ran and of which sizes."""

    batches: int = 0
    requests: int = 0
    expired: int = 0
    rejected: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"batches": self.batches, "requests": self.requests, "expired": self.expired,
                "rejected": self.rejected, "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class DynamicBatcher:
    """Queue frames, run them in batches of one input size through ``run_batch`` (module docstring).

    Args:
        run_batch: ``(frames, (H, W)) -> (B, D, h, w)``; every frame resizes to ``(H, W)`` for the network.
        max_batch: most frames in one forward pass (1: no batching).
        max_delay_s: longest the oldest queued request waits for its batch to fill.
        max_queue: most requests waiting (not yet in a batch); None: ``4 * max_batch``.
        max_batch_pixels: most input pixels (B * H * W) in one batch; a single frame always fits.
    """

    def __init__(self, run_batch: RunBatch, *, max_batch: int = DEFAULT_MAX_BATCH,
                 max_delay_s: float = DEFAULT_MAX_DELAY_S, max_queue: int | None = None,
                 max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS) -> None:
        max_queue = 4 * max_batch if max_queue is None else max_queue
        if max_batch < 1 or max_queue < 1 or not 0 <= max_delay_s <= 1 or max_batch_pixels < 1:
            raise DensekitError(f"invalid batching: max_batch={max_batch} (>= 1), max_queue={max_queue} (>= 1), "
                                f"max_delay={max_delay_s * 1000:g} ms (0..1000)")
        self.run_batch = run_batch
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self.max_batch_pixels = max_batch_pixels
        self.stats = BatchStats()
        self._queue: list[_Item] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batch_s = 0.0  # moving average of one forward pass, for Retry-After

    def config(self) -> dict[str, float | int]:
        return {"max_batch": self.max_batch, "max_delay_ms": self.max_delay_s * 1000, "max_queue": self.max_queue}

    async def submit(self, frame: np.ndarray, key: tuple[int, int], timeout_s: float) -> np.ndarray:
        """``frame``'s ``(D, h, w)`` features, run in a batch with others of input size ``key``.

        Raises:
            QueueFull: ``max_queue`` requests are already waiting.
            DeadlineExceeded: no answer within ``timeout_s``.
        """
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(f"inference queue is full ({self.max_queue} waiting); retry later", self.retry_after())
        self._ensure_worker()
        now = time.monotonic()
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(frame, key, now + timeout_s, now, fut))
        self._wake.set()
        try:
            # On timeout wait_for cancels the future, so a still-queued item is skipped by the worker.
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:  # TimeoutError itself from 3.11; 3.10 has its own class
            self.stats.expired += 1
            raise DeadlineExceeded(f"no answer within this server's deadline of {timeout_s:g} s; retry later") from None

    def retry_after(self) -> int:
        """Whole seconds (>= 1) in which the queue has likely drained, from the measured batch time."""
        batches = math.ceil((len(self._queue) + 1) / self.max_batch)
        return max(1, math.ceil(batches * self._batch_s))

    async def aclose(self) -> None:
        """Stop the worker and fail what is still queued (server shutdown)."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded("the server is shutting down"))
        self._queue.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _ensure_worker(self) -> None:
        # Started on first use, on the server's running loop (the app object is created outside it).
        if self._worker is None or self._worker.done():
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="densekit-forward")
            self._worker = asyncio.get_running_loop().create_task(self._run_forever())

    async def _run_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._run(batch)

    async def _next_batch(self) -> list[_Item]:
        """The oldest live request and up to ``max_batch - 1`` queued ones of its input size."""
        while True:
            self._drop_dead()
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._queue[0]
            cap = max(1, min(self.max_batch, self.max_batch_pixels // (head.key[0] * head.key[1])))
            same = [it for it in self._queue if it.key == head.key][:cap]
            wait = head.arrived + self.max_delay_s - time.monotonic()
            if len(same) >= cap or wait <= 0:
                taken = {id(it) for it in same}
                self._queue = [it for it in self._queue if id(it) not in taken]
                return same
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:  # TimeoutError itself from 3.11; 3.10 has its own class
                pass

    def _drop_dead(self) -> None:
        """Forget requests whose caller stopped waiting (deadline passed or the request was cancelled)."""
        now = time.monotonic()
        for it in self._queue:
            if not it.future.done() and it.deadline <= now:
                it.future.cancel()
        self._queue = [it for it in self._queue if not it.future.done()]

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        frames, key = [it.frame for it in batch], batch[0].key
        start = time.monotonic()
        try:
            results = await loop.run_in_executor(self._executor, self._forward_all, frames, key)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request, which answers it
            results = [exc] * len(batch)
        took = time.monotonic() - start
        self._batch_s = took if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * took
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
        for it, res in zip(batch, results):
            if it.future.done():  # its caller's deadline passed while the batch ran
                continue
            if isinstance(res, BaseException):
                it.future.set_exception(res)
            else:
                it.future.set_result(res)

    def _forward_all(self, frames: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray | Exception]:
        """One forward pass; if bad input fails the batch, each frame alone so only that one fails."""
        try:
            out = np.asarray(self.run_batch(frames, key), dtype=np.float32)
            return list(out)
        except DensekitError:
            if len(frames) == 1:
                raise
        results: list[np.ndarray | Exception] = []
        for frame in frames:
            try:
                results.append(np.asarray(self.run_batch([frame], key), dtype=np.float32)[0])
            except DensekitError as exc:
                results.append(exc)
        return results


__all__ = ["DEFAULT_DEADLINE_S", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_DELAY_S", "DeadlineExceeded",
           "DynamicBatcher", "QueueFull"]
