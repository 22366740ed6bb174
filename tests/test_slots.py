"""SlotPool: concurrency limit, FIFO queue, refusal, cancellation while queued."""

from __future__ import annotations

import asyncio

import pytest

from aimesh.mesh.sim.slots import PoolClosed, QueueFull, SlotPool


async def test_slots_then_queue_then_refusal() -> None:
    pool = SlotPool(slots=2, max_queue=1)
    await pool.acquire()
    await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    assert (pool.active, pool.queued) == (2, 1)
    with pytest.raises(QueueFull, match="2 generation slots are busy"):
        await pool.acquire()
    pool.release()
    await waiter
    assert (pool.active, pool.queued) == (2, 0)


async def test_queue_is_first_in_first_out() -> None:
    pool = SlotPool(slots=1, max_queue=5)
    await pool.acquire()
    order: list[int] = []

    async def worker(i: int) -> None:
        async with pool.slot():
            order.append(i)

    tasks = [asyncio.create_task(worker(i)) for i in range(5)]
    await asyncio.sleep(0)
    pool.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert pool.active == 0


async def test_cancelled_waiter_leaves_the_queue_and_no_slot_leaks() -> None:
    pool = SlotPool(slots=1, max_queue=2)
    await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.queued == 0
    pool.release()
    assert pool.active == 0


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="slots must be at least 1"):
        SlotPool(0, 1)
    with pytest.raises(ValueError, match="max_queue must not be negative"):
        SlotPool(1, -1)


async def test_close_fails_waiters_and_later_acquires() -> None:
    pool = SlotPool(slots=1, max_queue=2)
    await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    pool.close()
    with pytest.raises(PoolClosed):
        await waiter
    with pytest.raises(PoolClosed):
        await pool.acquire()
    pool.release()
    assert (pool.active, pool.queued) == (0, 0)
