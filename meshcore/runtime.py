"""The process lifecycle pieces every process shares: the event loop choice and stop signals.

Owns: `select_event_loop` (uvloop when installed and not disabled by the process's environment
switch, else asyncio's loop; returns which one, for the log) and `stop_on_signals` (SIGTERM and
SIGINT call the process's stop; the loop must be the running one, in the main thread).
Listening sockets are `meshcore.sockets.make_listener`.

Used by the control plane and the node agent. The node proxy and the waypoint still have their own
copies in ztunnel/app.py and waypoint/app.py (make_listener, uvloop selection, signals): moving
them here is left to the work that is rewriting those files now (issue 11).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
