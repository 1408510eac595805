"""W3C Trace Context (https://www.w3.org/TR/trace-context/) for the waypoint hop.

Owns: `trace_hop`: given the incoming ``traceparent`` (or none), the header to forward, which
keeps the trace id and flags and carries a NEW parent id (the waypoint's span), as a
proxy participating in the trace does (§3.2.2.3 "parent-id ... of the current operation").
A missing or invalid header starts a new trace (version 00), per §4.3. The sampled flag is the
`Sampler`'s decision (meshcore.tracing: parent-based as Envoy in Istio, ratio for new traces).
Also `request_id`, the ``x-request-id`` the waypoint adds when the request has none (Envoy).

Invariant: pure; the random source is injected. Parsing is `meshcore.tracing.parse_traceparent`
(once per request: the hop's facts come out of the one parse).
"""

from __future__ import annotations

import random
from typing import NamedTuple

from meshcore.tracing import Sampler, parse_traceparent


def _hex(rng: random.Random, nbytes: int) -> str:
    while True:
        value = rng.getrandbits(nbytes * 8)
        if value:  # all-zero ids are invalid (§3.2.2.3, §3.2.2.4)
            # (constant format specs for the two sizes used: no spec built per id)
            if nbytes == 8:
                return f"{value:016x}"
            if nbytes == 16:
                return f"{value:032x}"
            return f"{value:0{nbytes * 2}x}"


class TraceHop(NamedTuple):
    """The waypoint's hop of a trace (immutable; a NamedTuple, not a frozen dataclass: one is
    built per request, and a compiled frozen dataclass still runs the interpreted ``__init__``
    of `dataclasses`, one ``object.__setattr__`` per field)."""

    traceparent: str
    """The header to forward (this hop's span as the parent id)."""
    trace_id: str
    span_id: str
    """This hop's span."""
    parent_span_id: str
    """The caller's span id ("" = the trace starts here)."""
    sampled: bool


def trace_hop(incoming: str | None, rng: random.Random, sampler: Sampler | None = None) -> TraceHop:
    """This hop from the incoming header. Flags other than ``sampled`` are forwarded unchanged
    (§3.2.2.5); ``sampled`` is `sampler`'s decision (default: follow the caller, sample new
    traces)."""
    sampler = sampler or Sampler()
    span = _hex(rng, 8)
    parent = parse_traceparent(incoming)
    trace_id = parent.trace_id if parent is not None else _hex(rng, 16)
    sampled = sampler.sampled(trace_id, parent)
    flags = (int(parent.flags, 16) & ~1 if parent is not None else 0) | (1 if sampled else 0)
    return TraceHop(
        traceparent=f"00-{trace_id}-{span}-{flags:02x}",
        trace_id=trace_id,
        span_id=span,
        parent_span_id=parent.parent_id if parent is not None else "",
        sampled=sampled,
    )


def request_id(bits: int) -> str:
    """An ``x-request-id`` from 128 random bits, in UUID text form (8-4-4-4-12 hex digits, as
    ``str(uuid.UUID(int=bits))``) without building a UUID object per request."""
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
