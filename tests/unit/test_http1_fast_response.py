"""The fast head reader on response heads, against the checked parser (issue 14).

`Http1Parser(Role.RESPONSE)` reads a response head with the fast reader and keeps it only
when it matched the whole head; every refusal is the checked parser's (status 502 or
what `_framing` words, same message, so the same access-log error and counter upstream).
Differential properties, both paths fed the same bytes in the same pieces, whole keep-alive
streams of responses to one request method (HEAD and CONNECT change the framing):
- generated response heads over the splitting/smuggling-shaped space (status lines with odd
  versions, digits, spacing and reasons; CL+TE, duplicate and list Content-Length, huge
  sizes, obs-fold, whitespace before the colon, bare CR/LF, NUL, 1xx before the final
  response, no-body statuses 204/304, HEAD) give the same events or the same error;
- the same with arbitrary bytes inserted, replaced or removed;
- a corpus of named attacks, each with the verdict it must get.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.unit.test_http1_fast import (
    BODY,
    BYTE_INSERTS,
    CODING,
    EOL,
    FAST,
    LENGTH,
    NAME,
    SEP,
    VALUE,
    VALUE_OWS,
    cut,
    mutated,
    mutations,
    pool,
    same,
)
from waypoint.protocol.http1 import (
    Body,
    EndOfMessage,
    Http1Parser,
    HttpParseError,
    ResponseHead,
    Role,
)

STATUS_LINE = pool(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 304 Not Modified",
        b"HTTP/1.1 100 Continue",
        b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 503 Service Unavailable",
        b"HTTP/1.1 200 ",
        b"HTTP/1.1 200",
        b"HTTP/1.1 999 X",
    ],
    [
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 099 X",
        b"HTTP/1.1 0200 OK",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 200  OK",
        b"HTTP/2 200 OK",
        b"HTTP/1.2 200 OK",
        b"HTTP/1.1x 200 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1 200 O\x00K",
        b"HTTP/1.1 200 O\xffK",
        b"HTTP/1.1 200 O\tK",
        b"ICY 200 OK",
        b"",
    ],
)
FIELD = st.one_of(
    st.tuples(NAME, SEP, VALUE_OWS, VALUE),
    st.tuples(st.sampled_from([b"content-length", b"Content-Length"]), SEP, VALUE_OWS, LENGTH),
    st.tuples(st.sampled_from([b"transfer-encoding"]), SEP, VALUE_OWS, CODING),
    st.tuples(st.sampled_from([b"set-cookie", b"location"]), SEP, VALUE_OWS, VALUE),
    st.tuples(st.sampled_from([b"connection"]), SEP, VALUE_OWS, st.just(b"close")),
)


@st.composite
def response(draw: st.DrawFn) -> bytes:
    fields = [a + b + c + d + c for a, b, c, d in draw(st.lists(FIELD, max_size=5))]
    if draw(pool([b""], [b" folded", b"\tfolded", b" "])) and fields:
        fields.insert(draw(st.integers(1, len(fields))), b" folded")
    lead = draw(pool([b""], [b"\r\n", b"\n", b" "]))
    eol = draw(EOL)
    return eol.join([lead + draw(STATUS_LINE), *fields]) + eol + b"\r\n" + draw(BODY)


METHODS = st.sampled_from(["GET", "GET", "POST", "HEAD", "CONNECT"])


@FAST
@given(
    st.lists(response(), min_size=1, max_size=3),
    st.lists(st.integers(0, 400), max_size=4),
    METHODS,
)
@example([b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-length: 2\r\n\r\nok"] * 3, [], "GET")
@example([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"], [], "POST")
@example([b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"] * 2, [9], "HEAD")
@example([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"], [], "GET")
def test_generated_response_streams_agree(
    messages: list[bytes], cuts: list[int], method: str
) -> None:
    same(cut(b"".join(messages), cuts), method)


BASE = [
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 16:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nx-a: b\r\n\r\n",
]
INSERTS = [*BYTE_INSERTS, b"set-cookie: a=b\r\n", b"content-length: 1\r\n"]
INSERTS += [b"transfer-encoding: chunked\r\n"]


@FAST
@given(
    st.sampled_from(BASE),
    mutations(INSERTS),
    st.booleans(),
    METHODS,
)
def test_mutated_responses_agree(
    base: bytes, edits: list[tuple[int, int, bytes]], twice: bool, method: str
) -> None:
    """Bytes inserted, replaced or removed anywhere in a valid response (then a valid
    response again, for the keep-alive path)."""
    same([mutated(base, edits) + (BASE[0] if twice else b"")], method)


# ---- named attacks -----------------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\n"
ATTACKS: list[tuple[str, str, bytes, int]] = [
    ("CL+TE", "GET", OK + b"content-length: 3\r\ntransfer-encoding: chunked", 502),
    ("TE+CL", "GET", OK + b"transfer-encoding: chunked\r\ncontent-length: 3", 502),
    ("CL differing", "GET", OK + b"content-length: 3\r\ncontent-length: 4", 502),
    ("CL list differing", "GET", OK + b"content-length: 3, 4", 502),
    ("CL plus sign", "GET", OK + b"content-length: +3", 502),
    # U+00A0 / U+0085 beside Content-Length digits: test_http1_fast.CL_OWS (both roles).
    ("CL 20 digits", "GET", OK + b"content-length: 99999999999999999999", 502),
    ("TE not final chunked", "GET", OK + b"transfer-encoding: chunked, x", 502),
    ("TE nbsp", "GET", OK + b"transfer-encoding: chunked\xa0", 502),
    ("obs-fold", "GET", OK + b"x-a: b\r\n c", 502),
    ("obs-fold tab", "GET", OK + b"x-a: b\r\n\tc", 502),
    ("space before colon", "GET", OK + b"content-length : 0", 502),
    ("splitting: bare LF in value", "GET", OK + b"location: /a\nset-cookie: x=1", 502),
    ("splitting: bare CR in value", "GET", OK + b"location: /a\rset-cookie: x=1", 502),
    ("bare LF line end", "GET", b"HTTP/1.1 200 OK\ncontent-length: 0", 502),
    ("bare CR in status line", "GET", b"HTTP/1.1 200 O\rK\r\ncontent-length: 0", 502),
    ("NUL in value", "GET", OK + b"x: a\x00b", 502),
    # RFC 9112 §4: a reason phrase is HTAB / SP / VCHAR / obs-text, like a field value.
    ("NUL in reason", "GET", b"HTTP/1.1 200 O\x00K\r\ncontent-length: 0", 502),
    ("ESC in reason", "GET", b"HTTP/1.1 200 O\x1b[2JK\r\ncontent-length: 0", 502),
    ("DEL in reason", "GET", b"HTTP/1.1 200 O\x7fK\r\ncontent-length: 0", 502),
    # An upstream's unknown coding is a bad gateway (502), not our 501 (RFC 9112 §6.1).
    ("TE gzip, chunked", "GET", OK + b"transfer-encoding: gzip, chunked", 502),
    ("status 2000", "GET", b"HTTP/1.1 2000 OK\r\ncontent-length: 0", 502),
    ("status 099", "GET", b"HTTP/1.1 099 X\r\ncontent-length: 0", 502),
    # RFC 9112 §4: status-code = 3DIGIT; int() reads "0000200" as 200.
    ("status 0000200", "GET", b"HTTP/1.1 0000200 OK\r\ncontent-length: 0", 502),
    ("status 0200", "GET", b"HTTP/1.1 0200\r\ncontent-length: 0", 502),
    ("status 20", "GET", b"HTTP/1.1 20 OK\r\ncontent-length: 0", 502),
    ("HTTP/2 status line", "GET", b"HTTP/2 200 OK\r\ncontent-length: 0", 502),
    ("non-ASCII version", "GET", b"HTTP/1.\xff1 200 OK\r\ncontent-length: 0", 502),
    ("version with a suffix", "GET", b"HTTP/1.1x 200 OK\r\ncontent-length: 0", 502),
    ("101 fields", "GET", OK + b"x: a\r\n" * 101, 502),
    # Accepted, identically:
    ("CL equal twice", "GET", OK + b"content-length: 0\r\ncontent-length: 0", 0),
    ("CL equal list", "GET", OK + b"content-length: 0, 0", 0),
    ("no reason", "GET", b"HTTP/1.1 200\r\ncontent-length: 0", 0),
    ("two spaces before reason", "GET", b"HTTP/1.1 200  OK\r\ncontent-length: 0", 0),
    ("obs-text reason", "GET", b"HTTP/1.1 200 \xe9t\xe9\r\ncontent-length: 0", 0),
    ("HTAB in reason", "GET", b"HTTP/1.1 200 O\tK\r\ncontent-length: 0", 0),
    ("16 interim heads", "POST", b"HTTP/1.1 100 Continue\r\n\r\n" * 16 + OK + b"x: a", 0),
    ("17 interim heads", "POST", b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + OK + b"x: a", 502),
    ("1xx then final", "POST", b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"content-length: 0", 0),
    ("204 with CL+TE", "GET", b"HTTP/1.1 204 No\r\ncontent-length: 3\r\ntransfer-encoding: x", 0),
    ("304 with CL", "GET", b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10", 0),
    ("HEAD with CL", "HEAD", OK + b"content-length: 1024", 0),
    ("CONNECT 200 with CL", "CONNECT", OK + b"content-length: 1024", 0),
    ("HTTP/1.0 until close", "GET", b"HTTP/1.0 200 OK\r\nx: a", 0),
]


@pytest.mark.parametrize(
    ("method", "wire", "status"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
def test_response_attacks_get_the_checked_parsers_verdict(
    method: str, wire: bytes, status: int
) -> None:
    """Refused with the checked parser's status and message, or accepted by both alike (the
    no-body cases with no body event); also split byte by byte."""
    wire += b"\r\n\r\n"
    got = same([wire], method)
    assert same([wire[i : i + 1] for i in range(len(wire))], method) == got
    if status:
        assert isinstance(got, tuple)
        assert got[2] == status
    else:
        assert isinstance(got, list)
        assert isinstance(got[0], ResponseHead)
        if got[0].status in (204, 304) or method in ("HEAD", "CONNECT"):
            assert got[1] == EndOfMessage()


def test_the_fast_reader_reads_the_bench_response_heads() -> None:
    """The upstream's usual response (nginx, Content-Length) and a chunked one are read by
    the fast reader, over keep-alive."""
    p = Http1Parser(Role.RESPONSE)
    raw = BASE[0][: BASE[0].index(b"\r\n\r\n")]
    p.expect_response_to("GET")
    fast = p._fast_response(raw, raw.count(b"\r\n"))
    assert isinstance(fast, ResponseHead)
    assert (fast.status, fast.reason, fast.content_length) == (200, "OK", 5)
    assert fast.headers[0] == ("server", "nginx/1.22.1")
    p = Http1Parser(Role.RESPONSE)
    p.expect_response_to("GET")
    p.feed(BASE[0] + BASE[1])
    assert p.next_event() == fast
    assert p.next_event() == Body(b"hello")
    assert p.next_event() == EndOfMessage()
    second = p.next_event()
    assert isinstance(second, ResponseHead)
    assert second.chunked
    assert Http1Parser(Role.RESPONSE, fast=False)._fast is False


@pytest.mark.parametrize("where", ["name", "value", "reason", "status"])
def test_every_byte_in_every_place_of_a_response_gets_the_checked_parsers_verdict(
    where: str,
) -> None:
    accepted = 0
    for byte in range(256):
        b = bytes([byte])
        wire = {
            "name": OK + b"x" + b + b"y: 1\r\ncontent-length: 0\r\n\r\n",
            "value": OK + b"x: a" + b + b"b\r\ncontent-length: 0\r\n\r\n",
            "reason": b"HTTP/1.1 200 O" + b + b"K\r\ncontent-length: 0\r\n\r\n",
            "status": b"HTTP/1.1 20" + b + b" OK\r\ncontent-length: 0\r\n\r\n",
        }[where]
        accepted += isinstance(same([wire], "GET"), list)
    assert accepted == {"name": 78, "value": 224, "reason": 224, "status": 10}[where]


@pytest.mark.parametrize("fast", [True, False])
def test_a_hostile_60k_response_head_costs_linear_time(fast: bool) -> None:
    """An upstream's malformed status line and a 60 KiB value of spaces: refused in linear
    time (the checked parser's field pattern took ~12 s for it before session 9)."""
    p = Http1Parser(Role.RESPONSE, fast=fast)
    p.expect_response_to("GET")
    p.feed(b"HTTP/1.1  200 OK\r\nx: a" + b" " * 60_000 + b"b\r\n\r\n")
    start = time.process_time()
    with pytest.raises(HttpParseError, match="malformed status line"):
        p.next_event()
    assert time.process_time() - start < 0.25
