"""Request hygiene (waypoint.protocol.hygiene) and the HTTP/1.1 codec's refusals (issue 10).

Path normalisation follows Istio's "Authorization Policy Normalization" page (BASE,
MERGE_SLASHES, DECODE_AND_MERGE_SLASHES) and Envoy's path_with_escaped_slashes_action; the
codec edges are the ones reproduced in issue 10 (each refused with a 4xx, never an exception
other than HttpParseError)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.config.pathnorm import EscapedSlashes, PathNormalization, PathPolicy
from waypoint.protocol.http1 import EndOfMessage, Http1Parser, HttpParseError, RequestHead, Role
from waypoint.protocol.hygiene import (
    RequestRejected,
    check_authority,
    check_fields,
    check_method,
    check_target,
    forwardable_trailers,
    normalize_target,
    xfcc_value,
)

BASE = PathPolicy()
MERGE = PathPolicy.parse("MERGE_SLASHES")
DECODE = PathPolicy.parse("DECODE_AND_MERGE_SLASHES")
NONE = PathPolicy.parse("NONE")
REJECT = PathPolicy.parse("BASE", "REJECT_REQUEST")
REDIRECT = PathPolicy.parse("DEFAULT", "UNESCAPE_AND_REDIRECT")


@pytest.mark.parametrize(
    ("policy", "target", "want"),
    [
        # Istio's table: %2d %2e %30-%39 %41-%5a %5f %61-%7a %7e decoded with BASE.
        (BASE, "/%2d%2e%30%39%41%5a%5f%61%7a%7e", "/-.09AZ_az~"),
        (BASE, "/some%2fdata/%61%62%63", "/some%2Fdata/abc"),  # %2f kept (upper-cased hex)
        (DECODE, "/some%2fdata/%61%62%63", "/some/data/abc"),  # Istio's own example
        (BASE, "/%70rivate", "/private"),
        (BASE, "/public/%2e%2e/private", "/private"),
        (BASE, "/public/%2E%2e/private", "/private"),
        (BASE, "/public\\..\\private", "/private"),
        (BASE, "/some\\data", "/some/data"),  # Istio's example
        (BASE, "/public/./data/abc/../xyz", "/public/data/xyz"),  # Istio's example
        (BASE, "/%252e%252e/x", "/%252e%252e/x"),  # once, no double decoding
        (BASE, "/a/b?x=/../%41", "/a/b?x=/../%41"),  # the query is not a path
        (BASE, "/some//data///abc", "/some//data///abc"),
        (MERGE, "/some//data///abc", "/some/data/abc"),  # Istio's example
        (MERGE, "//private", "/private"),
        (DECODE, "/a%2F%2Fb", "/a/b"),
        (DECODE, "/public%5C..%5cprivate", "/private"),
        (NONE, "/a/../%70", "/a/../%70"),
        (BASE, "*", "*"),
        (BASE, "/../../etc", "/etc"),
        (BASE, "/a/b/..", "/a/"),
    ],
)
def test_normalisation(policy: PathPolicy, target: str, want: str) -> None:
    assert normalize_target(target, policy).target == want


@pytest.mark.parametrize(
    ("policy", "target"),
    [
        (BASE, "/a%00b"),  # Istio: "%00 ... always rejected with HTTP code 400"
        (NONE, "/a%00b"),
        (BASE, "/x#frag"),  # RFC 9112 §3.2: no fragment in a request-target
        (BASE, "private"),
        (REJECT, "/a%2Fb"),
        (REJECT, "/a%5cb"),
    ],
)
def test_refused_paths(policy: PathPolicy, target: str) -> None:
    with pytest.raises(RequestRejected) as err:
        normalize_target(target, policy)
    assert err.value.status == 400


def test_escaped_slash_actions() -> None:
    assert normalize_target("/a%2Fb", REDIRECT) == normalize_target("/a/b", BASE).__class__(
        "/a/b", True
    )
    assert not normalize_target("/a/b", REDIRECT).redirect
    assert normalize_target("/a/b", REJECT).target == "/a/b"
    # An explicit action wins over DECODE_AND_MERGE_SLASHES's implied UNESCAPE_AND_FORWARD.
    strict = PathPolicy(
        normalization=PathNormalization.DECODE_AND_MERGE_SLASHES,
        escaped_slashes=EscapedSlashes.REJECT_REQUEST,
    )
    with pytest.raises(RequestRejected):
        normalize_target("/a%2fb", strict)
    with pytest.raises(ValueError, match="not a valid PathNormalization"):
        PathPolicy.parse("MERGE", "")
    with pytest.raises(ValueError, match="not a valid EscapedSlashes"):
        PathPolicy.parse("BASE", "DROP")


def test_request_checks() -> None:
    check_method("DELETE")
    check_method("M-SEARCH")
    for bad in ("delete", "Get", "GET ", "", "G\x00T"):
        with pytest.raises(RequestRejected):
            check_method(bad)
    for good in ("reviews", "reviews:9080", "[fd00::1]:80", "10.0.0.1", ""):
        check_authority(good)
    for bad in ("user@reviews", "a b", "reviews:80/x", "r\x01"):
        with pytest.raises(RequestRejected):
            check_authority(bad)
    check_target("/a?b=c")
    for bad in ("/caf\u00e9", "/a b", "/a\x7f", "/a\tb"):
        with pytest.raises(RequestRejected):
            check_target(bad)
    check_fields([("x", "a\tb"), ("y", "\u00e9")])  # HTAB and obs-text are field-content
    with pytest.raises(RequestRejected) as err:
        check_fields([("x", "a\x01b")])
    assert err.value.status == 400
    with pytest.raises(RequestRejected) as err:
        check_fields([(f"x{i}", "v") for i in range(101)])
    assert err.value.status == 431
    with pytest.raises(RequestRejected) as err:
        check_fields([("x", "a" * 61 * 1024)])
    assert err.value.status == 431


def test_xfcc_and_trailers() -> None:
    assert xfcc_value(by="spiffe://td/ns/a/sa/w", cert_hash="ab", uri="spiffe://td/ns/b/sa/s") == (
        'By=spiffe://td/ns/a/sa/w;Hash=ab;Subject="";URI=spiffe://td/ns/b/sa/s'
    )
    trailers = [
        ("grpc-status", "0"),
        ("content-length", "9"),
        ("host", "x"),
        (":path", "/"),
        ("x-forwarded-client-cert", "By=x"),
        ("authorization", "t"),
        ("x-a", "1"),
    ]
    assert forwardable_trailers(trailers) == (("grpc-status", "0"), ("x-a", "1"))


# ---- the HTTP/1.1 codec ------------------------------------------------------------------------


def parse(data: bytes) -> list[object]:
    p = Http1Parser(Role.REQUEST)
    p.feed(data)
    p.feed_eof()
    out: list[object] = []
    while (ev := p.next_event()) is not None:
        out.append(ev)
        if isinstance(ev, EndOfMessage):
            break
    return out


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"delete /x HTTP/1.1\r\nhost: a\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nHost: a\r\n\r\n", 400),
        ("POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: \u00b2\r\n\r\nxx".encode("latin-1"), 400),
        ("GET /caf\u00e9 HTTP/1.1\r\nhost: a\r\n\r\n".encode(), 400),
        (b"GET /a\x01b HTTP/1.1\r\nhost: a\r\n\r\n", 400),
        (b"GET /a\x7fb HTTP/1.1\r\nhost: a\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nx-a: a\x01b\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nx-a: a\x7f\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nx-a: a\x1bb\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nhost: a\r\n" + b"x: v\r\n" * 100 + b"\r\n", 431),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nx: " + b"a" * 61 * 1024 + b"\r\n\r\n", 431),
        (b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\xa0\r\n\r\n0\r\n\r\n", 400),
        (
            b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2 \r\nxx\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
            b" 2\r\nxx\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n"
            + b"x: v\r\n" * 101
            + b"\r\n",
            431,
        ),
        (
            b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
            b"0\r\nx: \x01\r\n\r\n",
            400,
        ),
    ],
)
def test_codec_refusals(raw: bytes, status: int) -> None:
    with pytest.raises(HttpParseError) as err:
        parse(raw)
    assert err.value.status == status


def test_codec_accepts_what_is_valid() -> None:
    evs = parse(
        b"POST /x HTTP/1.1\r\nhost: a\r\nx-a: a\tb\xe9\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2 ;ext=1\r\nxx\r\n0\r\n\r\n"
    )
    head = evs[0]
    assert isinstance(head, RequestHead)
    assert ("x-a", "a\tb\u00e9") in head.headers  # HTAB and obs-text are field-content
    assert isinstance(evs[-1], EndOfMessage)
    head2 = parse(b"GET /x HTTP/1.1\r\nhost: a\r\n" + b"x: v\r\n" * 99 + b"\r\n")[0]
    assert isinstance(head2, RequestHead)
    assert len(head2.headers) == 100


def test_waypoint_flags_carry_the_mesh_path_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from waypoint.app import parse_args

    base = ["--mesh-config", "mesh.yaml", "--ca-dir", "ca"]
    assert parse_args(base)[0].path_policy == PathPolicy()
    settings, _ = parse_args(
        [
            *base,
            "--path-normalization",
            "merge_slashes",
            "--escaped-slashes-action",
            "REJECT_REQUEST",
        ]
    )
    assert settings.path_policy == PathPolicy(
        normalization=PathNormalization.MERGE_SLASHES,
        escaped_slashes=EscapedSlashes.REJECT_REQUEST,
    )
    monkeypatch.setenv("PATH_NORMALIZATION", "DECODE_AND_MERGE_SLASHES")
    assert parse_args(base)[0].path_policy.slashes_action is EscapedSlashes.UNESCAPE_AND_FORWARD
    with pytest.raises(SystemExit):
        parse_args([*base, "--path-normalization", "SOMETIMES"])


_PATH_ALPHABET = st.sampled_from(
    [
        "/",
        "//",
        ".",
        "..",
        "\\",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "%5C",
        "%41",
        "%7e",
        "%25",
        "%00",
        "%zz",
        "a",
        "b",
        "?",
        "~",
        "-",
        ";",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_PATH_ALPHABET, max_size=16).map(lambda parts: "/" + "".join(parts)),
    st.sampled_from([BASE, MERGE, DECODE]),
)
def test_normalised_paths_are_canonical(target: str, policy: PathPolicy) -> None:
    """What policy and the app see has no dot segment, backslash or escaped unreserved
    character left, merged slashes when asked, and normalising again changes nothing."""
    try:
        out = normalize_target(target, policy)
    except RequestRejected:
        assert "%00" in target.split("?", 1)[0]
        return
    path = out.target.split("?", 1)[0]
    segments = path.split("/")
    assert "." not in segments
    assert ".." not in segments
    assert "\\" not in path
    assert not re.search(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])", path)
    if policy.merge_slashes:
        assert "//" not in path
    if policy is DECODE:
        assert not re.search(r"%(2[fF]|5[cC])", path)
    assert normalize_target(out.target, policy) == out
    assert out.target.split("?", 1)[1:] == target.split("?", 1)[1:]  # the query as sent
