"""Dynamic batching for the server: requests of one padded canvas share a ``Predictor.run``.

A request's answer must not depend on who else was asking. Padding a batch to its largest image
changes every other image's answer (in every framework), so :class:`DynamicBatcher` puts together
only images whose own padded canvas (:func:`engine.preprocess.resized_canvas`) is the same: each
is then padded exactly as it would be alone. A camera stream, or photographs of one aspect
ratio, batch fully; a mixed stream batches what it can.

A batch is cut when it holds ``max_batch_size`` images, or ``max_delay`` seconds after its first
image arrived, whichever comes first. ``Predictor.run`` runs in one worker thread (the device
runs one batch at a time), so the event loop keeps accepting and decoding. With ``max_queue``
images waiting, :meth:`DynamicBatcher.submit` refuses at once (:class:`QueueFullError`: the
server's 503). A request whose caller went away (its future cancelled) before its batch ran is
dropped without computing it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BatchStats", "DynamicBatcher", "QueueFullError"]


class QueueFullError(RuntimeError):
    """``max_queue`` images are waiting already."""


@dataclass
class _Pending:
    image: np.ndarray
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What one batch did: its ``size``, each request's ``queue_seconds`` and the batch's
    ``compute_seconds`` (``Predictor.run``)."""

    size: int
    queue_seconds: list[float]
    compute_seconds: float


class DynamicBatcher:
    """Batches images of one padded canvas into one ``run`` call (see the module docstring).

    Args:
        run: ``Predictor.run``: a list of uint8 [H, W, 3] arrays -> one result per image.
        canvas: (height, width) -> the padded canvas an image of that size takes alone.
        max_batch_size: images per call at most.
        max_delay: seconds a batch waits for company after its first image.
        max_queue: images waiting at most; more are refused.
        on_batch: called with a :class:`BatchStats` after each batch (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[np.ndarray]], list],
        canvas: Callable[[int, int], tuple[int, int]],
        *,
        max_batch_size: int = 8,
        max_delay: float = 0.005,
        max_queue: int = 64,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_delay >= 0")
        self.run, self.canvas = run, canvas
        self.max_batch_size, self.max_delay, self.max_queue = max_batch_size, max_delay, max_queue
        self.on_batch = on_batch
        self.groups: OrderedDict[tuple[int, int], list[_Pending]] = OrderedDict()  # canvas -> waiting, oldest group first
        self.waiting = 0
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Images waiting for a batch."""
        return self.waiting

    def start(self) -> None:
        """Starts the batching loop on the running event loop."""
        self.wakeup = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finishes the images waiting, then stops the loop."""
        while self.waiting:
            await asyncio.sleep(0.001)
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    def submit(self, image: np.ndarray) -> asyncio.Future:
        """A future of ``image``'s result.

        Raises:
            QueueFullError: ``max_queue`` images wait already.
        """
        if self.waiting >= self.max_queue:
            raise QueueFullError(f"{self.waiting} images are waiting (--max-queue {self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        key = self.canvas(int(image.shape[0]), int(image.shape[1]))
        self.groups.setdefault(key, []).append(_Pending(image, future))
        self.waiting += 1
        assert self.wakeup is not None, "start() the batcher first"
        self.wakeup.set()
        return future

    def _next_batch(self, now: float) -> tuple[list[_Pending], float | None]:
        """The batch to run now (possibly empty), and the seconds until one is due otherwise."""
        soonest = None
        for key, pending in list(self.groups.items()):
            live = [p for p in pending if not p.future.cancelled()]  # callers gone: dropped unrun
            self.waiting -= len(pending) - len(live)
            if not live:
                del self.groups[key]
                continue
            self.groups[key] = live
            due = live[0].arrived + self.max_delay
            if len(live) >= self.max_batch_size or due <= now:
                batch, rest = live[: self.max_batch_size], live[self.max_batch_size :]
                if rest:
                    self.groups[key] = rest
                else:
                    del self.groups[key]
                self.waiting -= len(batch)
                return batch, None
            soonest = due - now if soonest is None else min(soonest, due - now)
        return [], soonest

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch, wait = self._next_batch(time.perf_counter())
            if not batch:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run, [p.image for p in batch])
            except Exception as exc:  # noqa: BLE001 - a model error fails this batch's requests alone
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finished = time.perf_counter()
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)
            if self.on_batch is not None:
                self.on_batch(BatchStats(len(batch), [started - p.arrived for p in batch], finished - started))
