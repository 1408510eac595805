"""llhttp (through httptools) reading request heads, against the checked parser (issue 14).

`Http1Parser(Role.REQUEST)` lets llhttp read a request head and keeps it only when it is the
head the checked parser would give; every refusal is the checked parser's (same status, same
message, so the same access-log error and counter). Differential properties, both paths fed
the same bytes in the same pieces, whole keep-alive streams (so llhttp's parser reuse is
covered too):
- generated request heads over the smuggling-shaped space (extension and lower-case methods,
  absolute/authority/asterisk targets, CTLs and obs-text in targets and values, CL+TE,
  duplicate and list Content-Length, `+5`, huge sizes, duplicate Host, obs-fold, whitespace
  before the colon, bare CR/LF, NUL, chunk extensions, versions) give the same events or the
  same error;
- the same with arbitrary bytes inserted, replaced or removed;
- a corpus of named attacks, each with the verdict it must get.
The contract test records where llhttp on its own differs from the checked parser, which is
why its output is re-checked (bench/README.md, "Waypoint, session 5: llhttp").
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from waypoint.protocol import http1
from waypoint.protocol.http1 import (
    EndOfMessage,
    Http1Parser,
    HttpParseError,
    RequestHead,
    Role,
)

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Outcome = list[object] | tuple[str, str, int]


def outcome(pieces: list[bytes], *, llhttp: bool, response_to: str | None = None) -> Outcome:
    """Every event of the stream fed in `pieces` then EOF, or the error it ended with: a
    request stream, or with `response_to` a response stream answering that method."""
    p = Http1Parser(Role.REQUEST if response_to is None else Role.RESPONSE, llhttp=llhttp)
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
    """`outcome` through llhttp, asserted equal to the checked parser's alone."""
    fast = outcome(pieces, llhttp=True, response_to=response_to)
    assert fast == outcome(pieces, llhttp=False, response_to=response_to)
    return fast


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for c in points:
        pieces.append(data[last:c])
        last = c
    return [*pieces, data[last:]]


# ---- generated heads ---------------------------------------------------------------------------


# Each part of a head is drawn from a well-formed pool or, about one time in ten, from a hostile
# one, so that most heads reach llhttp's accept path with a few odd parts in them.
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


INSERTS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff", b",", b"0"]
INSERTS += [b"host: b\r\n", b"content-length: 1\r\n", b"transfer-encoding: chunked\r\n"]

BASE = [
    b"GET /1k HTTP/1.1\r\nHost: 127.0.93.10\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
    b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 11\r\n\r\nhello world",
    b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
]


@FAST
@given(
    st.sampled_from(BASE),
    st.lists(
        st.tuples(
            st.integers(0, 200),
            st.integers(0, 2),
            st.one_of(st.sampled_from(INSERTS), st.binary(min_size=1, max_size=3)),
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_mutated_requests_agree(
    base: bytes, edits: list[tuple[int, int, bytes]], twice: bool
) -> None:
    """Bytes inserted, replaced or removed anywhere in a valid request (then the same request
    again, for the keep-alive path)."""
    wire = base
    for where, how, junk in edits:
        at = where % (len(wire) + 1)
        if how == 0:
            wire = wire[:at] + junk + wire[at:]
        elif how == 1:
            wire = wire[:at] + junk + wire[at + len(junk) :]
        else:
            wire = wire[:at] + wire[at + len(junk) :]
    same([wire + (BASE[0] if twice else b"")])


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
    # Accepted, identically, whatever llhttp thinks of them on its own:
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


# ---- llhttp is used -----------------------------------------------------------------------------


def test_llhttp_reads_the_bench_request_and_is_reused_over_keep_alive() -> None:
    p = Http1Parser(Role.REQUEST)
    p.feed(BASE[0] * 2)
    first = p.next_event()
    ll = p._ll
    assert ll is not None
    assert isinstance(first, RequestHead)
    assert ll.got.complete
    assert ll.got.fields == list(first.headers)
    assert p.next_event() == EndOfMessage()
    assert p.next_event() == first
    assert p._ll is ll  # the same llhttp parser read the second head
    assert p.next_event() == EndOfMessage()
    p.feed(BASE[1])
    assert isinstance(p.next_event(), RequestHead)
    assert p._ll is ll
    p.feed(BASE[0])
    while not isinstance(ev := p.next_event(), RequestHead):
        assert ev is not None
    assert p._ll is not ll  # after a head with a body: a new llhttp parser
    assert Http1Parser(Role.REQUEST, llhttp=False)._llhttp is False
    assert Http1Parser(Role.RESPONSE)._llhttp is True  # responses too (test_http1_llhttp_response)


# ---- what llhttp does on its own (contract) ----------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))


def _llhttp_alone(wire: bytes) -> bool:
    try:
        httptools.HttpRequestParser(_Sink()).feed_data(wire)
    except httptools.HttpParserUpgrade:
        return True
    except httptools.HttpParserError:
        return False
    return True


def test_llhttp_alone_differs_from_the_checked_parser_where_documented() -> None:
    """Where llhttp alone accepts what the checked parser refuses (re-checked on llhttp's
    output: the Host, version, framing and field-count rules, the request line's single
    spaces) and refuses what it accepts (read again by the checked parser: extension
    methods, repeated equal Content-Length). If an httptools upgrade changes this,
    bench/README.md's table needs a look."""
    differ = {}
    for name, wire, _ in ATTACKS:
        wire += b"\r\n\r\n"
        ours = isinstance(outcome([wire], llhttp=False), list)
        if _llhttp_alone(wire) != ours:
            differ[name] = ours
    assert differ == {
        "TE gzip, chunked": False,
        "101 fields": False,
        "HTTP/2.0": False,
        "double space": False,
        "no version (HTTP/0.9)": False,
        "no Host": False,
        "two Host lines": False,
        "two equal Host lines": False,
        "extension method": True,
        "CL equal twice": True,
        "CL equal list": True,
    }


# ---- our checks on llhttp's output, whatever llhttp's tables say -------------------------------


class _PermissiveLlhttp:
    """Stands in for httptools' parser: accepts any head of `method SP target SP version` and
    `name:value` lines, as an llhttp build with looser character tables would. Today's llhttp
    refuses control characters and non-token names itself, so only this shows that
    `Http1Parser`'s own checks (not llhttp's) keep such heads from being accepted."""

    def __init__(self, proto: Any) -> None:
        self._proto = proto
        self._method = b""

    def feed_data(self, data: bytes) -> None:
        head, _, _ = data.partition(b"\r\n\r\n")
        line, *fields = head.split(b"\r\n")
        self._method, target, _ = line.split(b" ", 2)
        self._proto.on_url(target)
        for field in fields:
            name, _, value = field.partition(b":")
            self._proto.on_header(name, value.lstrip(b" \t"))
        self._proto.on_headers_complete()
        self._proto.on_message_complete()

    def get_method(self) -> bytes:
        return self._method


@pytest.fixture
def permissive_llhttp(monkeypatch: pytest.MonkeyPatch) -> None:
    loose = SimpleNamespace(
        HttpRequestParser=_PermissiveLlhttp, HttpParserUpgrade=httptools.HttpParserUpgrade
    )
    monkeypatch.setattr(http1, "_httptools", loose)


@pytest.mark.usefixtures("permissive_llhttp")
@pytest.mark.parametrize(
    "field",
    [b"x: a\x01b", b"x: a\x7fb", b"x: a\x00b", b"x(y): 1", b"x y: 1", b"x\x0by: 1", b"\x01: 1"],
    ids=[
        "SOH in value",
        "DEL in value",
        "NUL in value",
        "( in name",
        "SP in name",
        "VT in name",
        "SOH name",
    ],
)
def test_heads_a_looser_llhttp_accepts_get_the_checked_parsers_verdict(field: bytes) -> None:
    """A control character the field rules refuse (RFC 9110 §5.5) or a field name that is not
    a token (§5.1): refused by the checked parser's words even though "llhttp" accepted it."""
    p = Http1Parser(Role.REQUEST)
    p.feed(b"GET / HTTP/1.1\r\nhost: a\r\n" + field + b"\r\n\r\n")
    with pytest.raises(HttpParseError) as got:
        p.next_event()
    assert got.value.status == 400
    assert same([b"GET / HTTP/1.1\r\nhost: a\r\n" + field + b"\r\n\r\n"])[0] == "error"


@pytest.mark.usefixtures("permissive_llhttp")
def test_the_permissive_stand_in_is_used_for_a_clean_head() -> None:
    p = Http1Parser(Role.REQUEST)
    p.feed(b"GET /a HTTP/1.1\r\nhost: a\r\nx-y: 1\r\n\r\n")
    head = p.next_event()
    assert isinstance(head, RequestHead)
    assert isinstance(p._ll, http1._LlhttpHead)
    assert isinstance(p._ll.parser, _PermissiveLlhttp)
    assert head.headers == (("host", "a"), ("x-y", "1"))
