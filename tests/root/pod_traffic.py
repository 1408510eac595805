"""Held and fresh hash-checked connections from inside a pod (issue 15: the lab's restarts and
hand-overs, the kube lab's `helm upgrade`), run as a process in the pod's netns (the labs'
``exec_argv``), never as a thread of the test (CI runs the whole suite in one process, whose
threads must not change netns): ``python3 pod_traffic.py HOST PORT HELD [options]``.
The test side is `PodTraffic` below (this module is both).

Talks to the lab's echo (examples/lab/echo.py: a greeting line, then ``echo: <line>`` for every
line). Opens HELD connections one every ``--ramp-every`` seconds (a burst would overflow an
accept queue: set-up failures are counted apart from losses), each a greeting then a ``--size``
round every ``--period`` (LO,HI) seconds: a random line sent, the SHA-256 of the answer compared
with the expected echo's. Once every held connection is up (or failed to come up) prints
``{"event": "up", ...}`` and opens a fresh connection (greeting + one 4 KiB round) every
``--fresh-every`` seconds. Commands on stdin: ``report`` prints the counts so far (``"event":
"report"``), ``stop`` lets every held connection do one last round and close, then prints the
final counts (``"event": "done"``).

Counts: held (came up), setup_failed, lost (a held connection that failed after it came up:
reset, EOF, timeout of `TIMEOUT` s), corrupted (an answer whose hash differs), rounds,
fresh_ok, fresh_failed, fresh_failed_started (wall-clock start of each failed fresh
connection), why (the first reasons). Standard library only (the node's python3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import queue
import random
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TIMEOUT = 15.0
WHY_KEPT = 20
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
FAILURES = (OSError, asyncio.TimeoutError, ConnectionError, ValueError)


@dataclass(frozen=True)
class Shape:
    ramp_every: float = 0.02
    fresh_every: float = 0.1
    period: tuple[float, float] = (1.0, 2.0)
    size: int = 1024


class Traffic:
    def __init__(self, host: str, port: int, held: int, shape: Shape) -> None:
        self.host, self.port, self.n, self.shape = host, port, held, shape
        self.stop = asyncio.Event()
        self.counts: dict[str, Any] = dict.fromkeys(
            ("held", "setup_failed", "lost", "corrupted", "rounds", "fresh_ok", "fresh_failed"),
            0,
        )
        self.counts["fresh_failed_started"] = []
        self.why: list[str] = []

    def fail(self, key: str, reason: str) -> None:
        self.counts[key] += 1
        if len(self.why) < WHY_KEPT:
            self.why.append(f"{time.time():.3f} {reason}")

    def emit(self, event: str) -> None:
        print(json.dumps({"event": event, **self.counts, "why": self.why}), flush=True)

    async def connect(self) -> Stream:
        r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), TIMEOUT)
        greeting = await asyncio.wait_for(r.readline(), TIMEOUT)
        if not greeting.startswith(b"hello from"):
            w.close()
            raise ConnectionError(f"greeting {greeting[:60]!r}")
        return r, w

    @staticmethod
    async def round(stream: Stream, size: int) -> bool:
        r, w = stream
        line = os.urandom(size // 2).hex().encode()
        w.write(line + b"\n")
        got = await asyncio.wait_for(r.readline(), TIMEOUT)
        if not got:
            raise ConnectionError("EOF")
        return hashlib.sha256(got).digest() == hashlib.sha256(b"echo: " + line + b"\n").digest()

    async def held(self, i: int, up: asyncio.Event) -> None:
        await asyncio.sleep(self.shape.ramp_every * i)
        try:
            stream = await self.connect()
        except FAILURES as err:
            self.fail("setup_failed", f"held {i} set-up: {err!r}")
            return
        finally:
            up.set()
        self.counts["held"] += 1
        k = 0
        try:
            while True:
                last = self.stop.is_set()
                if not await self.round(stream, self.shape.size):
                    self.fail("corrupted", f"held {i} round {k}: hash differs")
                    return
                self.counts["rounds"] += 1
                k += 1
                if last:
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), random.uniform(*self.shape.period))
        except FAILURES as err:
            self.fail("lost", f"held {i} round {k}: {err!r}")
        finally:
            stream[1].close()

    async def fresh_one(self, j: int) -> None:
        started = time.time()
        try:
            stream = await self.connect()
            try:
                ok = await self.round(stream, 4096)
            finally:
                stream[1].close()
        except FAILURES as err:
            ok, why = False, repr(err)
        else:
            why = "hash differs"
        if ok:
            self.counts["fresh_ok"] += 1
        else:
            self.fail("fresh_failed", f"fresh {j}: {why}")
            self.counts["fresh_failed_started"].append(round(started, 3))

    async def fresh(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        j = 0
        while not self.stop.is_set():
            task = asyncio.ensure_future(self.fresh_one(j))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            j += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.shape.fresh_every)
        await asyncio.gather(*tasks)

    async def run(self) -> None:
        ups = [asyncio.Event() for _ in range(self.n)]
        held = [asyncio.ensure_future(self.held(i, ups[i])) for i in range(self.n)]
        for e in ups:
            await e.wait()
        self.emit("up")
        fresh = asyncio.ensure_future(self.fresh())
        loop = asyncio.get_running_loop()
        while True:
            command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if command == "report":
                self.emit("report")
            elif command in ("stop", ""):  # "" is EOF: the test went away
                break
        self.stop.set()
        await asyncio.gather(*held, fresh)
        self.emit("done")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("held", type=int)
    p.add_argument("--ramp-every", type=float, default=Shape.ramp_every)
    p.add_argument("--fresh-every", type=float, default=Shape.fresh_every)
    p.add_argument("--period", default="1.0,2.0", help="LO,HI seconds between a held round")
    p.add_argument("--size", type=int, default=Shape.size)
    a = p.parse_args()
    lo, hi = (float(x) for x in a.period.split(","))
    shape = Shape(a.ramp_every, a.fresh_every, (lo, hi), a.size)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    address = socket.getaddrinfo(a.host, a.port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    asyncio.run(Traffic(str(address), a.port, a.held, shape).run())


class PodTraffic:
    """The test's side: this script started with `argv` (the lab's exec argv running it in a
    pod); `expect` reads its next event line, `command` writes a command and reads the answer."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"traffic generator: no {event!r} within {timeout} s") from None
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"traffic exited: {self.proc.stderr.read().decode()[-2000:]}")
        counts: dict[str, Any] = json.loads(line)
        assert counts["event"] == event, counts
        return counts

    def command(self, word: str, event: str, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()
        return self.expect(event, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


if __name__ == "__main__":
    main()
