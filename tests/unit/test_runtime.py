"""meshcore.runtime and meshcore.sockets listeners: the lifecycle pieces processes share."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from meshcore.runtime import every, select_event_loop, stop_on_signals, wait_idle
from meshcore.sockets import make_listener, make_udp_listener


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


def test_udp_listener_is_bound_and_non_blocking() -> None:
    sock = make_udp_listener("127.0.0.1", 0)
    try:
        assert sock.type == socket.SOCK_DGRAM
        assert not sock.getblocking()
        assert sock.getsockname()[1] != 0
    finally:
        sock.close()


def test_every_steps_once_per_interval_until_cancelled() -> None:
    slept: list[float] = []
    steps: list[int] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        if len(slept) > 3:
            raise asyncio.CancelledError

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await every(5, lambda: steps.append(len(slept)), sleep=sleep)

    asyncio.run(main())
    assert slept == [5, 5, 5, 5]
    assert steps == [1, 2, 3]  # a step follows each interval, never before the first


def test_wait_idle_returns_when_idle_or_at_the_deadline() -> None:
    async def main() -> tuple[bool, bool, float]:
        loop = asyncio.get_running_loop()
        live = [1]
        loop.call_later(0.1, live.clear)
        idle = await wait_idle(lambda: bool(live), float("inf"), poll=0.01)
        start = loop.time()
        timed_out = await wait_idle(lambda: True, start + 0.1, poll=0.01)
        return idle, timed_out, loop.time() - start

    idle, timed_out, waited = asyncio.run(main())
    assert idle
    assert not timed_out
    assert 0.1 <= waited < 1.0
