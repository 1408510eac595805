"""Running a short coroutine of the event loop's without a task (issue 14, per new connection).

Owns: `step_coroutine`, which runs a coroutine to its end by stepping it from the callbacks of
the futures it awaits, and hands its result or error to a callback. For the loop's own
transport makers (`create_connection(sock=...)`, `connect_accepted_socket`), which are
coroutines and the only way to make a transport of a socket on uvloop: per new connection a
task cost its creation, a first step scheduled one loop iteration later, and the wake-up and
done-callback machinery (bench/README.md, "Session 8: per new connection").

Invariants: the coroutine's first step runs inside the call (no loop iteration in between), each
later step in the done callback of the future it awaited (or the next iteration, for a bare
yield); `on_done` is called exactly once, with (result, None) or (None, error), from a step.
A step that yields neither a Future nor None (what a task rejects too) ends the coroutine and
hands over a RuntimeError. Only `Exception`s and `CancelledError` are handed over; anything
else (KeyboardInterrupt, SystemExit) propagates, as from a task. No cancellation: a caller
that gives up lets the coroutine finish and discards what it made (the transport makers
finish within an iteration or two).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Steps(Generic[T]):
    __slots__ = ("coro", "on_done")

    def __init__(
        self,
        coro: Coroutine[Any, Any, T],
        on_done: Callable[[T | None, BaseException | None], None],
    ) -> None:
        self.coro = coro
        self.on_done = on_done

    def step(self, _awaited: object = None) -> None:
        try:
            awaited = self.coro.send(None)
        except StopIteration as stop:
            self.on_done(stop.value, None)
            return
        except (Exception, asyncio.CancelledError) as err:
            self.on_done(None, err)
            return
        if isinstance(awaited, asyncio.Future):
            awaited._asyncio_future_blocking = False  # as a task does: we wait on it
            awaited.add_done_callback(self.step)
        elif awaited is None:  # a bare yield (sleep(0)): go on next iteration
            asyncio.get_running_loop().call_soon(self.step)
        else:  # not awaitable by a task either ("Task got bad yield"): end it, say so
            self.coro.close()
            self.on_done(None, RuntimeError(f"step_coroutine got bad yield: {awaited!r}"))


def step_coroutine(
    coro: Coroutine[Any, Any, T], on_done: Callable[[T | None, BaseException | None], None]
) -> None:
    """Run `coro` to its end without a task; then `on_done(result, None)` or
    `on_done(None, error)`."""
    _Steps(coro, on_done).step()
