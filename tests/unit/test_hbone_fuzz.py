"""Fuzz target for the HTTP/2 (HBONE) connection core (hypothesis; runs briefly in CI, and once
more in pure Python through tests/unit/test_native.py).

Properties, as server AND as client:
- whatever the bytes (random, or frames of every type with random flags, ids and payloads, HPACK
  blocks included) and however they are split, `receive_data` returns events; a connection
  error is a `ConnectionTerminated` ending the list, with an RFC 9113 §7 code and the GOAWAY
  carrying it queued. Never another exception, never anything parsed after it;
- valid frame sequences (SETTINGS, HEADERS + CONTINUATION, padded DATA, WINDOW_UPDATE,
  RST_STREAM, PING, PRIORITY, GOAWAY) split arbitrarily give the same events and the same
  output as unsplit, and no connection error;
- memory and work stay bounded: buffered input never exceeds one maximal frame, a header block
  never exceeds its limit, live streams never exceed the advertised limit once acknowledged,
  reset streams leave nothing but a bounded id memory.
The table-driven tests pin the error code RFC 9113 / RFC 7541 require for each input class the
fuzzer found mishandled (the comments name the section).
"""

from __future__ import annotations

import os
from dataclasses import astuple

import hpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshcore.hbone.connection import HboneConnection
from meshcore.hbone.control import MAX_FRAME
from meshcore.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RequestReceived,
    RequestRefused,
    StreamReset,
)
from meshcore.hbone.frames import (
    CLIENT_PREFACE,
    FRAME_HEADER,
    ErrorCode,
    Flag,
    FrameType,
    Setting,
    encode_settings,
    encode_settings_ack,
    frame_header,
)
from meshcore.hbone.headerblock import HEADER_BLOCK_LIMIT
from meshcore.hbone.headers import encode
from meshcore.hbone.streams import RECENT_RESETS, Role
from tests.helpers import split

# HBONE_FUZZ_EXAMPLES=5000 for a longer hunt than CI's.
FUZZ = settings(
    max_examples=int(os.environ.get("HBONE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LIMIT = 3  # the server's advertised MAX_CONCURRENT_STREAMS in these tests
CLIENT_STREAMS = (1, 3, 5)  # streams the client opened before the fuzzed input


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), ftype, flags, sid) + payload


def connection(role: Role) -> HboneConnection:
    """A connection past its handshake (peer SETTINGS received, ours acknowledged); a client
    has CLIENT_STREAMS open."""
    conn = HboneConnection(role, max_concurrent_streams=LIMIT)
    conn.initiate(0.0)
    hello = encode_settings({}) + encode_settings_ack()
    if role is Role.SERVER:
        hello = CLIENT_PREFACE + hello
    events = conn.receive_data(hello, 0.0)
    assert not any(isinstance(e, ConnectionTerminated) for e in events)
    if role is Role.CLIENT:
        for sid in CLIENT_STREAMS:
            assert conn.open_connect("10.0.0.1:80") == sid
    conn.data_to_send()
    return conn


def frames_of(out: bytes) -> list[tuple[int, int, int, bytes]]:
    """The (type, flags, stream, payload) of each frame in `out`."""
    frames = []
    pos = 0
    while pos < len(out):
        length = int.from_bytes(out[pos : pos + 3], "big")
        ftype, flags = out[pos + 3], out[pos + 4]
        sid = int.from_bytes(out[pos + 5 : pos + 9], "big")
        frames.append((ftype, flags, sid, out[pos + 9 : pos + 9 + length]))
        pos += FRAME_HEADER + length
    assert pos == len(out), "output is not whole frames"
    return frames


def check_bounds(conn: HboneConnection) -> None:
    """What one connection may hold whatever its peer sends (RFC 9113 §10.5)."""
    assert conn._buffered <= FRAME_HEADER + MAX_FRAME
    assert sum(len(c) for c in conn._buf) <= FRAME_HEADER + MAX_FRAME
    assert conn._header_size <= HEADER_BLOCK_LIMIT
    assert sum(len(c) for c in conn._header_chunks) <= HEADER_BLOCK_LIMIT
    # ours once acknowledged (server); the pool's bound on what we open (client)
    assert conn.open_streams <= (LIMIT if conn.role is Role.SERVER else 100)
    assert len(conn._recent_resets) <= RECENT_RESETS


def feed(conn: HboneConnection, pieces: list[bytes]) -> tuple[list[Event], bytes]:
    """Feed `pieces` one call each (bounds checked after each); the events and the output.
    Any exception but the connection's own error handling fails the test."""
    events: list[Event] = []
    out = b""
    for piece in pieces:
        got = conn.receive_data(piece, 0.0)
        check_bounds(conn)
        out += conn.data_to_send()
        ends = [
            i for i, e in enumerate(got) if isinstance(e, ConnectionTerminated) and not e.remote
        ]
        if ends:
            assert ends == [len(got) - 1], "a connection error ends the events"
            assert conn.closed
        if events and isinstance(events[-1], ConnectionTerminated) and not events[-1].remote:
            assert not got, "nothing is parsed after a connection error"
        events += got
    return events, out


def check_terminated(events: list[Event], out: bytes) -> None:
    """A local ConnectionTerminated carries a §7 code and its GOAWAY went out."""
    ends = [e for e in events if isinstance(e, ConnectionTerminated) and not e.remote]
    if not ends:
        return
    (end,) = ends
    assert end.error_code in set(ErrorCode) - {ErrorCode.NO_ERROR}
    goaways = [p for t, _, _, p in frames_of(out) if t == FrameType.GOAWAY]
    assert goaways, "GOAWAY queued"
    assert int.from_bytes(goaways[-1][4:8], "big") == end.error_code


def normalized(events: list[Event]) -> list[tuple[object, ...]]:
    """Events as tuples, consecutive DataReceived of one stream merged (how many DATA frames
    one event carries depends on the reads, RFC 9113 §8.5: a tunnel's bytes are a stream)."""
    merged: list[Event] = []
    for e in events:
        last = merged[-1] if merged else None
        if isinstance(e, DataReceived):
            if isinstance(last, DataReceived) and last.stream_id == e.stream_id:
                last.data += bytes(e.data)
                last.flow_length += e.flow_length
            else:
                merged.append(DataReceived(e.stream_id, bytes(e.data), e.flow_length))
        else:
            merged.append(e)
    return [(type(e).__name__, *astuple(e)) for e in merged]


# ---- arbitrary input ----

header_text = st.text(st.sampled_from("abcXYZ:-_ \t\r\n\x00\x7f\xb2\xe9²09"), max_size=12)
header_lists = st.lists(st.tuples(header_text, header_text), max_size=6).map(
    lambda hs: [(":method", "CONNECT"), (":authority", "a:80"), *hs]
)


def _hpack_full(headers: list[tuple[str, str]]) -> bytes:
    """A block from the general encoder: Huffman strings and dynamic-table indexing."""
    return bytes(hpack.Encoder().encode(headers))


def _latin1(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k.encode().decode("latin-1"), v.encode().decode("latin-1")) for k, v in headers]


header_blocks = st.one_of(
    header_lists.map(lambda hs: encode(_latin1(hs))),
    header_lists.map(_hpack_full),
    st.just(encode([(":status", "200")])),
    st.just(encode([(":status", "\xb2\xb2\xb2")])),
    st.just(encode([(":status", "103")])),
    st.just(encode([(":method", "CONNECT"), (":authority", "a:\xb2")])),
    st.binary(max_size=24),
)
payloads = st.one_of(
    st.binary(max_size=24),
    header_blocks,
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),
    st.binary(min_size=8, max_size=8),
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**32 - 1)), max_size=3).map(
        lambda kv: b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in kv)
    ),
)
stream_ids = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 9, 2**31 - 1])
frames = st.one_of(
    st.builds(frame, st.integers(0, 11), st.integers(0, 255), stream_ids, payloads),
    # a frame header whose length disagrees with what follows
    st.builds(
        frame_header, st.integers(0, 2**24 - 1), st.integers(0, 11), st.integers(0, 255), stream_ids
    ),
    st.binary(max_size=16),
)


@FUZZ
@given(
    st.sampled_from([Role.SERVER, Role.CLIENT]),
    st.lists(frames, max_size=12),
    st.lists(st.integers(0, 2**16), max_size=8),
)
@example(
    Role.CLIENT, [frame(FrameType.HEADERS, Flag.END_HEADERS, 1, encode([(":status", "²²²")]))], []
)
@example(
    Role.SERVER,
    [
        frame(
            FrameType.HEADERS,
            Flag.END_HEADERS,
            1,
            encode([(":method", "CONNECT"), (":authority", "a:²")]),
        )
    ],
    [],
)
def test_arbitrary_frames_give_events_or_a_connection_error(
    role: Role, parts: list[bytes], cuts: list[int]
) -> None:
    conn = connection(role)
    events, out = feed(conn, split(b"".join(parts), cuts))
    check_terminated(events, out)


@FUZZ
@given(st.binary(max_size=64), st.lists(st.integers(0, 64), max_size=4))
def test_arbitrary_bytes_before_the_handshake(data: bytes, cuts: list[int]) -> None:
    """A server fed anything in place of the preface, a client anything in place of the
    server's SETTINGS."""
    for role in (Role.SERVER, Role.CLIENT):
        conn = HboneConnection(role)
        conn.initiate(0.0)
        conn.data_to_send()
        events, out = feed(conn, split(data, cuts))
        check_terminated(events, out)


# ---- valid sequences ----


def _header_frames(
    draw: st.DrawFn, sid: int, block: bytes, *, end_stream: bool, others: list[int]
) -> list[bytes]:
    """`block` as HEADERS (maybe padded, maybe with a priority) + CONTINUATIONs (§6.2, §6.10)."""
    # distinct inner cuts: no empty CONTINUATION but the last (a per-connection allowance,
    # meshcore.hbone.headerblock, bounds those)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(block) - 1)), max_size=3)))
    pieces = [block[a:b] for a, b in zip([0, *cuts], [*cuts, len(block)], strict=True)]
    flags = Flag.END_STREAM if end_stream else 0
    first = pieces[0]
    if draw(st.booleans()):  # §6.3 priority fields: depend on another stream, never itself
        dep = draw(st.sampled_from([0, *others]))
        first = dep.to_bytes(4, "big") + bytes([draw(st.integers(0, 255))]) + first
        flags |= Flag.PRIORITY
    if draw(st.booleans()):
        pad = draw(st.integers(0, 20))
        first = bytes([pad]) + first + bytes(pad)
        flags |= Flag.PADDED
    if len(pieces) == 1:
        return [frame(FrameType.HEADERS, flags | Flag.END_HEADERS, sid, first)]
    out = [frame(FrameType.HEADERS, flags, sid, first)]
    for i, piece in enumerate(pieces[1:], 1):
        last = Flag.END_HEADERS if i == len(pieces) - 1 else 0
        out.append(frame(FrameType.CONTINUATION, last, sid, piece))
    return out


def _data_frame(draw: st.DrawFn, sid: int, *, end_stream: bool) -> bytes:
    body = draw(st.binary(max_size=40))
    flags = Flag.END_STREAM if end_stream else 0
    if draw(st.booleans()):  # §6.1 padding
        pad = draw(st.integers(0, 20))
        return frame(FrameType.DATA, flags | Flag.PADDED, sid, bytes([pad]) + body + bytes(pad))
    return frame(FrameType.DATA, flags, sid, body)


@st.composite
def valid_sequences(draw: st.DrawFn, role: Role) -> list[bytes]:
    """A valid sequence of frames from the peer of a `connection(role)`."""
    out: list[bytes] = []
    # sid -> ended by the peer; a server's peer opens streams, a client's peer answers ours
    live: dict[int, bool] = {}
    unanswered = list(CLIENT_STREAMS) if role is Role.CLIENT else []
    next_id = 1
    for _ in range(draw(st.integers(0, 12))):
        op = draw(
            st.sampled_from(
                ["open", "data", "trailers", "window", "rst", "ping", "priority", "settings"]
            )
        )
        open_ids = [s for s, ended in live.items() if not ended]
        if op == "open" and role is Role.SERVER and len(live) < LIMIT:
            sid, next_id = next_id, next_id + 2
            block = encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
            out += _header_frames(draw, sid, block, end_stream=False, others=list(live))
            live[sid] = False
        elif op == "open" and unanswered:
            sid = unanswered.pop(0)
            if draw(st.booleans()):  # §8.1: an informational response first
                block = encode([(":status", "103"), ("link", "</a>")])
                out += _header_frames(draw, sid, block, end_stream=False, others=[])
            block = encode([(":status", "200"), ("x-y", "z")])
            out += _header_frames(draw, sid, block, end_stream=False, others=list(live))
            live[sid] = False
        elif op == "data" and open_ids:
            sid = draw(st.sampled_from(open_ids))
            end = draw(st.booleans())
            out.append(_data_frame(draw, sid, end_stream=end))
            live[sid] = end
        elif op == "trailers" and open_ids:
            sid = draw(st.sampled_from(open_ids))
            block = encode([("grpc-status", "0")])
            out += _header_frames(draw, sid, block, end_stream=True, others=[])
            live[sid] = True
        elif op == "window":
            sid = draw(st.sampled_from([0, *live]))
            out.append(
                frame(
                    FrameType.WINDOW_UPDATE, 0, sid, draw(st.integers(1, 1000)).to_bytes(4, "big")
                )
            )
        elif op == "rst" and live:
            sid = draw(st.sampled_from(list(live)))
            del live[sid]
            code = draw(st.sampled_from(list(ErrorCode)))
            out.append(frame(FrameType.RST_STREAM, 0, sid, int(code).to_bytes(4, "big")))
        elif op == "ping":
            out.append(frame(FrameType.PING, 0, 0, draw(st.binary(min_size=8, max_size=8))))
        elif op == "priority":
            sid = draw(st.integers(1, 11))
            dep = draw(st.sampled_from([d for d in (0, 1, 2, 3) if d != sid]))
            out.append(frame(FrameType.PRIORITY, 0, sid, dep.to_bytes(4, "big") + b"\x10"))
        elif op == "settings":
            values = {
                int(Setting.HEADER_TABLE_SIZE): draw(st.integers(0, 2**16)),
                int(Setting.MAX_FRAME_SIZE): draw(st.integers(2**14, 2**24 - 1)),
                int(Setting.MAX_CONCURRENT_STREAMS): draw(st.integers(0, 1000)),
                int(Setting.INITIAL_WINDOW_SIZE): draw(st.integers(0, 2**20)),
                draw(st.integers(7, 99)): draw(st.integers(0, 2**32 - 1)),  # unknown: ignored
            }
            out.append(encode_settings(values))
            out.append(encode_settings_ack()) if draw(st.booleans()) else None
    if draw(st.booleans()):
        last = max([*live, *CLIENT_STREAMS]) if role is Role.CLIENT else 0
        out.append(frame(FrameType.GOAWAY, 0, 0, last.to_bytes(4, "big") + bytes(4) + b"bye"))
    return out


@FUZZ
@given(
    st.data(),
    st.sampled_from([Role.SERVER, Role.CLIENT]),
    st.lists(st.integers(0, 2**12), max_size=10),
)
def test_valid_sequences_split_anyhow_give_the_same_events(
    data: st.DataObject, role: Role, cuts: list[int]
) -> None:
    wire = b"".join(data.draw(valid_sequences(role)))
    whole, whole_out = feed(connection(role), [wire])
    pieces, pieces_out = feed(connection(role), split(wire, cuts))
    bytewise, _ = feed(connection(role), [wire[i : i + 1] for i in range(len(wire))])
    assert not any(isinstance(e, ConnectionTerminated) and not e.remote for e in whole), whole
    assert normalized(pieces) == normalized(whole)
    assert normalized(bytewise) == normalized(whole)
    assert pieces_out == whole_out


mutations = st.tuples(
    st.sampled_from(["insert", "replace", "flip", "cut"]),
    st.integers(0, 2**16),
    st.one_of(frames, st.binary(min_size=1, max_size=4)),
)


def mutated(wire: bytes, mutation: tuple[str, int, bytes]) -> bytes:
    how, where, noise = mutation
    at = where % (len(wire) + 1)
    if how == "insert":
        return wire[:at] + noise + wire[at:]
    if how == "replace":
        return wire[:at] + noise + wire[at + len(noise) :]
    if how == "flip" and wire:
        at = min(at, len(wire) - 1)
        return wire[:at] + bytes([wire[at] ^ (noise[0] if noise else 0xFF)]) + wire[at + 1 :]
    return wire[:at]


@FUZZ
@given(
    st.data(),
    st.sampled_from([Role.SERVER, Role.CLIENT]),
    mutations,
    st.lists(st.integers(0, 2**12), max_size=6),
)
def test_valid_sequences_with_one_mutation(
    data: st.DataObject, role: Role, mutation: tuple[str, int, bytes], cuts: list[int]
) -> None:
    """Deep states reached by valid frames, then one hostile change: events or a connection
    error, and the bounds hold."""
    wire = mutated(b"".join(data.draw(valid_sequences(role))), mutation)
    events, out = feed(connection(role), split(wire, cuts))
    check_terminated(events, out)


# ---- the error code of each input class the fuzzer found mishandled ----


def _headers(sid: int, fields: list[tuple[str, str]], flags: int = Flag.END_HEADERS) -> bytes:
    return frame(FrameType.HEADERS, flags, sid, encode(fields))


_CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


@pytest.mark.parametrize(
    ("role", "wire", "connection_error", "stream_reset"),
    [
        # §8.3.2 + RFC 9110 §15: ":status ²²²" is no status (str.isdigit: int() raised)
        (Role.CLIENT, _headers(1, [(":status", "²²²")]), None, ErrorCode.PROTOCOL_ERROR),
        (Role.CLIENT, _headers(1, [(":status", "2000")]), None, ErrorCode.PROTOCOL_ERROR),
        # §8.5: an :authority port "²" (str.isdigit: int() raised) is answered 400, below
        (Role.SERVER, _headers(1, [(":method", "CONNECT"), (":authority", "a:²")]), None, None),
        # §8.1: an informational response with END_STREAM, a 101 (§8.6)
        (
            Role.CLIENT,
            _headers(1, [(":status", "103")], Flag.END_HEADERS | Flag.END_STREAM),
            None,
            ErrorCode.PROTOCOL_ERROR,
        ),
        (Role.CLIENT, _headers(1, [(":status", "101")]), None, ErrorCode.PROTOCOL_ERROR),
        # §8.1: trailers with a pseudo-header
        (
            Role.CLIENT,
            _headers(1, [(":status", "200")])
            + _headers(1, [(":status", "200")], Flag.END_HEADERS | Flag.END_STREAM),
            None,
            ErrorCode.PROTOCOL_ERROR,
        ),
        # §8.2.1: CR/LF/NUL in a value, leading/trailing whitespace, a bad name
        (Role.SERVER, _headers(1, [*_CONNECT, ("x", "a\r\nb: c")]), None, ErrorCode.PROTOCOL_ERROR),
        (Role.SERVER, _headers(1, [*_CONNECT, ("x", " a")]), None, ErrorCode.PROTOCOL_ERROR),
        (Role.SERVER, _headers(1, [*_CONNECT, ("x y", "a")]), None, ErrorCode.PROTOCOL_ERROR),
        (Role.SERVER, _headers(1, [*_CONNECT, ("", "a")]), None, ErrorCode.PROTOCOL_ERROR),
        (
            Role.CLIENT,
            _headers(1, [(":status", "200"), ("x", "a\x00")]),
            None,
            ErrorCode.PROTOCOL_ERROR,
        ),
        # §5.1, §8.4: a server opening a stream (no PUSH_PROMISE, push disabled)
        (Role.CLIENT, _headers(2, [(":status", "200")]), ErrorCode.PROTOCOL_ERROR, None),
        # §5.1.1: a client opening an even stream (client streams are odd)
        (Role.SERVER, _headers(2, _CONNECT), ErrorCode.PROTOCOL_ERROR, None),
        # §6.3: PRIORITY of the wrong size; §4.2: frames too short for their fields
        (Role.SERVER, frame(FrameType.PRIORITY, 0, 1, bytes(4)), ErrorCode.FRAME_SIZE_ERROR, None),
        (Role.SERVER, frame(FrameType.DATA, Flag.PADDED, 1), ErrorCode.FRAME_SIZE_ERROR, None),
        (
            Role.SERVER,
            frame(FrameType.HEADERS, Flag.PRIORITY | Flag.END_HEADERS, 1, bytes(3)),
            ErrorCode.FRAME_SIZE_ERROR,
            None,
        ),
    ],
    ids=[
        "status-superscript",
        "status-4-digits",
        "authority-superscript-port",
        "1xx-end-stream",
        "101",
        "trailer-pseudo",
        "value-crlf",
        "value-leading-space",
        "name-space",
        "name-empty",
        "value-nul",
        "server-opened-stream",
        "client-even-stream",
        "priority-size",
        "padded-data-empty",
        "headers-priority-short",
    ],
)
def test_rfc_error_code_of_each_input_class(
    role: Role, wire: bytes, connection_error: int | None, stream_reset: int | None
) -> None:
    events, out = feed(connection(role), [wire])
    check_terminated(events, out)
    ended = [e.error_code for e in events if isinstance(e, ConnectionTerminated)]
    assert ended == ([connection_error] if connection_error is not None else [])
    resets = [e.error_code for e in events if isinstance(e, StreamReset)]
    resets += [e.error_code for e in events if isinstance(e, RequestRefused) and not e.status]
    assert resets == ([stream_reset] if stream_reset is not None else [])
    if role is Role.SERVER and connection_error is None and stream_reset is None:
        (refused,) = [e for e in events if isinstance(e, RequestRefused)]
        assert refused.status == 400


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
@pytest.mark.parametrize(
    "first",
    [
        frame(FrameType.PING, 0, 0, bytes(8)),
        encode_settings_ack(),
        frame(FrameType.WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")),
    ],
    ids=["ping", "settings-ack", "window-update"],
)
def test_the_peer_preface_is_a_settings_frame(role: Role, first: bytes) -> None:
    """RFC 9113 §3.4: the first frame of either peer is SETTINGS (not its ACK); anything else
    is an invalid preface, PROTOCOL_ERROR."""
    conn = HboneConnection(role)
    conn.initiate(0.0)
    conn.data_to_send()
    preface = CLIENT_PREFACE if role is Role.SERVER else b""
    events, out = feed(conn, [preface + first + encode_settings({})])
    check_terminated(events, out)
    assert [e.error_code for e in events if isinstance(e, ConnectionTerminated)] == [
        ErrorCode.PROTOCOL_ERROR
    ]


def test_a_value_outside_utf8_reads_the_same_through_either_decoder() -> None:
    """RFC 9113 §8.2.1: field values are octets. A Huffman-coded (full decoder) obs-text value
    was a COMPRESSION_ERROR, the same value as a raw literal (fast decoder) was accepted."""
    fields = [*_CONNECT, ("x-obs", "caf\xe9")]
    raw = encode(fields)
    huffman = bytes(
        hpack.Encoder().encode([(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields])
    )
    got = []
    for block in (raw, huffman):
        events, _ = feed(
            connection(Role.SERVER), [frame(FrameType.HEADERS, Flag.END_HEADERS, 1, block)]
        )
        got.append([e.headers for e in events if isinstance(e, RequestReceived)])
    assert got[0] == got[1] == [fields]


# ---- the peer's input interleaved with our own actions ----

actions = st.lists(
    st.tuples(
        st.sampled_from(["send", "end", "ack", "reset", "respond", "open", "ping", "timer"]),
        st.sampled_from([1, 3, 5, 7]),
        st.integers(0, 70_000),
    ),
    max_size=8,
)


def act(conn: HboneConnection, action: tuple[str, int, int]) -> None:
    """One thing the edge above may do at any time (`HboneConnection`'s public API, as the
    edge uses it: a server sends on a stream only after answering it, and answers it once)."""
    what, sid, n = action
    stream = conn._streams.get(sid)
    answered = stream is None or stream.answered or conn.role is Role.CLIENT
    if what in ("send", "end") and not answered:
        return
    if what == "send":
        conn.send_data(sid, bytes(n % 20_000))
    elif what == "end":
        conn.end_stream(sid)
    elif what == "ack":
        conn.acknowledge_received_data(sid, n)
    elif what == "reset":
        conn.reset_stream(sid, ErrorCode.CANCEL)
    elif what == "respond" and not answered:
        conn.respond(sid, 200 if n % 2 else 503)
    elif what == "open" and conn.role is Role.CLIENT and conn.can_open_stream():
        conn.open_connect("10.0.0.9:80")
    elif what == "ping":
        conn.ping(float(n))
    elif what == "timer":
        conn.handle_timer(n / 1000)


@FUZZ
@given(
    st.data(),
    st.sampled_from([Role.SERVER, Role.CLIENT]),
    st.lists(st.tuples(mutations, st.booleans()), max_size=1),
    st.lists(st.integers(0, 2**12), max_size=6),
    actions,
)
def test_peer_input_interleaved_with_local_actions(
    data: st.DataObject,
    role: Role,
    mutation: list[tuple[tuple[str, int, bytes], bool]],
    cuts: list[int],
    todo: list[tuple[str, int, int]],
) -> None:
    """Our sends, acknowledgements, resets and answers between the peer's reads: never an
    exception, whole frames out, and no DATA frame beyond the peer's windows or frame size
    (RFC 9113 §6.9.1, §4.2)."""
    wire = b"".join(data.draw(valid_sequences(role)))
    if mutation:
        wire = mutated(wire, mutation[0][0])
    conn = connection(role)
    pieces = split(wire, cuts)
    out = b""
    for i, piece in enumerate(pieces):
        max_frame = conn.peer_max_frame
        events, more = feed(conn, [piece])
        check_terminated(events, more)
        for action in todo[i :: len(pieces)]:
            act(conn, action)
            check_bounds(conn)
        out += more + conn.data_to_send()
        assert conn.conn_send_window >= 0
        for ftype, _, _, payload in frames_of(more):
            if ftype == FrameType.DATA:
                assert len(payload) <= max(max_frame, conn.peer_max_frame)
    frames_of(out)
