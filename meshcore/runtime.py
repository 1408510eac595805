"""The process lifecycle pieces every process shares: event loop choice, stop signals, periodic
housekeeping and the drain wait.

Owns: `select_event_loop` (uvloop when installed and not disabled by the process's environment
switch, else asyncio's loop; returns which one, for the log), `stop_on_signals` (SIGTERM and
SIGINT call the process's stop; the loop must be the running one, in the main thread), `every`
(a housekeeping sweep: one step per interval until cancelled) and `wait_idle` (a drain waits
while anything is live, up to a deadline on the loop's clock).
Listening sockets are `meshcore.sockets.make_listener`.

Used by every process: the node proxy (`ZTUNNEL_UVLOOP`) and the waypoint (`WAYPOINT_UVLOOP`) run
on uvloop; the control plane and the node agent stay on asyncio's loop (they are off the data
path, and grpc.aio's poller is built for asyncio's) and share the signals.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DRAIN_POLL = 0.05
"""Seconds between two looks at what a drain still waits for."""
Sleep = Callable[[float], Awaitable[None]]


def select_event_loop(switch: str) -> str:
    """uvloop unless the environment variable `switch` is "0" or uvloop is missing; "uvloop" or
    "asyncio". Call before the loop is created."""
    if os.environ.get(switch, "1") != "0":
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def stop_on_signals(
    stop: Callable[[], object], loop: asyncio.AbstractEventLoop | None = None
) -> None:
    """SIGTERM/SIGINT -> `stop()` on the (running) loop."""
    loop = loop or asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)


async def every(
    interval: float, step: Callable[[], object], *, sleep: Sleep = asyncio.sleep
) -> None:
    """`step()` once per `interval` seconds (the first after one interval) until cancelled."""
    while True:
        await sleep(interval)
        step()


async def wait_idle(busy: Callable[[], bool], deadline: float, *, poll: float = DRAIN_POLL) -> bool:
    """Wait while `busy()` and the running loop's clock is before `deadline` (inf: no deadline);
    True when nothing is busy any more, False when the deadline passed first."""
    loop = asyncio.get_running_loop()
    while busy():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True
