"""The fast head reader on request heads, against the checked parser (issue 14).

`Http1Parser(Role.REQUEST)` reads a request head with the fast reader (one pattern for the
request line, one `findall` over the field lines) and keeps it only when it matched the whole
head; anything else is read again by the checked parser (`fast=False`: line by line), whose
refusal it is (same status, same message, so the same access-log error and counter).
Differential properties, both paths fed the same bytes in the same pieces, whole keep-alive
streams:
- generated request heads over the smuggling-shaped space (extension and lower-case methods,
  absolute/authority/asterisk targets, CTLs and obs-text in targets and values, CL+TE,
  duplicate and list Content-Length, `+5`, huge sizes, duplicate Host, obs-fold, whitespace
  before the colon, bare CR/LF, NUL, chunk extensions, versions) give the same events or the
  same error;
- the same with arbitrary bytes inserted, replaced or removed;
- a corpus of named attacks, each with the verdict it must get;
- every byte value in each place of a head (name, value, target, method);
- a hostile 60 KiB head costs what a valid one does (no pattern backtracks quadratically).
Until session 9 the accelerator was llhttp (httptools) under the same discipline
(bench/README.md, "Waypoint, session 5: llhttp", "Session 9: waypoint head path").
"""

from __future__ import annotations

import time
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from waypoint.protocol.http1 import (
    EndOfMessage,
    Http1Parser,
    HttpParseError,
    RequestHead,
    Role,
)

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Outcome = list[object] | tuple[str, str, int]


def outcome(pieces: list[bytes], *, fast: bool, response_to: str | None = None) -> Outcome:
    """Every event of the stream fed in `pieces` then EOF, or the error it ended with: a
    request stream, or with `response_to` a response stream answering that method."""
    p = Http1Parser(Role.REQUEST if response_to is None else Role.RESPONSE, fast=fast)
    if response_to is not None:
        p.expect_response_to(response_to)
    out: list[object] = []
    try:
        for piece in [*pieces, None]:
            if piece is None:
                p.feed_eof()
            else:
                p.feed(piece)
            while (ev := p.next_event()) is not None:
                out.append(ev)
                if piece is None and isinstance(ev, EndOfMessage) and p.idle:
                    return out
    except HttpParseError as err:
        return ("error", str(err), err.status)
    return out


def same(pieces: list[bytes], response_to: str | None = None) -> Outcome:
    """`outcome` through the fast reader, asserted equal to the checked parser's alone."""
    got = outcome(pieces, fast=True, response_to=response_to)
    assert got == outcome(pieces, fast=False, response_to=response_to)
    return got


def mutated(wire: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """`wire` with each edit (where, how, junk) applied in turn: `junk` inserted (how 0), written
    over the bytes there (1), or as many bytes removed (2), `where` taken modulo the length."""
    for where, how, junk in edits:
        at = where % (len(wire) + 1)
        if how == 0:
            wire = wire[:at] + junk + wire[at:]
        elif how == 1:
            wire = wire[:at] + junk + wire[at + len(junk) :]
        else:
            wire = wire[:at] + wire[at + len(junk) :]
    return wire


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for c in points:
        pieces.append(data[last:c])
        last = c
    return [*pieces, data[last:]]


# ---- generated heads ---------------------------------------------------------------------------


# Each part of a head is drawn from a well-formed pool or, about one time in ten, from a hostile
# one, so that most heads reach the fast reader's accept path with a few odd parts in them.
def pool(good: list[bytes], bad: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.sampled_from(good * -(-9 * len(bad) // len(good)) + bad)


METHOD = pool(
    [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"],
    [b"TRACE", b"M-SEARCH", b"PURGE", b"QUERY", b"PRI", b"FOO", b"BREW", b"get", b"G\x00T", b""],
)
TARGET = pool(
    [b"/", b"/1k", b"/a?b=c&d", b"/%00", b"/a#f", b"//x", b"/~!$&'()*+,;=:@", b"http://h/p"],
    [
        b"*",
        b"a.b:80",
        b"/\x7f",
        b"/\xc3\xa9",
        b"/a b",
        b"/a\tb",
        b"",
        b"/a\x00",
        b"/a\x1b",
        b"\xff",
    ],
)
VERSION = pool(
    [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"],
    [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11", b"HTTP/1.10"],
)
NAME = pool(
    [b"x-a", b"X-B", b"accept", b"user-agent", b"!#$%&'*+-.^_`|~09", b"connection", b"expect"],
    [b"x a", b"x\x00", b"\xe9", b"", b"t@g", b"x\x7f", b"a/b", b"Host", b"host"],
)
VALUE = pool(
    [b"a", b"", b"5", b"close", b"keep-alive", b"100-continue", b"a\tb", b"\x80\xff", b"\ta"],
    [b"a\x00b", b"a\x7fb", b"a\x0bb", b"a\rb", b"a\nb", b"a\x1bb", b"a\x0cb"],
)
VALUE_OWS = pool([b"", b"", b" ", b"\t", b" \t "], [b"\x0b", b"\xa0"])
LENGTH = pool(
    [b"0", b"5", b"11", b"5, 5", b"5,5", b"0, 0"],
    [b"5,6", b"+5", b"-1", b"0x5", b"\xb2", b"99999999999999999999", b"18446744073709551616"],
)
CODING = pool(
    [b"chunked", b"Chunked", b"CHUNKED"],
    [b"gzip, chunked", b"chunked, identity", b"identity", b"chunked, chunked", b"chunked\xa0"],
)
SEP = pool([b": ", b":", b":\t"], [b" : ", b"\t:", b"::", b""])
EOL = pool([b"\r\n"], [b"\n", b"\r", b"\r\r\n", b"\n\r"])
BODY = pool(
    [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"5;ext=1\r\nhello\r\n0\r\n\r\n", b"\r\n"],
    [b"5 ;e\r\nhello\r\n0\r\n\r\n", b"5 \r\nhello\r\n0\r\n\r\n", b"fffffffffffffffff\r\n"],
)
FIELD = st.one_of(
    st.tuples(NAME, SEP, VALUE_OWS, VALUE),
    st.tuples(st.sampled_from([b"content-length", b"Content-Length"]), SEP, VALUE_OWS, LENGTH),
    st.tuples(st.sampled_from([b"transfer-encoding"]), SEP, VALUE_OWS, CODING),
    st.tuples(st.sampled_from([b"connection"]), SEP, VALUE_OWS, st.just(b"upgrade")),
    st.tuples(st.sampled_from([b"upgrade"]), SEP, VALUE_OWS, st.just(b"websocket")),
)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    fields = [a + b + c + d + c for a, b, c, d in draw(st.lists(FIELD, max_size=5))]
    if draw(pool([b"host"], [b""])):
        fields.insert(draw(st.integers(0, len(fields))), b"host: " + draw(pool([b"a"], [b"a b"])))
    if draw(pool([b""], [b" folded", b"\tfolded", b" "])) and fields:
        fields.insert(draw(st.integers(1, len(fields))), b" folded")
    lead = draw(pool([b""], [b"\r\n", b"\n", b" "]))
    line = b" ".join([draw(METHOD), draw(TARGET), draw(VERSION)])
    eol = draw(EOL)
    return eol.join([lead + line, *fields]) + eol + b"\r\n" + draw(BODY)


@settings(FAST, max_examples=300)
@given(st.lists(request(), min_size=1, max_size=3), st.lists(st.integers(0, 400), max_size=4))
@example([b"GET /1k HTTP/1.1\r\nHost: a\r\nUser-Agent: wrk\r\n\r\n"] * 3, [])
@example([b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello"] * 2, [3, 40])
@example([b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"] * 2, [])
@example([b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: ws\r\n\r\nxyz"], [])
def test_generated_request_streams_agree(messages: list[bytes], cuts: list[int]) -> None:
    same(cut(b"".join(messages), cuts))


BYTE_INSERTS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff", b",", b"0"]
"""Bytes the edits insert in either role (`mutations`), besides random ones."""
INSERTS = [
    *BYTE_INSERTS,
    b"host: b\r\n",
    b"content-length: 1\r\n",
    b"transfer-encoding: chunked\r\n",
]


def mutations(inserts: list[bytes]) -> st.SearchStrategy[list[tuple[int, int, bytes]]]:
    """1-4 edits of a message (`mutated`): at an offset, insert / replace / remove `inserts`
    or 1-3 random bytes."""
    return st.lists(
        st.tuples(
            st.integers(0, 200),
            st.integers(0, 2),
            st.one_of(st.sampled_from(inserts), st.binary(min_size=1, max_size=3)),
        ),
        min_size=1,
        max_size=4,
    )


BASE = [
    b"GET /1k HTTP/1.1\r\nHost: 127.0.93.10\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
    b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 11\r\n\r\nhello world",
    b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
]


@FAST
@given(
    st.sampled_from(BASE),
    mutations(INSERTS),
    st.booleans(),
)
def test_mutated_requests_agree(
    base: bytes, edits: list[tuple[int, int, bytes]], twice: bool
) -> None:
    """Bytes inserted, replaced or removed anywhere in a valid request (then the same request
    again, for the keep-alive path)."""
    same([mutated(base, edits) + (BASE[0] if twice else b"")])


# ---- named attacks -----------------------------------------------------------------------------

H = b"host: a\r\n"
ATTACKS: list[tuple[str, bytes, int]] = [
    ("CL+TE", b"POST / HTTP/1.1\r\n" + H + b"content-length: 3\r\ntransfer-encoding: chunked", 400),
    ("TE+CL", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: chunked\r\ncontent-length: 3", 400),
    ("TE not final chunked", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: chunked, x", 400),
    ("TE gzip, chunked", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: gzip, chunked", 501),
    ("TE chunked twice", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: chunked, chunked", 400),
    ("TE nbsp", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: chunked\xa0", 400),
    ("TE vertical tab", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: \x0bchunked", 400),
    ("CL differing", b"POST / HTTP/1.1\r\n" + H + b"content-length: 3\r\ncontent-length: 4", 400),
    ("CL list differing", b"POST / HTTP/1.1\r\n" + H + b"content-length: 3, 4", 400),
    ("CL plus sign", b"POST / HTTP/1.1\r\n" + H + b"content-length: +3", 400),
    ("CL negative", b"POST / HTTP/1.1\r\n" + H + b"content-length: -1", 400),
    ("CL superscript", b"POST / HTTP/1.1\r\n" + H + b"content-length: \xb2", 400),
    ("CL hex", b"POST / HTTP/1.1\r\n" + H + b"content-length: 0x3", 400),
    # U+00A0 / U+0085 beside Content-Length digits: CL_OWS below (both roles, body on the wire).
    ("CL 20 digits", b"POST / HTTP/1.1\r\n" + H + b"content-length: 99999999999999999999", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"x-a: b\r\n c", 400),
    ("obs-fold tab", b"GET / HTTP/1.1\r\n" + H + b"x-a: b\r\n\tc", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nhost : a", 400),
    ("tab before colon", b"GET / HTTP/1.1\r\nhost\t: a", 400),
    ("bare LF in field", b"GET / HTTP/1.1\r\n" + H + b"x: a\nb: c", 400),
    ("bare CR in field", b"GET / HTTP/1.1\r\n" + H + b"x: a\rb: c", 400),
    ("bare LF line end", b"GET / HTTP/1.1\n" + H + b"x: a", 400),
    ("NUL in value", b"GET / HTTP/1.1\r\n" + H + b"x: a\x00b", 400),
    ("NUL in name", b"GET / HTTP/1.1\r\n" + H + b"x\x00: a", 400),
    ("DEL in value", b"GET / HTTP/1.1\r\n" + H + b"x: a\x7fb", 400),
    ("NUL in target", b"GET /a\x00b HTTP/1.1\r\n" + H.rstrip(), 400),
    ("DEL in target", b"GET /a\x7fb HTTP/1.1\r\n" + H.rstrip(), 400),
    ("non-ASCII target", b"GET /\xc3\xa9 HTTP/1.1\r\n" + H.rstrip(), 400),
    ("two Host lines", b"GET / HTTP/1.1\r\n" + H + b"Host: b", 400),
    ("two equal Host lines", b"GET / HTTP/1.1\r\n" + H + H.rstrip(), 400),
    ("no Host", b"GET / HTTP/1.1\r\nx: a", 400),
    ("lower-case method", b"get / HTTP/1.1\r\n" + H.rstrip(), 400),
    ("double space", b"GET  / HTTP/1.1\r\n" + H.rstrip(), 400),
    ("no version (HTTP/0.9)", b"GET /\r\n" + H.rstrip(), 400),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n" + H.rstrip(), 505),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\n" + H.rstrip(), 505),
    ("bad chunk size", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: chunked\r\n\r\nzz", 400),
    ("chunk size space", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: chunked\r\n\r\n5 ", 400),
    (
        "huge chunk size",
        b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: chunked\r\n\r\nfffffffffffffffff",
        400,
    ),
    ("101 fields", b"GET / HTTP/1.1\r\n" + H + b"x: a\r\n" * 100, 431),
    # Accepted, identically (llhttp on its own refused the first three):
    ("extension method", b"BREW /pot HTTP/1.1\r\n" + H.rstrip(), 0),
    ("CL equal twice", b"POST / HTTP/1.1\r\n" + H + b"content-length: 0\r\ncontent-length: 0", 0),
    ("CL equal list", b"POST / HTTP/1.1\r\n" + H + b"content-length: 0, 0", 0),
    ("chunk extension", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: chunked\r\n\r\n0;e=1", 0),
    ("obs-text value", b"GET / HTTP/1.1\r\n" + H + b"x: \x80\xff", 0),
    ("empty value", b"GET / HTTP/1.1\r\n" + H + b"x:\r\ny: b", 0),
    ("absolute-form", b"GET http://b/c?d HTTP/1.1\r\n" + H.rstrip(), 0),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\n" + H.rstrip(), 0),
    ("authority-form", b"CONNECT a:443 HTTP/1.1\r\n" + H.rstrip(), 0),
    ("HTTP/1.0 without Host", b"GET / HTTP/1.0\r\nx: a", 0),
]


@pytest.mark.parametrize(("wire", "status"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_smuggling_shapes_get_the_checked_parsers_verdict(wire: bytes, status: int) -> None:
    """Refused with the checked parser's status and message, or accepted by both alike; also
    split byte by byte."""
    wire += b"\r\n\r\n"
    got = same([wire])
    assert same([wire[i : i + 1] for i in range(len(wire))]) == got
    if status:
        assert isinstance(got, tuple)
        assert got[2] == status
    else:
        assert isinstance(got, list)
        assert isinstance(got[0], RequestHead)


# RFC 9110 §8.6: Content-Length = 1*DIGIT, a list of equal values is one value; OWS around a list
# member is SP / HTAB (§5.6.1), so U+00A0 / U+0085 are neither trimmed nor digits. Each head is
# followed by its body: a refusal here is the value's, not "connection closed inside a body".
CL_OWS: list[tuple[str, bytes, str]] = [
    ("nbsp after", b"content-length: %d\xa0", "bad Content-Length"),
    ("nbsp before", b"content-length: \xa0%d", "bad Content-Length"),
    ("NEL in list", b"content-length: %d,\x85%d", "conflicting Content-Length"),
    ("NEL in list after SP", b"content-length: %d, \x85%d", "conflicting Content-Length"),
    (
        "nbsp then plain",
        b"content-length: %d\xa0\r\ncontent-length: %d",
        "conflicting Content-Length",
    ),
]
"""Content-Length field lines with U+00A0 / U+0085 beside the digits (``%d``: the body's
length), for both roles."""


class _Side(NamedTuple):
    """A role as a CL_OWS case sees it."""

    start: bytes
    """The start line (and fields before the Content-Length)."""
    body: bytes
    """The body on the wire."""
    response_to: str | None
    """The method a response answers; None for a request."""
    status: int
    """The refusal's status."""


_SIDES = {
    "request": _Side(b"POST / HTTP/1.1\r\nhost: a\r\n", b"hello", None, 400),
    "response": _Side(b"HTTP/1.1 200 OK\r\n", b"abc", "GET", 502),
}


@pytest.mark.parametrize("side", list(_SIDES.values()), ids=list(_SIDES))
@pytest.mark.parametrize(("field", "why"), [c[1:] for c in CL_OWS], ids=[c[0] for c in CL_OWS])
def test_content_length_ows_is_sp_htab_only(field: bytes, why: str, side: _Side) -> None:
    """A Content-Length with U+00A0 or U+0085 beside the digits is refused (400 from a client,
    502 from an upstream) with its body on the wire (str.strip() read each as the body's length
    and took the body as the message's); also split byte by byte."""
    start, body, response_to, status = side
    n = len(body)
    wire = start + field % ((n,) * field.count(b"%d")) + b"\r\n\r\n" + body
    got = same([wire], response_to)
    assert isinstance(got, tuple)
    assert got[2] == status
    assert got[1].startswith(why)
    assert same([wire[i : i + 1] for i in range(len(wire))], response_to) == got


# ---- the fast reader is used, and fails closed -------------------------------------------------


def test_the_fast_reader_reads_the_bench_request() -> None:
    """wrk's request (the bench's) is read by the fast reader, over keep-alive too."""
    raw = BASE[0][: BASE[0].index(b"\r\n\r\n")]
    p = Http1Parser(Role.REQUEST)
    fast = p._fast_request(raw, raw.count(b"\r\n"))
    assert isinstance(fast, RequestHead)
    assert fast.headers == (
        ("host", "127.0.93.10"),
        ("user-agent", "wrk"),
        ("accept", "*/*"),
    )
    p = Http1Parser(Role.REQUEST)
    p.feed(BASE[0] * 2)
    assert [p.next_event(), p.next_event(), p.next_event()] == [fast, EndOfMessage(), fast]
    assert Http1Parser(Role.REQUEST, fast=False)._fast is False


def _with(byte: int, where: str) -> bytes:
    b = bytes([byte])
    return {
        "name": b"GET / HTTP/1.1\r\nhost: a\r\nx" + b + b"y: 1\r\n\r\n",
        "name start": b"GET / HTTP/1.1\r\nhost: a\r\n" + b + b"y: 1\r\n\r\n",
        "value": b"GET / HTTP/1.1\r\nhost: a\r\nx: a" + b + b"b\r\n\r\n",
        "value end": b"GET / HTTP/1.1\r\nhost: a\r\nx: a" + b + b"\r\n\r\n",
        "target": b"GET /a" + b + b"b HTTP/1.1\r\nhost: a\r\n\r\n",
        "method": b"G" + b + b"T / HTTP/1.1\r\nhost: a\r\n\r\n",
        "version": b"GET / HTTP/1." + b + b"\r\nhost: a\r\n\r\n",
    }[where]


@pytest.mark.parametrize(
    "where", ["name", "name start", "value", "value end", "target", "method", "version"]
)
def test_every_byte_in_every_place_gets_the_checked_parsers_verdict(where: str) -> None:
    """All 256 byte values in a field name, a value, the target and the method: the fast
    reader accepts exactly what the checked parser accepts, with the same result (a control
    character, a non-token name byte, a non-ASCII target: the checked parser's refusal)."""
    accepted = 0
    for byte in range(256):
        got = same([_with(byte, where)])
        accepted += isinstance(got, list)
    # What RFC 9110 §5.1/§5.5, RFC 9112 §3 allow there (a sanity bound on the loop).
    # ("name": the 77 token bytes, and ":" which makes "x" the name and "y: 1" the value.)
    assert (
        accepted
        == {
            "name": 78,
            "name start": 77,
            "value": 224,
            "value end": 224,
            "target": 94,
            "method": 51,
            "version": 2,
        }[where]
    )


@pytest.mark.parametrize(
    ("wire", "refused"),
    [
        # The request line refused, so the checked parser reads the fields (which it used to
        # do with a lazy pattern: ~12 s of CPU for this head).
        (b"GET  / HTTP/1.1\r\nhost: a\r\nx: a" + b" " * 60_000 + b"b\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nhost: a\r\nx: a" + b" " * 60_000 + b"b\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nhost: a\r\nx: a" + b" \t" * 30_000 + b"\x01\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nhost: a\r\nx:" + b" " * 60_000 + b"\x01\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nhost: a\r\n" + b"x" * 60_000 + b" : 1\r\n\r\n", True),
    ],
    ids=["bad line, spaced value", "spaced value", "spaced value, CTL", "OWS, CTL", "long name"],
)
@pytest.mark.parametrize("fast", [True, False])
def test_a_hostile_60k_head_costs_linear_time(wire: bytes, refused: bool, fast: bool) -> None:
    p = Http1Parser(Role.REQUEST, fast=fast)
    p.feed(wire)
    start = time.process_time()
    try:
        got: object = p.next_event()
    except HttpParseError as err:
        got = err
    assert isinstance(got, HttpParseError) == refused
    assert time.process_time() - start < 0.25  # ~1 ms; the quadratic pattern took ~12 s
