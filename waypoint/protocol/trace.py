"""W3C Trace Context (https://www.w3.org/TR/trace-context/) for the waypoint hop.

Owns: `next_traceparent`: given the incoming ``traceparent`` (or none), the header to forward,
which keeps the trace id and flags and carries a NEW parent id (the waypoint's span), as a
proxy participating in the trace does (§3.2.2.3 "parent-id ... of the current operation").
A missing or invalid header starts a new trace (version 00, sampled flag set), per §4.3.

Invariant: pure; the random source is injected. Parsing is `meshcore.tracing.parse_traceparent`.
"""

from __future__ import annotations

import random

from meshcore.tracing import parse_traceparent


def _hex(rng: random.Random, nbytes: int) -> str:
    while True:
        value = rng.getrandbits(nbytes * 8)
        if value:  # all-zero ids are invalid (§3.2.2.3, §3.2.2.4)
            return f"{value:0{nbytes * 2}x}"


def next_traceparent(incoming: str | None, rng: random.Random) -> tuple[str, str, str]:
    """(traceparent to forward, trace id, new span id)."""
    span = _hex(rng, 8)
    parent = parse_traceparent(incoming)
    if parent is not None:
        return f"00-{parent.trace_id}-{span}-{parent.flags}", parent.trace_id, span
    trace_id = _hex(rng, 16)
    return f"00-{trace_id}-{span}-01", trace_id, span
