"""HPACK (RFC 7541) for HBONE's few, short header blocks, without touching dynamic tables.

Owns: encoding every header block we send, and a fast decoder for blocks that use only the static
table and literals "without indexing"/"never indexed" -- which is everything our own peers send.

Why: the general `hpack` package Huffman-codes and indexes, and costs tens of microseconds per
block in Python; a CONNECT per new TCP connection makes that a per-connection cost.

Invariants:
- The encoder emits only representations that leave the peer's dynamic table unchanged
  (§6.1 indexed static entries, §6.2.2 literal without indexing, raw (non-Huffman) strings), so
  it needs no state and never sends a dynamic table size update.
- `decode_simple` returns None, having consumed nothing and changed nothing, as soon as a block
  uses anything that could touch the dynamic table (§6.2.1 incremental indexing, §6.3 size
  update, an index above the static table) or Huffman coding; the caller then decodes the same
  bytes with the full, stateful decoder. So the shared HPACK state is only ever modified by the
  full decoder, exactly as the peer's encoder expects.
"""

from __future__ import annotations

from collections.abc import Sequence

# RFC 7541 Appendix A, the static table (index -> (name, value)).
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)
_FULL_INDEX = {pair: i + 1 for i, pair in enumerate(STATIC_TABLE)}
_NAME_INDEX: dict[str, int] = {}
for _i, (_name, _) in enumerate(STATIC_TABLE):
    _NAME_INDEX.setdefault(_name, _i + 1)


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix; `first` holds the representation's flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode("latin-1")  # header values are ASCII/octets (RFC 9110 §5.5)
    return _integer(len(raw), 7, 0x00) + raw  # H=0: not Huffman coded (§5.2)


def encode(headers: Sequence[tuple[str, str]]) -> bytes:
    """Encode a header block without touching the peer's dynamic table."""
    out: list[bytes] = []
    for name, value in headers:
        full = _FULL_INDEX.get((name, value))
        if full is not None:
            out.append(_integer(full, 7, 0x80))  # §6.1 indexed header field
            continue
        idx = _NAME_INDEX.get(name)
        if idx is not None:
            out.append(_integer(idx, 4, 0x00))  # §6.2.2 literal w/o indexing, indexed name
        else:
            out.append(b"\x00" + _string(name))  # §6.2.2 literal w/o indexing, new name
        out.append(_string(value))
    return b"".join(out)


def _read_integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = data[pos]  # IndexError on truncation: the caller falls back
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 28:
            raise ValueError("HPACK integer too large")


def _read_string(data: bytes, pos: int) -> tuple[str, int] | None:
    if data[pos] & 0x80:
        return None  # Huffman coded: leave it to the full decoder
    length, pos = _read_integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise ValueError("truncated HPACK string")
    return data[pos:end].decode("latin-1"), end


def decode_simple(data: bytes) -> list[tuple[str, str]] | None:
    """Decode a block that needs no dynamic table and no Huffman, else None (see invariants)."""
    headers: list[tuple[str, str]] = []
    pos = 0
    end = len(data)
    try:
        while pos < end:
            first = data[pos]
            if first & 0x80:  # §6.1 indexed header field
                index, pos = _read_integer(data, pos, 7)
                if not 0 < index <= len(STATIC_TABLE):
                    return None
                headers.append(STATIC_TABLE[index - 1])
                continue
            if first & 0xE0:  # §6.2.1 incremental indexing (01xxxxxx) or §6.3 size update (001)
                return None
            index, pos = _read_integer(data, pos, 4)  # §6.2.2 / §6.2.3 (0000 / 0001 prefix)
            if index:
                if index > len(STATIC_TABLE):
                    return None
                name = STATIC_TABLE[index - 1][0]
            else:
                parsed = _read_string(data, pos)
                if parsed is None:
                    return None
                name, pos = parsed
            parsed = _read_string(data, pos)
            if parsed is None:
                return None
            value, pos = parsed
            headers.append((name, value))
    except (IndexError, ValueError):
        return None  # malformed or truncated: the full decoder reports it precisely
    return headers
