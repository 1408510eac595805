"""W3C Trace Context (https://www.w3.org/TR/trace-context/) for the waypoint hop.

Owns: `next_traceparent`: given the incoming ``traceparent`` (or none), the header to forward,
which keeps the trace id and flags and carries a NEW parent id (the waypoint's span), as a
proxy participating in the trace does (§3.2.2.3 "parent-id ... of the current operation").
A missing or invalid header starts a new trace (version 00), per §4.3. The sampled flag is the
`Sampler`'s decision (meshcore.tracing: parent-based as Envoy in Istio, ratio for new traces).

Invariant: pure; the random source is injected. Parsing is `meshcore.tracing.parse_traceparent`.
"""

from __future__ import annotations

import random

from meshcore.tracing import Sampler, parse_traceparent


def _hex(rng: random.Random, nbytes: int) -> str:
    while True:
        value = rng.getrandbits(nbytes * 8)
        if value:  # all-zero ids are invalid (§3.2.2.3, §3.2.2.4)
            return f"{value:0{nbytes * 2}x}"


def next_traceparent(
    incoming: str | None, rng: random.Random, sampler: Sampler | None = None
) -> tuple[str, str, str]:
    """(traceparent to forward, trace id, new span id). Flags other than ``sampled`` are
    forwarded unchanged (§3.2.2.5); ``sampled`` is `sampler`'s decision (default: follow the
    caller, sample new traces)."""
    sampler = sampler or Sampler()
    span = _hex(rng, 8)
    parent = parse_traceparent(incoming)
    trace_id = parent.trace_id if parent is not None else _hex(rng, 16)
    flags = int(parent.flags, 16) & ~1 if parent is not None else 0
    flags |= 1 if sampler.sampled(trace_id, parent) else 0
    return f"00-{trace_id}-{span}-{flags:02x}", trace_id, span
