"""meshcore.runtime and meshcore.sockets.make_listener: the lifecycle pieces processes share."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from meshcore.runtime import select_event_loop, stop_on_signals
from meshcore.sockets import make_listener


def test_listener_is_bound_listening_and_non_blocking() -> None:
    sock = make_listener("127.0.0.1", 0)
    try:
        assert not sock.getblocking()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client = socket.create_connection(sock.getsockname(), timeout=5)
        client.close()
    finally:
        sock.close()


def test_listener_on_a_taken_port_raises_and_leaks_nothing() -> None:
    first = make_listener("127.0.0.1", 0)
    try:
        before = len(os.listdir("/proc/self/fd"))
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        with pytest.raises(OSError, match="in use"):
            make_listener("127.0.0.1", first.getsockname()[1])
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        first.close()


def test_sigterm_calls_stop() -> None:
    async def main() -> None:
        stopped = asyncio.Event()
        stop_on_signals(stopped.set)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stopped.wait(), 5)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    asyncio.run(main())


def test_event_loop_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = asyncio.get_event_loop_policy()
    try:
        monkeypatch.setenv("TEST_UVLOOP", "0")
        assert select_event_loop("TEST_UVLOOP") == "asyncio"
        monkeypatch.setenv("TEST_UVLOOP", "1")
        assert select_event_loop("TEST_UVLOOP") == "uvloop"  # uvloop is a dependency on Linux
    finally:
        asyncio.set_event_loop_policy(policy)
