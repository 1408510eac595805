"""Fuzz target for the HTTP/1.1 codec (hypothesis; runs briefly in CI).

Properties, for requests AND responses:
- whatever the bytes and however they are split, the parser yields events or raises
  `HttpParseError` with a 4xx/5xx status: never another exception (the issue-10 class:
  ``Content-Length: ²`` raised ValueError, a non-ASCII target gave a 500);
- a valid request, encoded and then parsed in arbitrary pieces, gives back exactly its method,
  target, fields and body (no field or byte invented, dropped or moved);
- a valid request with random bytes inserted is either refused or parsed consistently (one head,
  body bytes never exceeding what was sent).
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import split
from waypoint.protocol.http1 import (
    Body,
    EndOfMessage,
    Http1Parser,
    HttpParseError,
    RequestHead,
    Role,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
methods = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=8)
names = st.text(_TOKEN_CHARS, min_size=1, max_size=12).filter(
    lambda n: n not in ("host", "content-length", "transfer-encoding", "connection")
)
values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=20,
).map(lambda v: v.strip(" \t"))
targets = st.text("abcdefghijklmnopqrstuvwxyz0123456789/-._~%?=&", max_size=30).map(
    lambda t: "/" + t
)
interesting = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b"\t",
        b":",
        b";",
        b"\x00",
        b"\xb2",
        b"\xa0",
        b"0",
        b"f",
        b"chunked",
        b"content-length: ",
        b"transfer-encoding: chunked\r\n",
        b"host: x\r\n",
        b"\r\n\r\n",
        b"HTTP/1.1",
        b"-1",
        b"99999999999999999999",
    ]
)


def parse_or_error(role: Role, pieces: list[bytes]) -> list[object] | HttpParseError:
    """`run_parser`'s events, or the HttpParseError it raised."""
    try:
        return run_parser(role, pieces)
    except HttpParseError as err:
        return err


def run_parser(role: Role, pieces: list[bytes]) -> list[object]:
    """Feed `pieces` one by one, draining events; then EOF. Only HttpParseError may escape."""
    p = Http1Parser(role)
    if role is Role.RESPONSE:
        p.expect_response_to("GET")
    out: list[object] = []
    for piece in [*pieces, None]:
        if piece is None:
            p.feed_eof()
        else:
            p.feed(piece)
        for _ in range(10_000):
            ev = p.next_event()
            if ev is None:
                break
            out.append(ev)
            if isinstance(ev, EndOfMessage) and p.idle and piece is None:
                return out
    return out


@FUZZ
@given(
    st.lists(st.one_of(st.binary(max_size=40), interesting), max_size=30),
    st.sampled_from([Role.REQUEST, Role.RESPONSE]),
    st.sampled_from([b"", b"GET / HTTP/1.1\r\nhost: a\r\n", b"HTTP/1.1 200 OK\r\n"]),
)
@example([b"content-length: \xb2\r\n\r\nxx"], Role.REQUEST, b"POST / HTTP/1.1\r\nhost: a\r\n")
@example([b"content-length: \xb2\r\n\r\nxx"], Role.RESPONSE, b"HTTP/1.1 200 OK\r\n")
def test_arbitrary_bytes_only_ever_raise_http_parse_error(
    parts: list[bytes], role: Role, prefix: bytes
) -> None:
    out = parse_or_error(role, [prefix, *parts])
    if isinstance(out, HttpParseError):
        assert 400 <= out.status <= 599


@FUZZ
@given(
    methods,
    targets,
    st.lists(st.tuples(names, values), max_size=8),
    st.tuples(st.lists(st.binary(min_size=1, max_size=50), max_size=4), st.booleans()),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
)
def test_valid_requests_round_trip_in_any_pieces(
    method: str,
    target: str,
    fields: list[tuple[str, str]],
    payload: tuple[list[bytes], bool],
    cuts: list[int],
) -> None:
    """`payload`: the body's chunks, and whether it is sent chunked (else with a length)."""
    chunks, chunked = payload
    body = b"".join(chunks)
    framing = (
        [("transfer-encoding", "chunked")]
        if chunked
        else ([("content-length", str(len(body)))] if body else [])
    )
    head = encode_request_head(method, target, [("host", "a"), *fields, *framing])
    wire = head + (
        b"".join(encode_chunk(c) for c in chunks) + encode_last_chunk() if chunked else body
    )
    evs = run_parser(Role.REQUEST, split(wire, cuts))
    assert isinstance(evs[0], RequestHead)
    got = evs[0]
    assert (got.method, got.target) == (method, target)
    assert list(got.headers) == [("host", "a"), *fields, *framing]
    assert b"".join(e.data for e in evs if isinstance(e, Body)) == body
    assert isinstance(evs[-1], EndOfMessage)


@FUZZ
@given(
    st.binary(min_size=1, max_size=8),
    st.integers(min_value=0, max_value=10_000),
    st.booleans(),
)
def test_a_valid_request_with_bytes_inserted_is_refused_or_consistent(
    junk: bytes, where: int, chunked: bool
) -> None:
    body = b"hello world"
    if chunked:
        wire = (
            b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
            + encode_chunk(body)
            + encode_last_chunk()
        )
    else:
        wire = b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 11\r\n\r\n" + body
    at = where % (len(wire) + 1)
    mutated = wire[:at] + junk + wire[at:]
    evs = parse_or_error(Role.REQUEST, [mutated])
    if isinstance(evs, HttpParseError):
        assert 400 <= evs.status <= 599
        return
    heads = [e for e in evs if isinstance(e, RequestHead)]
    assert len(heads) <= 2  # junk may complete into a second pipelined message, never more
    for h in heads:
        assert h.method == h.method.upper()
        assert all(0x21 <= ord(c) <= 0x7E for c in h.target)
        assert sum(1 for k, _ in h.headers if k == "host") <= 1
    assert sum(len(e.data) for e in evs if isinstance(e, Body)) <= len(mutated)


field_bytes = st.lists(
    st.one_of(
        st.binary(max_size=12),
        interesting,
        st.sampled_from(
            [b"x-a", b"X-B", b": ", b":", b" \t", b"\x80\xff", b"\x7f", b"\x0b", b"\x01", b"v"]
        ),
    ),
    max_size=8,
).map(b"".join)


@FUZZ
@given(st.lists(field_bytes, max_size=6))
@example([b"x-a: v"])
@example([b"X-B:\t v \t", b"x-a:"])
@example([b"x-a: \x80\xff"])
@example([b" x-a: v"])
@example([b"x a: v"])
@example([b"x-a: v\x7f"])
@example([b"x-a: v\x0b"])
@example([b"x-a: \tv\t w"])
@example([b"x-a: a\nb"])
@example([b"x-a: a\rb", b"x-b: c"])
@example([b"x-a: a\n\rb"])
def test_field_fast_path_agrees_with_the_checked_path(lines: list[bytes]) -> None:
    """Differential (issue 14): the field section's fast path (one regex per line, CTLs checked
    once per section) gives exactly the fields, or exactly the error, of the per-line checks."""

    def run(fn: object) -> object:
        try:
            return fn(lines)  # type: ignore[operator]
        except HttpParseError as err:
            return ("error", str(err), err.status)

    # What `_head` and the trailer reader hand on: lines without a CR LF inside (a trailer
    # line may still hold a bare CR or LF).
    lines = [ln for ln in lines if b"\r\n" not in ln]
    p = Http1Parser(Role.REQUEST)
    assert run(p._fields) == run(p._fields_checked)
