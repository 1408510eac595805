"""W3C Trace Context (https://www.w3.org/TR/trace-context/) for the waypoint hop.

Owns: `trace_hop`: given the incoming ``traceparent`` (or none), the header to forward, which
keeps the trace id and flags and carries a NEW parent id (the waypoint's span), as a
proxy participating in the trace does (§3.2.2.3 "parent-id ... of the current operation").
A missing or invalid header starts a new trace (version 00), per §4.3. The sampled flag is the
`Sampler`'s decision (meshcore.tracing: parent-based as Envoy in Istio, ratio for new traces).
Also the ``x-request-id`` the waypoint adds when the request has none (Envoy; UUID text form,
drawn with the hop's ids: `TraceHop.request_id`).

Invariant: pure; the random source is injected, and drawn from once per hop (one 320-bit draw
for the span id, a new trace id and the request id). Parsing is `meshcore.tracing.parse_traceparent`
(once per request: the hop's facts come out of the one parse).
"""

from __future__ import annotations

import random
from typing import NamedTuple

from meshcore.tracing import Sampler, parse_traceparent

_ZERO_SPAN = "0" * 16
_ZERO_TRACE = "0" * 32


def _ids(rng: random.Random) -> tuple[str, str, str]:
    """A span id (16 hex digits), a trace id (32) and 128 bits for a request id (32 hex
    digits), from ONE draw of 320 bits and one hex formatting (not a draw and a format per
    id). All-zero span or trace ids are invalid (§3.2.2.3, §3.2.2.4): drawn again."""
    while True:
        h = f"{rng.getrandbits(320):080x}"
        span, trace = h[:16], h[16:48]
        if span != _ZERO_SPAN and trace != _ZERO_TRACE:
            return span, trace, h[48:]


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
    request_id: str
    """An ``x-request-id`` for the request (UUID text form, 128 random bits), drawn with the
    ids above: used when the request has none."""


def trace_hop(incoming: str | None, rng: random.Random, sampler: Sampler | None = None) -> TraceHop:
    """This hop from the incoming header. Flags other than ``sampled`` are forwarded unchanged
    (§3.2.2.5); ``sampled`` is `sampler`'s decision (default: follow the caller, sample new
    traces)."""
    sampler = sampler or Sampler()
    span, new_trace, rid = _ids(rng)
    parent = parse_traceparent(incoming)
    trace_id = parent.trace_id if parent is not None else new_trace
    sampled = sampler.sampled(trace_id, parent)
    flags = (int(parent.flags, 16) & ~1 if parent is not None else 0) | (1 if sampled else 0)
    return TraceHop(
        traceparent=f"00-{trace_id}-{span}-{flags:02x}",
        trace_id=trace_id,
        span_id=span,
        parent_span_id=parent.parent_id if parent is not None else "",
        sampled=sampled,
        request_id=_uuid_text(rid),
    )


def _uuid_text(h: str) -> str:
    """An ``x-request-id`` from 32 random hex digits, in UUID text form (8-4-4-4-12 hex
    digits, as ``str(uuid.UUID(hex=h))``) without building a UUID object per request."""
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
