"""Held and fresh hash-checked connections from a lab pod (issue 15), run as a subprocess in the
pod's network namespace (``lab.exec_argv``): ``HOST PORT HELD``.

Talks to the lab's echo (examples/lab/echo.py: a greeting line, then ``echo: <line>`` for every
line). Opens HELD connections gradually (``RAMP`` seconds in all, so no burst overflows a
backlog), each a greeting then a round every 0.4-0.9 s: a random line sent, the echo's SHA-256
compared with the line's. When every held connection is set up (or failed to), prints
``{"up": N, "setup_failed": M, "why": [...]}`` and starts opening a fresh connection every
``FRESH_EVERY`` seconds (greeting + one checked 4 KiB round) until a line on stdin; then every
held connection does one last round and closes, and it prints the counts:

  held, setup_failed (never connected: apart from the losses), lost (a held connection that
  failed after its set-up: reset, EOF or no echo within 15 s), corrupted (an echo whose hash
  differs), rounds, fresh_ok, fresh_failed, why (the first reasons).

Standard library only; one asyncio loop, no threads in another netns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import sys
from typing import Any

RAMP = 1.0
FRESH_EVERY = 0.05
TIMEOUT = 15.0
WHY_KEPT = 20


class Traffic:
    def __init__(self, host: str, port: int, held: int) -> None:
        self.host, self.port, self.n = host, port, held
        self.stop = asyncio.Event()
        self.counts: dict[str, Any] = dict.fromkeys(
            ("held", "setup_failed", "lost", "corrupted", "rounds", "fresh_ok", "fresh_failed"), 0
        )
        self.why: list[str] = []

    def fail(self, key: str, reason: str) -> None:
        self.counts[key] += 1
        if len(self.why) < WHY_KEPT:
            self.why.append(reason)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), TIMEOUT)
        greeting = await asyncio.wait_for(r.readline(), TIMEOUT)
        if not greeting.startswith(b"hello from"):
            w.close()
            raise ConnectionError(f"greeting {greeting[:60]!r}")
        return r, w

    @staticmethod
    async def round(r: asyncio.StreamReader, w: asyncio.StreamWriter, size: int) -> bool:
        line = os.urandom(size // 2).hex().encode()
        w.write(line + b"\n")
        got = await asyncio.wait_for(r.readline(), TIMEOUT)
        if not got:
            raise ConnectionError("EOF")
        want = hashlib.sha256(b"echo: " + line + b"\n").digest()
        return hashlib.sha256(got).digest() == want

    async def held(self, i: int, up: asyncio.Event) -> None:
        await asyncio.sleep(RAMP * i / self.n)
        try:
            r, w = await self.connect()
        except (TimeoutError, OSError) as err:
            self.fail("setup_failed", f"held {i} set-up: {err!r}")
            return
        finally:
            up.set()
        self.counts["held"] += 1
        k = 0
        try:
            while True:
                last = self.stop.is_set()
                if not await self.round(r, w, 256):
                    self.fail("corrupted", f"held {i} round {k}: hash differs")
                    return
                self.counts["rounds"] += 1
                k += 1
                if last:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.4 + (i % 11) / 20)
        except (TimeoutError, OSError) as err:
            self.fail("lost", f"held {i} round {k}: {err!r}")
        finally:
            w.close()

    async def fresh_one(self, j: int) -> None:
        try:
            r, w = await self.connect()
            try:
                ok = await self.round(r, w, 4096)
            finally:
                w.close()
        except (TimeoutError, OSError) as err:
            self.fail("fresh_failed", f"fresh {j}: {err!r}")
            return
        if ok:
            self.counts["fresh_ok"] += 1
        else:
            self.fail("fresh_failed", f"fresh {j}: hash differs")

    async def fresh(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        j = 0
        while not self.stop.is_set():
            t = asyncio.ensure_future(self.fresh_one(j))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            j += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), FRESH_EVERY)
        await asyncio.gather(*tasks)

    async def run(self) -> None:
        ups = [asyncio.Event() for _ in range(self.n)]
        held = [asyncio.ensure_future(self.held(i, ups[i])) for i in range(self.n)]
        for e in ups:
            await e.wait()
        # Every held connection had its greeting (or failed): the set-up is over.
        up = {"up": self.counts["held"], "setup_failed": self.counts["setup_failed"]}
        print(json.dumps({**up, "why": self.why}), flush=True)
        fresh = asyncio.ensure_future(self.fresh())
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        self.stop.set()
        await asyncio.gather(*held, fresh)
        print(json.dumps({**self.counts, "why": self.why}), flush=True)


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port, held = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    asyncio.run(Traffic(host, port, held).run())


if __name__ == "__main__":
    main()
