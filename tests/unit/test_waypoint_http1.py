"""The sans-I/O HTTP/1.1 codec: framing, smuggling refusals, streaming, keep-alive."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.protocol import http1
from waypoint.protocol.http1 import (
    Body,
    EndOfMessage,
    Http1Parser,
    HttpParseError,
    RequestHead,
    ResponseHead,
    Role,
)


def events(role: Role, data: bytes, *, eof: bool = False, method: str = "") -> list[object]:
    p = Http1Parser(role)
    if method:
        p.expect_response_to(method)
    p.feed(data)
    if eof:
        p.feed_eof()
    out: list[object] = []
    while (ev := p.next_event()) is not None:
        out.append(ev)
        if isinstance(ev, EndOfMessage) and p.idle:
            break
    return out


def body_of(evs: list[object]) -> bytes:
    return b"".join(e.data for e in evs if isinstance(e, Body))


def test_content_length_request_and_keep_alive_pipelining() -> None:
    p = Http1Parser(Role.REQUEST)
    p.feed(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /b HTTP/1.1\r\nhost: y\r\n\r\n"
    )
    head = p.next_event()
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.content_length, head.keep_alive) == (
        "POST",
        "/a",
        5,
        True,
    )
    assert ("host", "x") in head.headers  # names lower-cased
    assert p.next_event() == Body(b"hello")
    assert p.next_event() == EndOfMessage()
    second = p.next_event()
    assert isinstance(second, RequestHead)
    assert second.target == "/b"
    assert p.next_event() == EndOfMessage()
    assert p.next_event() is None
    assert p.idle


def test_chunked_with_extensions_and_trailers() -> None:
    raw = (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\ngrpc-status: 0\r\n\r\n"
    )
    evs = events(Role.REQUEST, raw)
    assert body_of(evs) == b"hello!"
    assert evs[-1] == EndOfMessage((("grpc-status", "0"),))


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        # RFC 9112 §6.3 rule 3: TE + CL together is a smuggling vector: refused.
        (
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
            b"transfer-encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nhost: x\r\n folded: value\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\r\nhost : x\r\n\r\n", 400),  # space before colon
        (b"GET / HTTP/1.1\r\nx: a\nb: c\r\nhost: x\r\n\r\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/2.0\r\nhost: x\r\n\r\n", 505),
        (b"GET /\r\nhost: x\r\n\r\n", 400),
    ],
)
def test_ambiguous_or_malformed_requests_are_refused(raw: bytes, status: int) -> None:
    with pytest.raises(HttpParseError) as err:
        events(Role.REQUEST, raw)
    assert err.value.status == status


def test_bad_chunk_size_and_truncation() -> None:
    bad = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"
    with pytest.raises(HttpParseError):
        events(Role.REQUEST, bad)
    cut = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc"
    with pytest.raises(HttpParseError):
        events(Role.REQUEST, cut, eof=True)


def test_head_too_large_is_431() -> None:
    p = Http1Parser(Role.REQUEST, max_head=1024)
    p.feed(b"GET / HTTP/1.1\r\nx: " + b"a" * 2000)
    with pytest.raises(HttpParseError) as err:
        p.next_event()
    assert err.value.status == 431


def _trickled(p: Http1Parser, pieces: list[bytes]) -> list[object]:
    """Feed `pieces` one read each, `next_event` after each as the proxy does."""
    got: list[object] = []
    for piece in pieces:
        p.feed(piece)
        while (ev := p.next_event()) is not None:
            got.append(ev)
    return got


@pytest.mark.parametrize(("role", "status"), [(Role.REQUEST, 400), (Role.RESPONSE, 502)])
def test_empty_lines_before_a_start_line_are_bounded(role: Role, status: int) -> None:
    """RFC 9112 §2.2: empty lines before a start line are ignored, at most `MAX_EMPTY_LINES` of
    them. Unbounded, a peer sending CR LF one read at a time kept the connection busy forever
    (each stripped, never counted against the head limit: ~40 ms of CPU per 80 KB)."""
    p = Http1Parser(role)
    if role is Role.RESPONSE:
        p.expect_response_to("GET")
    with pytest.raises(HttpParseError) as err:
        _trickled(p, [b"\r\n"] * 40_000)  # main: all stripped, no error
    assert err.value.status == status
    assert "empty lines" in str(err.value)
    # Split CR and LF are counted too.
    p = Http1Parser(role)
    with pytest.raises(HttpParseError):
        _trickled(p, [b"\r", b"\n"] * (http1.MAX_EMPTY_LINES + 1))


def test_empty_lines_up_to_the_bound_are_ignored_before_every_message() -> None:
    """The bound is per message: a keep-alive connection may send `MAX_EMPTY_LINES` empty
    lines before each request."""
    req = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    pieces = ([b"\r\n"] * http1.MAX_EMPTY_LINES + [req]) * 3
    got = _trickled(Http1Parser(Role.REQUEST), pieces)
    assert [type(e) for e in got] == [RequestHead, EndOfMessage] * 3


_REQ = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
_RESP = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_SPLITS: dict[str, Callable[[int, bytes], list[bytes]]] = {
    "one read": lambda n, start: [b"\r\n" * n + start],
    "pairs": lambda n, start: [b"\r\n"] * n + [start],
    "CR|LF": lambda n, start: [b"\r", b"\n"] * n + [start],
    "last pair with the start line": lambda n, start: [b"\r\n"] * (n - 1) + [b"\r\n" + start],
    "CR | LF pairs start": lambda n, start: [b"\r", b"\n" + b"\r\n" * (n - 1) + start],
}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "checked"])
@pytest.mark.parametrize("split", list(_SPLITS))
@pytest.mark.parametrize("role", [Role.REQUEST, Role.RESPONSE])
def test_empty_line_verdict_does_not_depend_on_reads(role: Role, split: str, fast: bool) -> None:
    """`MAX_EMPTY_LINES` empty lines are ignored and one more refuses the message, however the
    CR LFs are split across reads. Before, only lines arriving with no head end in the buffer
    were counted: 9 with the last in the start line's read were accepted, and 2 in one read
    with the start line were 400 "malformed request line b''"."""
    start, status = (_REQ, 400) if role is Role.REQUEST else (_RESP, 502)
    bound = http1.MAX_EMPTY_LINES
    for n, refused in [(1, False), (2, False), (bound, False), (bound + 1, True)]:
        p = Http1Parser(role, fast=fast)
        if role is Role.RESPONSE:
            p.expect_response_to("GET")
        pieces = _SPLITS[split](n, start)
        if refused:
            with pytest.raises(HttpParseError) as err:
                _trickled(p, pieces)
            assert err.value.status == status
            assert "empty lines" in str(err.value)
        else:
            got = _trickled(p, pieces)
            head = RequestHead if role is Role.REQUEST else ResponseHead
            assert [type(e) for e in got] == [head, EndOfMessage], (n, split)


_POST = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "checked"])
@pytest.mark.parametrize(
    "pieces",
    [
        [_REQ + b"\r\n\r\n" + _REQ],
        [_POST + b"\r\n\r\n" + _REQ],
        [_POST + b"\r\n", _REQ],
        [_REQ + b"\r", b"\n\r\n" + _REQ],
    ],
    ids=["pipelined, 2 lines", "after a body, 2 lines", "after a body, 1 line", "split CR"],
)
def test_empty_lines_between_messages_are_ignored(pieces: list[bytes], fast: bool) -> None:
    """Empty lines after a message and before the next (a client may send one after a body) are
    ignored whatever arrives in the same read; before, two in the read of the next request made
    it a 400."""
    got = _trickled(Http1Parser(Role.REQUEST, fast=fast), pieces)
    assert [type(e) for e in got if not isinstance(e, Body)] == [
        RequestHead,
        EndOfMessage,
        RequestHead,
        EndOfMessage,
    ]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "checked"])
@pytest.mark.parametrize(
    "pieces",
    [
        [b"\n" * 20 + _REQ],
        [b"\r" * 20 + _REQ],
        [b"\n\r\r\n\n" + _REQ],
        [b"\r\n\n" + _REQ],
        [b"\n"] * 2000 + [_REQ],
    ],
    ids=["20 LF", "20 CR", "LF CR mix", "CRLF LF", "2000 LF trickled"],
)
def test_bare_cr_or_lf_before_a_start_line_is_refused(pieces: list[bytes], fast: bool) -> None:
    """A bare CR or LF before the start line is refused as in the rest of a head (RFC 9112
    §2.2: a bare CR MUST be refused), at the first read that shows it; before, 20 bare CRs or
    2000 bare LFs one per read were stripped and the request accepted."""
    p = Http1Parser(Role.REQUEST, fast=fast)
    p.feed(pieces[0])
    with pytest.raises(HttpParseError) as err:
        p.next_event()
    assert err.value.status == 400
    assert "bare CR or LF" in str(err.value)


def test_a_lone_cr_waits_for_its_lf() -> None:
    p = Http1Parser(Role.REQUEST)
    p.feed(b"\r")
    assert p.next_event() is None
    assert [type(e) for e in _trickled(p, [b"\n" + _REQ])] == [RequestHead, EndOfMessage]


_FIELD_600 = b"x-a: " + b"a" * 593 + b"\r\n"
_CHUNKED = b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n"


@pytest.mark.parametrize(
    ("role", "wire", "want"),
    [
        (Role.REQUEST, b"GET / HTTP/1.1\r\nhost: a\r\n" + _FIELD_600 * 99 + b"\r\n", RequestHead),
        (Role.RESPONSE, b"HTTP/1.1 200 OK\r\n" + _FIELD_600 * 100 + b"\r\n", ResponseHead),
        (Role.REQUEST, b"GET / HTTP/1.1\r\nx: " + b"a" * http1.MAX_HEAD, 431),
        (Role.RESPONSE, b"HTTP/1.1 200 OK\r\nx: " + b"a" * http1.MAX_HEAD, 502),
        (Role.REQUEST, _CHUNKED + b"x: " + b"a" * 60_000 + b"\r\n\r\n", EndOfMessage),
        (Role.REQUEST, _CHUNKED + b"x: " + b"a" * http1.MAX_HEAD, 400),
    ],
    ids=[
        "request",
        "response",
        "request past the limit",
        "response past the limit",
        "a long trailer line",
        "trailer line past the limit",
    ],
)
def test_a_head_trickled_one_byte_per_read_costs_linear_time(
    role: Role, wire: bytes, want: type | int
) -> None:
    """A near-limit head (or trailer section) fed one byte per read, `next_event` after each
    byte as the proxy does: read, or refused at the limit, in linear time. Searching the whole
    buffer for the end of the head on every read took ~1 s of CPU for one 60 KiB head."""
    p = Http1Parser(role)
    if role is Role.RESPONSE:
        p.expect_response_to("GET")
    pieces = [wire[i : i + 1] for i in range(len(wire))]
    got: list[object] = []
    start = time.process_time()
    try:
        for piece in pieces:
            p.feed(piece)
            while (ev := p.next_event()) is not None:
                got.append(type(ev))
    except HttpParseError as err:
        got.append(err.status)
    spent = time.process_time() - start
    assert want in got
    assert spent < 0.2  # ~0.03 s; ~1 s before


@pytest.mark.parametrize(
    ("raw", "method", "body", "until_close"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", "GET", b"ok", False),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", "HEAD", b"", False),  # HEAD: no body
        (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", b"", False),
        (b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n", "GET", b"", False),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", "GET", b"until the end", True),
        (
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            "GET",
            b"hi",
            False,
        ),
    ],
)
def test_response_framing(raw: bytes, method: str, body: bytes, until_close: bool) -> None:
    evs = events(Role.RESPONSE, raw, eof=True, method=method)
    head = evs[0]
    assert isinstance(head, ResponseHead)
    assert head.until_close is until_close
    assert body_of(evs) == body
    assert isinstance(evs[-1], EndOfMessage)


def test_informational_response_then_final() -> None:
    p = Http1Parser(Role.RESPONSE)
    p.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    first = p.next_event()
    assert isinstance(first, ResponseHead)
    assert first.informational
    assert p.next_event() == EndOfMessage()
    final = p.next_event()
    assert isinstance(final, ResponseHead)
    assert final.status == 200


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/1.1 0000200 OK",
        b"HTTP/1.1 0200 OK",
        b"HTTP/1.1 0200",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2",
    ],
)
def test_status_code_is_exactly_three_digits(line: bytes) -> None:
    """RFC 9112 §4: status-code = 3DIGIT. Leading zeros (which int() reads as 200) or fewer
    digits are a malformed upstream response, 502, whether the head arrives whole or byte by
    byte: the fast reader's status-line pattern does not match it, so the checked parser reads
    it again and refuses it (`test_http1_fast_response.py` compares the two readers on it)."""
    wire = line + b"\r\ncontent-length: 0\r\n\r\n"
    for pieces in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        p = Http1Parser(Role.RESPONSE)
        p.expect_response_to("GET")
        for piece in pieces[:-1]:
            p.feed(piece)
            assert p.next_event() is None
        p.feed(pieces[-1])
        with pytest.raises(HttpParseError, match="malformed status line") as err:
            p.next_event()
        assert err.value.status == 502


def test_keep_alive_rules() -> None:
    h10 = events(Role.REQUEST, b"GET / HTTP/1.0\r\n\r\n")[0]
    assert isinstance(h10, RequestHead)
    assert not h10.keep_alive
    ka = events(Role.REQUEST, b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")[0]
    assert isinstance(ka, RequestHead)
    assert ka.keep_alive
    close = events(Role.REQUEST, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: Close\r\n\r\n")[0]
    assert isinstance(close, RequestHead)
    assert not close.keep_alive


def test_strip_hop_by_hop_and_encoders() -> None:
    headers = [
        ("connection", "x-private, close"),
        ("x-private", "1"),
        ("te", "trailers"),
        ("keep-alive", "5"),
        ("x-ok", "2"),
    ]
    assert http1.strip_hop_by_hop(headers) == [("x-ok", "2")]
    # With a `drop` set of the caller's: its names go too, and so do those Connection names
    # (the set is extended for this message only, never changed).
    drop = http1.hop_by_hop_and("x-ok")
    assert http1.strip_hop_by_hop([*headers, ("x-b", "3")], drop) == [("x-b", "3")]
    assert drop == http1.hop_by_hop_and("x-ok")
    assert "x-private" not in drop
    alive = [("connection", "keep-alive"), ("keep-alive", "5"), ("content-length", "1")]
    assert http1.strip_hop_by_hop(alive, http1.hop_by_hop_and("content-length")) == []
    assert http1.strip_hop_by_hop(alive) == [("content-length", "1")]
    assert http1.encode_chunk(b"abc") == b"3\r\nabc\r\n"
    assert http1.encode_chunk(b"") == b""  # never an accidental last-chunk
    assert http1.encode_last_chunk([("a", "b")]) == b"0\r\na: b\r\n\r\n"
    with pytest.raises(HttpParseError):
        http1.encode_request_head("GET", "/", [("x", "a\r\nevil: 1")])  # no header injection
    # Nor through a name, the start line, or a bare CR / LF / NUL (one check per head).
    for name, value, target in [
        ("x\r\nevil", "1", "/"),
        ("x", "1", "/\r\nevil: 1"),
        ("x", "a\rb", "/"),
        ("x", "a\nb", "/"),
        ("x\x00", "1", "/"),
    ]:
        with pytest.raises(HttpParseError) as err:
            http1.encode_request_head("GET", target, [("a", "1"), (name, value)])
        assert err.value.status == 500
    fields = [("a", "1"), ("b", "x\ty \x80")]
    assert http1.encode_response_head(204, "", fields) == (
        b"HTTP/1.1 204 No Content\r\na: 1\r\nb: x\ty \x80\r\n\r\n"
    )
    assert http1.encode_request_head("GET", "/", []) == b"GET / HTTP/1.1\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=3000),
    chunk_sizes=st.lists(st.integers(1, 700), min_size=1, max_size=20),
    cuts=st.lists(st.integers(1, 64), min_size=1, max_size=50),
)
def test_any_split_of_a_chunked_stream_gives_the_same_body(
    body: bytes, chunk_sizes: list[int], cuts: list[int]
) -> None:
    """Feeding the same bytes in arbitrary pieces yields the same events' content."""
    wire = bytearray(b"PUT /x HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n")
    pos, i = 0, 0
    while pos < len(body):
        n = chunk_sizes[i % len(chunk_sizes)]
        wire += http1.encode_chunk(body[pos : pos + n])
        pos += n
        i += 1
    wire += http1.encode_last_chunk()
    wire += b"GET /next HTTP/1.1\r\nhost: h\r\n\r\n"
    p = Http1Parser(Role.REQUEST)
    got: list[object] = []
    offset, k = 0, 0
    while offset < len(wire):
        step = cuts[k % len(cuts)]
        p.feed(bytes(wire[offset : offset + step]))
        offset += step
        k += 1
        while (ev := p.next_event()) is not None:
            got.append(ev)
    assert body_of(got) == body
    heads = [e for e in got if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == ["/x", "/next"]
