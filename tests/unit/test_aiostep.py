"""`meshcore.aiostep.step_coroutine`: a coroutine run to its end without a task (issue 14), on
both event loops the proxies run on."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Generator

import pytest

from meshcore.aiostep import step_coroutine
from tests.helpers import run

LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])


async def _steps() -> list[object]:
    loop = asyncio.get_running_loop()
    seen: list[object] = []
    trace: list[str] = []

    async def work(fut: asyncio.Future[int]) -> int:
        trace.append("first step")  # runs inside step_coroutine's call
        got = await fut
        await asyncio.sleep(0)  # a bare yield
        trace.append("after")
        return got + 1

    async def fails(fut: asyncio.Future[int]) -> int:
        await fut
        raise ValueError("boom")

    f1: asyncio.Future[int] = loop.create_future()
    tasks = asyncio.all_tasks()
    step_coroutine(work(f1), lambda r, e: seen.append((r, e)))
    assert trace == ["first step"]
    assert asyncio.all_tasks() == tasks  # no new task
    f1.set_result(41)
    f2: asyncio.Future[int] = loop.create_future()
    step_coroutine(fails(f2), lambda r, e: seen.append((r, repr(e))))
    f2.set_result(0)
    f3: asyncio.Future[int] = loop.create_future()
    step_coroutine(work(f3), lambda r, e: seen.append((r, type(e).__name__)))
    f3.cancel()  # the awaited future cancelled: CancelledError is handed over, not raised
    for _ in range(5):
        await asyncio.sleep(0)
    assert trace == ["first step", "first step", "after"]
    return seen


@LOOPS
def test_step_coroutine(loop: str) -> None:
    seen = run(_steps(), 10, loop=loop)
    assert (42, None) in seen
    assert (None, "ValueError('boom')") in seen
    assert (None, "CancelledError") in seen
    assert len(seen) == 3


async def _bad_yield() -> list[object]:
    seen: list[object] = []
    closed: list[bool] = []

    @types.coroutine
    def odd() -> Generator[object, None, None]:
        yield 5  # neither a Future nor a bare yield

    async def work() -> int:
        try:
            await odd()
        finally:
            closed.append(True)
        return 1

    step_coroutine(work(), lambda r, e: seen.append((r, repr(e))))
    for _ in range(3):
        await asyncio.sleep(0)
    assert closed == [True]
    return seen


@LOOPS
def test_a_yield_of_neither_future_nor_none_ends_the_coroutine_with_an_error(loop: str) -> None:
    """As a task rejects it ("Task got bad yield"). Before: taken for a bare yield, the
    coroutine stepped again each loop iteration."""
    seen = run(_bad_yield(), 10, loop=loop)
    assert seen == [(None, "RuntimeError('step_coroutine got bad yield: 5')")]
