"""How the HTTP/2 connection core's queued output is handed to a TLS transport.

Owns: `vectored`, the cut of a connection's queued frames into the parts of one vectored TLS
write (`HboneConnection.data_to_send_parts`), and its sizes `TLS_RECORD` and `BIG_PAYLOAD`.

Invariants: the parts joined are exactly the frames queued, in order; a DATA payload of at
least `BIG_PAYLOAD` octets is passed as a view of itself, never copied; the joined small frames
before it are topped up with its first octets to whole TLS records (RFC 8446 §5.1: at most 2^14
octets of plaintext each), so the records stay full-sized and no tiny record carries a frame
header alone.
"""

from __future__ import annotations

TLS_RECORD = 16_384
BIG_PAYLOAD = 4 * TLS_RECORD


def vectored(out: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """The parts of one vectored write of the frames `out` (each part one TLS write): small
    frames joined, a payload of at least `BIG_PAYLOAD` octets as a view of itself after the
    joined part was topped up with its first octets to a whole number of `TLS_RECORD`s."""
    parts: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    small_len = 0
    for item in out:
        size = len(item)
        if size < BIG_PAYLOAD:
            small.append(item)
            small_len += size
            continue
        fill = -small_len % TLS_RECORD
        view = memoryview(item)
        if small:
            small.append(view[:fill])
            parts.append(b"".join(small))
            small = []
            small_len = 0
            parts.append(view[fill:])
        else:
            parts.append(item)
    if small:
        parts.append(b"".join(small))
    return parts
