"""Generation slots with a bounded FIFO queue, as a model server schedules its batch.

An instance runs at most `slots` generations at once; up to `max_queue` more wait in
order; anything beyond is refused (the servicer answers RESOURCE_EXHAUSTED). So an
overloaded instance gets slower before it refuses, as a real one does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class QueueFull(Exception):
    """Every slot is busy and the queue is at its limit."""


class PoolClosed(Exception):
    """The instance is shutting down: no more slots will be handed out."""


class SlotPool:
    def __init__(self, slots: int, max_queue: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if max_queue < 0:
            raise ValueError(f"max_queue must not be negative, got {max_queue}")
        self.slots = slots
        self.max_queue = max_queue
        self.active = 0
        self.closed = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[SlotPool], bool]) -> None:
        """Returns once `predicate(self)` holds (checked at every change of active/queued)."""
        while not predicate(self):
            await self._changed.wait()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def __repr__(self) -> str:
        return (
            f"<SlotPool {self.active}/{self.slots} active, {self.queued}/{self.max_queue} queued>"
        )

    def close(self) -> None:
        """Fails every queued call and every later acquire with PoolClosed."""
        self.closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(PoolClosed("the instance is shutting down"))
        self._notify()

    async def acquire(self) -> None:
        if self.closed:
            raise PoolClosed("the instance is shutting down")
        if self.active < self.slots and not self._waiters:
            self.active += 1
            self._notify()
            return
        if len(self._waiters) >= self.max_queue:
            raise QueueFull(
                f"all {self.slots} generation slots are busy and {self.queued} calls are queued"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._notify()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # The slot was handed to us just as we were cancelled: pass it on.
                self.release()
            else:
                self._waiters.remove(fut)
                self._notify()
            raise

    def release(self) -> None:
        # Hand the slot straight to the next waiter, so `active` never dips and a new
        # arrival cannot jump the queue.
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self._notify()
                return
        self.active -= 1
        self._notify()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
