"""The waypoint's request path leaves no reference cycles: what a request allocates is freed by
reference counting alone, so the cyclic GC has nothing of ours to find (each cycle per request
cost the waypoint its young-generation passes, ~6 % of its CPU in the bench, and made the node
proxy's GC thresholds a loss there: bench/README.md, "Session 8: waypoint reference cycle").

The mesh of `test_waypoint_harness` on uvloop (the proxies' loop), with the cyclic GC off while
the requests run and every unreachable object kept (`gc.DEBUG_SAVEALL`); what counts is an
object of ours (a type from `waypoint`, `meshcore` or `ztunnel`) that is part of a cycle among
the garbage. Before the fix: one per response head (`waypoint.protocol.http1`'s llhttp reader
and httptools' parser held each other), one per request head with a body, and one per tunnel
(`TunnelIO` and its `HboneStream`).
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

from aiohttp import ClientSession

from tests.helpers import run
from tests.loopback.test_waypoint_harness import REVIEWS, waypoint_mesh
from tests.waypoint_fixtures import REVIEWS_DR, SEED_VS

N = 60
"""Requests per case; before the fix each left at least one cycle of ours."""
OURS = ("waypoint.", "meshcore.", "ztunnel.")


def _in_cycle(obj: object, garbage: dict[int, object]) -> bool:
    """Whether `obj` reaches itself through the other garbage (a cycle, not just an object a
    cycle of someone else's holds)."""
    seen = {id(obj)}
    todo = [obj]
    while todo:
        for ref in gc.get_referents(todo.pop()):
            if ref is obj:
                return True
            if id(ref) in garbage and id(ref) not in seen:
                seen.add(id(ref))
                todo.append(ref)
    return False


def _cycles_of_ours(garbage: list[object]) -> list[str]:
    by_id = {id(o): o for o in garbage}
    return sorted(
        f"{type(o).__module__}.{type(o).__qualname__}"
        for o in garbage
        if type(o).__module__.startswith(OURS) and _in_cycle(o, by_id)
    )


async def _cyclic_garbage(requests: Awaitable[None]) -> list[str]:
    """The cycles of ours that `requests` left (the GC off while they run)."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await requests
        gc.collect()
        return _cycles_of_ours(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


CASES = (("GET", b"", False), ("POST", b"x" * 5000, False), ("GET", b"", True))
"""Keep-alive GETs, keep-alive POSTs with a body, and a new connection (tunnel) per request."""


async def _requests(s: ClientSession, method: str, body: bytes, n: int) -> None:
    for i in range(n):
        async with s.request(method, f"{REVIEWS}/reviews/{i}", data=body or None) as r:
            assert r.status == 200, await r.text()
            await r.read()


def test_requests_leave_no_reference_cycles(tmp_path: Path) -> None:
    async def main() -> dict[str, list[str]]:
        left: dict[str, list[str]] = {}
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR) as mesh:
            for method, body, close in CASES:
                headers = {"connection": "close"} if close else {}
                async with mesh.session(limit=1, headers=headers) as s:
                    await _requests(s, method, body, 5)  # warm: the upstream is pooled
                    case = f"{method} {len(body)} bytes, close={close}"
                    left[case] = await _cyclic_garbage(_requests(s, method, body, N))
        return left

    left = run(main(), 60, loop="uvloop")
    # None per request (the bound allows a pooled connection or a timer that ends within the
    # run, not one per request).
    counts = {case: Counter(objs) for case, objs in left.items()}
    assert all(c.total() <= 4 for c in counts.values()), counts
