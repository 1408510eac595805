"""W3C Trace Context (https://www.w3.org/TR/trace-context/) for the waypoint hop.

Owns: `next_traceparent`: given the incoming ``traceparent`` (or none), the header to forward,
which keeps the trace id and flags and carries a NEW parent id (the waypoint's span), as a
proxy participating in the trace does (§3.2.2.3 "parent-id ... of the current operation").
A missing or invalid header starts a new trace (version 00, sampled flag set), per §4.3.

Invariant: pure; the random source is injected.
"""

from __future__ import annotations

import random
import re

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def _hex(rng: random.Random, nbytes: int) -> str:
    while True:
        value = rng.getrandbits(nbytes * 8)
        if value:  # all-zero ids are invalid (§3.2.2.3, §3.2.2.4)
            return f"{value:0{nbytes * 2}x}"


def next_traceparent(incoming: str | None, rng: random.Random) -> tuple[str, str, str]:
    """(traceparent to forward, trace id, new span id)."""
    span = _hex(rng, 8)
    if incoming is not None:
        m = _TRACEPARENT.match(incoming.strip().lower())
        if m is not None:
            version, trace_id, parent, flags, rest = m.groups()
            valid = (
                version != "ff"
                and trace_id != "0" * 32
                and parent != "0" * 16
                and (version != "00" or rest is None)
            )
            if valid:
                return f"00-{trace_id}-{span}-{flags}", trace_id, span
    trace_id = _hex(rng, 16)
    return f"00-{trace_id}-{span}-01", trace_id, span
