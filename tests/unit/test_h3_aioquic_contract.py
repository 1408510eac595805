"""What `meshcore.hbone.h3` relies on in aioquic (pinned 1.7.2), and the peer checks it adds.

Sans-I/O: two QUIC endpoints exchange real datagrams in memory, with real certificates from a real
mesh CA. Each aioquic behaviour our layer works around is asserted directly on a plain
`QuicConnection`, so an aioquic upgrade that changes it fails here (and the workaround is
revisited); each of our checks is asserted on `H3HboneConnection`.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from aioquic import tls
from aioquic.quic import events as qev
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.cubic import CubicCongestionControl
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshcore.ca import MeshCA
from meshcore.certs import WorkloadCertificate, utcnow
from meshcore.errors import PeerVerificationError
from meshcore.hbone.events import (
    DataReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from meshcore.hbone.h3 import (
    H3_CONNECT_ERROR,
    MAX_RESET,
    MIN_RESET,
    RESET_TOKEN_SIZE,
    STREAM_WINDOW,
    H3HboneConnection,
    H3Settings,
    PeerRefused,
    PeerVerified,
    address_from_server_name,
    client_hello_server_name,
    initial_dcid,
    quic_configuration,
    reset_token,
    server_name_for,
    stateless_reset,
)
from meshcore.hbone.h3cc import CONGESTION_CONTROL, MeshCubic
from meshcore.hbone.streams import Role
from meshcore.identity import SpiffeId
from meshcore.tls import PeerPolicy, Side, verify_peer_chain

TD = "cluster.local"
SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
ECHO = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo")
CLIENT_ADDR = ("127.0.0.1", 40000)
SERVER_ADDR = ("127.0.0.2", 15008)

Endpoint = Any  # QuicConnection or H3HboneConnection


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.create_root(trust_domain=TD)


class Clock:
    def __init__(self) -> None:
        self.now = 1.0


def _send(x: Endpoint, now: float) -> list[bytes]:
    quic = x.quic if isinstance(x, H3HboneConnection) else x
    return [d for d, _ in quic.datagrams_to_send(now)]


def _recv(x: Endpoint, data: bytes, addr: tuple[str, int], now: float) -> list[Any]:
    if isinstance(x, H3HboneConnection):
        return x.receive_datagram(data, addr, now)
    x.receive_datagram(data, addr, now)
    out = []
    while (ev := x.next_event()) is not None:
        out.append(ev)
    return out


def _timers(x: Endpoint, now: float) -> list[Any]:
    if isinstance(x, H3HboneConnection):
        t = x.get_timer()
        return x.handle_timer(now) if t is not None and t <= now else []
    t = x.get_timer()
    if t is not None and t <= now:
        x.handle_timer(now)
    out = []
    while (ev := x.next_event()) is not None:
        out.append(ev)
    return out


def pump(
    client: Endpoint, server: Endpoint, clock: Clock, rounds: int = 60
) -> tuple[list[Any], list[Any]]:
    """Exchange datagrams until quiet; time advances 1 ms a round (aioquic paces sends)."""
    c_events: list[Any] = []
    s_events: list[Any] = []
    for _ in range(rounds):
        clock.now += 0.001
        c_events += _timers(client, clock.now)
        s_events += _timers(server, clock.now)
        moved = False
        for d in _send(client, clock.now):
            s_events += _recv(server, d, CLIENT_ADDR, clock.now)
            moved = True
        for d in _send(server, clock.now):
            c_events += _recv(client, d, SERVER_ADDR, clock.now)
            moved = True
        if not moved and _ > 5:
            break
    return c_events, s_events


def start(
    client: Endpoint, make_server: Callable[[bytes], Endpoint], clock: Clock
) -> tuple[Endpoint, list[Any], list[Any]]:
    """Connect `client`; the server is created from the first Initial's DCID (RFC 9000 §7.3)."""
    if isinstance(client, H3HboneConnection):
        client.connect(SERVER_ADDR, clock.now)
    else:
        client.connect(SERVER_ADDR, now=clock.now)
    first = _send(client, clock.now)
    dcid = initial_dcid(first[0])
    assert dcid is not None
    server = make_server(dcid)
    s_events: list[Any] = []
    for d in first:
        s_events += _recv(server, d, CLIENT_ADDR, clock.now)
    c_events, more = pump(client, server, clock)
    return server, c_events, s_events + more


def ours(
    role: Role,
    cert: WorkloadCertificate,
    *,
    original_dcid: bytes | None = None,
    reset_key: bytes | None = None,
    **kw: Any,
) -> H3HboneConnection:
    settings = H3Settings(
        role=role,
        trust_domain=TD,
        expected=kw.pop("expected", [ECHO] if role is Role.CLIENT else None),
        **kw,
    )
    return H3HboneConnection(
        cert, settings, wall_clock=utcnow(), original_dcid=original_dcid, reset_key=reset_key
    )


def connected(ca: MeshCA, clock: Clock) -> tuple[H3HboneConnection, Endpoint]:
    """Our client (sleep) connected to our server (echo), handshake done."""
    client = ours(Role.CLIENT, ca.issue(SLEEP, now=utcnow()))
    server, _, _ = start(
        client, lambda d: ours(Role.SERVER, ca.issue(ECHO, now=utcnow()), original_dcid=d), clock
    )
    return client, server


def plain_server(cert: WorkloadCertificate) -> Callable[[bytes], QuicConnection]:
    return lambda dcid: QuicConnection(
        configuration=quic_configuration(cert, Role.SERVER),
        original_destination_connection_id=dcid,
    )


def plain_client(cert: WorkloadCertificate | None, alpn: str = "h3", **kw: Any) -> QuicConnection:
    """An aioquic client as a peer might build it: optionally without a certificate."""
    if cert is not None:
        cfg = quic_configuration(cert, Role.CLIENT)
    else:
        cfg = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE)
    cfg.alpn_protocols = [alpn]
    return QuicConnection(configuration=cfg, **kw)


# ---- aioquic behaviours we depend on / work around -------------------------------------------


def test_aioquic_server_requests_client_certificate_only_with_private_flag(ca: MeshCA) -> None:
    clock = Clock()
    client_cert, server_cert = ca.issue(SLEEP, now=utcnow()), ca.issue(ECHO, now=utcnow())
    # Plain aioquic: no CertificateRequest, so the client's certificate never reaches the server.
    server, _, s_events = start(plain_client(client_cert), plain_server(server_cert), clock)
    assert any(isinstance(e, qev.HandshakeCompleted) for e in s_events)
    assert server.tls._peer_certificate is None
    # Ours sets tls.Context._request_client_certificate: the server sees (and checks) it.
    clock = Clock()
    ours_server, _, s_events = start(
        plain_client(client_cert), lambda d: ours(Role.SERVER, server_cert, original_dcid=d), clock
    )
    assert [e.identity for e in s_events if isinstance(e, PeerVerified)] == [SLEEP]
    leaf = ours_server.quic.tls._peer_certificate
    assert leaf is not None
    assert leaf.public_bytes(serialization.Encoding.PEM) == client_cert.chain_pem[0]


def test_client_without_certificate_completes_aioquic_handshake_but_is_refused(
    ca: MeshCA,
) -> None:
    server_cert = ca.issue(ECHO, now=utcnow())
    clock = Clock()
    client = plain_client(None)
    server, c_events, s_events = start(
        client, lambda d: ours(Role.SERVER, server_cert, original_dcid=d), clock
    )
    # aioquic itself continues after the empty Certificate message (RFC 8446 §4.4.2.4 allows it)
    # and reports the handshake complete to the client...
    assert any(isinstance(e, qev.HandshakeCompleted) for e in c_events)
    # ...our server refuses it and closes with CRYPTO_ERROR(bad_certificate = 42).
    refused = [e for e in s_events if isinstance(e, PeerRefused)]
    assert refused
    assert "no certificate" in str(refused[0].error)
    assert server.peer_identity is None
    assert server.h3 is None
    closed = client._close_event  # the CONNECTION_CLOSE received (reported after draining)
    assert closed is not None
    assert closed.error_code == 0x100 + 42


def test_aioquic_never_verifies_client_chain_but_we_do(ca: MeshCA) -> None:
    rogue = MeshCA.create_root(trust_domain=TD)
    rogue_cert = rogue.issue(SLEEP, now=utcnow())
    server_cert = ca.issue(ECHO, now=utcnow())
    # A client certificate from an unknown CA: aioquic's server (asked for it) accepts it...
    clock = Clock()

    class Requesting(QuicConnection):
        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            self.tls._request_client_certificate = True

    def requesting(dcid: bytes) -> QuicConnection:
        return Requesting(
            configuration=quic_configuration(server_cert, Role.SERVER),
            original_destination_connection_id=dcid,
        )

    server, _, s_events = start(plain_client(rogue_cert), requesting, clock)
    assert any(isinstance(e, qev.HandshakeCompleted) for e in s_events)
    assert server.tls._peer_certificate is not None
    # ...ours refuses it before any stream.
    clock = Clock()
    client = plain_client(rogue_cert)
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"\x01\x00", end_stream=False)  # sent with the Finished
    server2, _, s_events = start(
        client, lambda d: ours(Role.SERVER, server_cert, original_dcid=d), clock
    )
    refused = [e for e in s_events if isinstance(e, PeerRefused)]
    assert refused
    assert "certificate verify failed" in str(refused[0].error)
    assert not [e for e in s_events if not isinstance(e, PeerRefused)]
    assert server2.h3 is None


def test_aioquic_client_checks_server_against_host_name_so_we_verify_ourselves(
    ca: MeshCA,
) -> None:
    """With aioquic's own verification a SPIFFE certificate (no DNS/IP SAN) never passes; ours
    runs with it off and checks the expected SPIFFE identity instead."""
    server_cert = ca.issue(ECHO, now=utcnow())
    cfg = quic_configuration(ca.issue(SLEEP, now=utcnow()), Role.CLIENT)
    cfg.verify_mode = ssl.CERT_REQUIRED
    cfg.cadata = ca.roots_pem
    cfg.server_name = "127.0.0.2"
    clock = Clock()
    plain = QuicConnection(configuration=cfg)

    def client_close_reason(_events: list[Any]) -> str:
        return "" if plain._close_event is None else plain._close_event.reason_phrase

    _, c_events, _ = start(
        plain,
        lambda d: ours(Role.SERVER, server_cert, original_dcid=d),
        clock,
    )
    assert not any(isinstance(e, qev.HandshakeCompleted) for e in c_events)
    assert client_close_reason(c_events).startswith("hostname '127.0.0.2' doesn't match")
    # Ours: wrong expected identity is refused, right one accepted.
    for expected, ok in (([SLEEP], False), ([ECHO], True)):
        clock = Clock()
        client = ours(Role.CLIENT, ca.issue(SLEEP, now=utcnow()), expected=expected)
        _, c_events, _ = start(
            client, lambda d: ours(Role.SERVER, server_cert, original_dcid=d), clock
        )
        assert any(isinstance(e, PeerVerified) for e in c_events) is ok
        if not ok:
            (refused,) = [e for e in c_events if isinstance(e, PeerRefused)]
            assert "not an expected identity" in str(refused.error)


def test_no_session_ticket_so_no_resumption_or_0rtt(ca: MeshCA) -> None:
    tickets: list[object] = []
    clock = Clock()
    client = plain_client(ca.issue(SLEEP, now=utcnow()), session_ticket_handler=tickets.append)
    server, _, _ = start(
        client, lambda d: ours(Role.SERVER, ca.issue(ECHO, now=utcnow()), original_dcid=d), clock
    )
    pump(client, server, clock)
    assert server.peer_identity == SLEEP
    assert tickets == []


def test_server_reset_tokens_derive_from_the_key_so_another_process_can_reset(
    ca: MeshCA,
) -> None:
    """aioquic draws its tokens at random; ours are HMAC(key, cid) for every connection ID the
    server issued (transport parameter and NEW_CONNECTION_ID), so a process that holds only the
    key resets the connection, and the client (ours; aioquic's own never looks) ends it."""
    key = bytes(range(32))
    clock = Clock()
    client = ours(Role.CLIENT, ca.issue(SLEEP, now=utcnow()))
    server, _, _ = start(
        client,
        lambda d: ours(Role.SERVER, ca.issue(ECHO, now=utcnow()), original_dcid=d, reset_key=key),
        clock,
    )
    pump(client, server, clock)
    assert client.peer_identity == ECHO
    issued = [client.quic._peer_cid, *client.quic._peer_cid_available]
    assert len(issued) > 1  # NEW_CONNECTION_ID ones too
    for c in issued:
        assert c.stateless_reset_token == reset_token(key, c.cid)
    # The client's next short-header packet reaches a process with no state but the key.
    client.open_connect("echo:8080")
    sent = _send(client, clock.now)
    assert sent
    assert not sent[-1][0] & 0x80
    reset = stateless_reset(key, sent[-1], bytes(MAX_RESET))
    assert reset is not None
    assert MIN_RESET <= len(reset) < len(sent[-1])
    assert reset[0] & 0xC0 == 0x40
    assert client.quic.is_stateless_reset(reset)
    assert not client.quic.is_stateless_reset(stateless_reset(bytes(32), sent[-1], reset) or b"")
    # RFC 9000 §10.3.1: never the token of a connection ID the client has not used.
    unused = client.quic._peer_cid_available[0].stateless_reset_token
    assert not client.quic.is_stateless_reset(reset[:-RESET_TOKEN_SIZE] + unused)
    for data in _send(server, clock.now) or [b""]:
        assert not client.quic.is_stateless_reset(data)
    # A plain aioquic client ignores it: it would wait out the idle timeout.
    plain = plain_client(ca.issue(SLEEP, now=utcnow()))
    server2, _, _ = start(
        plain,
        lambda d: ours(Role.SERVER, ca.issue(ECHO, now=utcnow()), original_dcid=d, reset_key=key),
        clock,
    )
    pump(plain, server2, clock)
    plain.send_ping(1)
    short = _send(plain, clock.now)[-1]
    _recv(plain, stateless_reset(key, short, bytes(MAX_RESET)) or b"", SERVER_ADDR, clock.now)
    assert plain._state.name not in ("CLOSING", "DRAINING", "TERMINATED")
    assert plain._peer_cid.stateless_reset_token == reset_token(key, plain._peer_cid.cid)


@pytest.mark.parametrize(
    "trigger",
    [
        b"",
        b"\xc0" + bytes(60),  # a long header (Initial, Handshake): never answered
        b"\x40" + bytes(MIN_RESET - 1),  # too short to answer with something shorter
    ],
)
def test_no_stateless_reset_for_what_may_not_get_one(trigger: bytes) -> None:
    assert stateless_reset(bytes(32), trigger, bytes(MAX_RESET)) is None


def test_wrong_alpn_is_refused_in_the_handshake(ca: MeshCA) -> None:
    clock = Clock()
    server, c_events, _ = start(
        plain_client(ca.issue(SLEEP, now=utcnow()), alpn="h2"),
        lambda d: ours(Role.SERVER, ca.issue(ECHO, now=utcnow()), original_dcid=d),
        clock,
    )
    assert not any(isinstance(e, qev.HandshakeCompleted) for e in c_events)
    assert server.peer_identity is None
    assert server.h3 is None


def test_aioquic_doubles_windows_and_ours_stay_bounded(ca: MeshCA) -> None:
    """aioquic raises MAX_STREAM_DATA by doubling whenever half is used, whether or not the
    application consumed anything; ours credits only what the application acknowledged."""
    clock = Clock()
    client, server = connected(ca, clock)
    sid = client.open_connect("127.0.0.9:80")
    _, s_events = pump(client, server, clock)
    assert [type(e) for e in s_events] == [RequestReceived]
    server.respond(sid, 200)
    pump(client, server, clock)
    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB
    for i in range(0, len(payload), 256 * 1024):
        client.send_data(sid, payload[i : i + 256 * 1024])
    got = bytearray()
    for _ in range(40):
        _, s_events = pump(client, server, clock)
        got += b"".join(e.data for e in s_events if isinstance(e, DataReceived))
    # Nothing acknowledged: the server held at most one stream window of tunnel bytes.
    assert STREAM_WINDOW // 2 < len(got) <= STREAM_WINDOW
    qs = server.quic._streams[sid]
    assert qs.max_stream_data_local == STREAM_WINDOW
    # Acknowledging lets the rest through, intact.
    server.acknowledge_received_data(sid, len(got))
    for _ in range(200):
        _, s_events = pump(client, server, clock)
        chunk = b"".join(e.data for e in s_events if isinstance(e, DataReceived))
        got += chunk
        server.acknowledge_received_data(sid, len(chunk))
        if len(got) >= len(payload):
            break
    assert bytes(got) == payload
    assert qs.max_stream_data_local <= len(payload) + STREAM_WINDOW + 64 * 1024
    # The same traffic on plain aioquic: the limit ran far ahead of consumption (doubling).
    plain = QuicConnection(
        configuration=quic_configuration(ca.issue(ECHO, now=utcnow()), Role.SERVER),
        original_destination_connection_id=b"\0" * 8,
    )
    stream = plain._get_or_create_stream(0x08, 0)
    stream.receiver.highest_offset = 3 * STREAM_WINDOW // 4

    class Builder:
        def start_frame(self, *a: object, **k: object) -> Any:
            from aioquic._buffer import Buffer

            return Buffer(capacity=64)

    QuicConnection._write_stream_limits(plain, Builder(), None, stream)  # type: ignore[arg-type]
    assert stream.max_stream_data_local == 2 * STREAM_WINDOW


def test_peer_exceeding_our_window_gets_flow_control_error(ca: MeshCA) -> None:
    clock = Clock()
    client, server = connected(ca, clock)
    sid = client.open_connect("127.0.0.9:80")
    pump(client, server, clock)
    server.respond(sid, 200)
    pump(client, server, clock)
    # A hostile client ignores our MAX_STREAM_DATA.
    client.quic._streams[sid].max_stream_data_remote = 1 << 40
    client.quic._remote_max_data = 1 << 40
    for _ in range(3 * STREAM_WINDOW // (256 * 1024)):
        client.send_data(sid, b"x" * 256 * 1024)
    c_events: list[Any] = []
    for _ in range(40):
        ce, _ = pump(client, server, clock)
        c_events += ce
        if server.terminated or server.quic._close_event is not None:
            break
    close = server.quic._close_event
    assert close is not None
    assert close.error_code == 0x3


def test_fin_and_reset_map_to_tunnel_events(ca: MeshCA) -> None:
    clock = Clock()
    client, server = connected(ca, clock)
    a = client.open_connect("127.0.0.9:80")
    b = client.open_connect("127.0.0.9:81", [("baggage", "k=v"), ("traceparent", "00-x")])
    _, s_events = pump(client, server, clock)
    reqs = [e for e in s_events if isinstance(e, RequestReceived)]
    assert [dict(r.headers)[":authority"] for r in reqs] == ["127.0.0.9:80", "127.0.0.9:81"]
    assert dict(reqs[1].headers)["baggage"] == "k=v"
    server.respond(a, 200)
    server.respond(b, 200)
    c_events, _ = pump(client, server, clock)
    assert [e.status for e in c_events if isinstance(e, ResponseReceived)] == [200, 200]
    # Half-close: the client's FIN arrives as StreamEnded; the server can still send.
    client.send_data(a, b"ping")
    client.end_stream(a)
    _, s_events = pump(client, server, clock)
    assert [type(e) for e in s_events] == [DataReceived, StreamEnded]
    server.send_data(a, b"pong", end_stream=True)
    c_events, _ = pump(client, server, clock)
    assert [type(e) for e in c_events] == [DataReceived, StreamEnded]
    assert not client.is_open(a)
    assert not server.is_open(a)
    # TCP RST: RESET_STREAM + STOP_SENDING with H3_CONNECT_ERROR, seen as CONNECT_ERROR (0xa).
    client.reset_stream(b)
    _, s_events = pump(client, server, clock)
    resets = [e for e in s_events if isinstance(e, StreamReset)]
    assert resets
    assert resets[0].stream_id == b
    assert resets[0].error_code == 0xA
    sender = client.quic._streams[b].sender if b in client.quic._streams else None
    assert sender is None or sender._reset_error_code == H3_CONNECT_ERROR
    assert not server.is_open(b)


@pytest.mark.parametrize("status", ["²²²", "2000", "20", "099"])
def test_a_malformed_status_from_a_hostile_server_is_a_refused_tunnel(
    ca: MeshCA, status: str
) -> None:
    """RFC 9114 §4.3.2, RFC 9110 §15: a :status that is not three digits in 100..599 is no
    status (`headerblock.status_code`, HTTP/2's rule): the client sees status 0 and resets its
    side, as for any non-200. Before, "099" was status 99; "²²²" reached `int()` only because
    aioquic refuses it first."""
    clock = Clock()
    client, server = connected(ca, clock)
    a = client.open_connect("127.0.0.9:80")
    pump(client, server, clock)
    assert server.h3 is not None
    server.h3.send_headers(a, [(b":status", status.encode("latin-1"))])
    c_events, _ = pump(client, server, clock)
    # aioquic refuses some itself (no event at all); what it passes on is status 0, not 99.
    assert [e.status for e in c_events if isinstance(e, ResponseReceived)] in ([], [0])


# ---- verify_peer_chain: the same rules as verify_peer -----------------------------------------


def _leaf(cert: WorkloadCertificate) -> bytes:
    return x509.load_pem_x509_certificate(cert.chain_pem[0]).public_bytes(
        serialization.Encoding.DER
    )


def check(
    cert: WorkloadCertificate,
    roots: bytes,
    *,
    expected: list[SpiffeId] | None = None,
    peer_side: Side = "client",
    now: datetime | None = None,
) -> SpiffeId:
    policy = PeerPolicy(peer_side=peer_side, trust_domain=TD, expected=expected)
    return verify_peer_chain(_leaf(cert), [], policy, roots_pem=roots, now=now or utcnow())


def test_verify_peer_chain_rules(ca: MeshCA) -> None:
    good = ca.issue(SLEEP, now=utcnow())
    assert check(good, ca.roots_pem) == SLEEP
    assert check(good, ca.roots_pem, expected=[SLEEP], peer_side="server") == SLEEP
    with pytest.raises(PeerVerificationError, match="not an expected identity"):
        check(good, ca.roots_pem, expected=[ECHO])
    with pytest.raises(PeerVerificationError, match="certificate verify failed"):
        check(good, MeshCA.create_root(trust_domain=TD).roots_pem)
    with pytest.raises(PeerVerificationError, match="expired"):
        check(good, ca.roots_pem, now=utcnow() + timedelta(days=400))
    with pytest.raises(PeerVerificationError, match="no certificate"):
        verify_peer_chain(
            None,
            [],
            PeerPolicy(peer_side="client", trust_domain=TD),
            roots_pem=ca.roots_pem,
            now=utcnow(),
        )
    # Another trust domain, chaining to a root we trust.
    other = MeshCA.create_root(trust_domain="other.local")
    foreign = other.issue(SpiffeId.parse("spiffe://other.local/ns/a/sa/b"), now=utcnow())
    with pytest.raises(PeerVerificationError, match=r"trust domain 'other\.local'"):
        check(foreign, other.roots_pem)
    # A server-only certificate (extendedKeyUsage serverAuth) cannot act as a client.
    key_pem, chain_pem = ca.issue_serving(dns_names=["x.svc"], identity=SLEEP, now=utcnow())
    serving = WorkloadCertificate.from_chain(SLEEP, key_pem, [chain_pem], ca.roots_pem)
    with pytest.raises(PeerVerificationError, match="not valid for client use"):
        check(serving, ca.roots_pem)


def test_stream_events_are_withheld_until_verified(ca: MeshCA) -> None:
    """No event of the HTTP/3 layer precedes PeerVerified, even for data the client sent in the
    same flight as its Finished."""
    clock = Clock()
    client = plain_client(ca.issue(SLEEP, now=utcnow()))
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"\x01\x00", end_stream=False)
    _, _, s_events = start(
        client, lambda d: ours(Role.SERVER, ca.issue(ECHO, now=utcnow()), original_dcid=d), clock
    )
    kinds: list[type[Event]] = [type(e) for e in s_events]
    assert kinds
    assert kinds[0] is PeerVerified


def test_goaway_drains_the_connection(ca: MeshCA) -> None:
    """aioquic's HTTP/3 layer drops a received GOAWAY; ours notes it: no new stream on that
    connection, while the open one finishes; the server closes once it has ended."""
    clock = Clock()
    client, server = connected(ca, clock)
    sid = client.open_connect("127.0.0.9:80")
    pump(client, server, clock)
    server.respond(sid, 200)
    pump(client, server, clock)
    assert client.can_open_stream()
    server.close()
    pump(client, server, clock)
    assert client.h3 is not None
    assert client.h3.goaway_received
    assert not client.can_open_stream()
    assert not server.quic._close_pending  # a stream is open: no CONNECTION_CLOSE yet
    client.send_data(sid, b"last", end_stream=True)
    server.send_data(sid, b"bye", end_stream=True)
    c_events, s_events = pump(client, server, clock)
    assert [type(e) for e in s_events] == [DataReceived, StreamEnded]
    assert [type(e) for e in c_events][:2] == [DataReceived, StreamEnded]
    assert server.quic._close_event is not None or server.quic._close_pending or server.terminated


# ---- the certificate choice by SNI (one node-proxy socket, many identities) ------------------


def test_aioquic_server_has_no_sni_hook_so_we_read_it_from_the_first_initial(ca: MeshCA) -> None:
    """aioquic 1.7.2's server never exposes the client's server name (if it ever does, use it):
    `client_hello_server_name` decrypts the first Initial and reads the ClientHello's SNI."""
    server_tls = tls.Context(is_client=False)
    hooks = [a for a in vars(server_tls) if a.endswith("_cb")]
    assert sorted(hooks) == [
        "alpn_cb",
        "get_session_ticket_cb",
        "new_session_ticket_cb",
        "update_traffic_key_cb",
    ]
    name = server_name_for("10.1.0.7")
    assert name == "0a010007.hbone.invalid"
    assert address_from_server_name(name) == "10.1.0.7"
    assert address_from_server_name(server_name_for("fd00::7")) == "fd00::7"
    for bad in ("echo.default.svc", "zz010007.hbone.invalid", "0a01.hbone.invalid", ""):
        assert address_from_server_name(bad) is None
    clock = Clock()
    client = ours(Role.CLIENT, ca.issue(SLEEP, now=utcnow()), server_name=name)
    client.connect(SERVER_ADDR, clock.now)
    first = _send(client, clock.now)[0]
    assert client_hello_server_name(first) == name
    # No SNI sent (bind capture): None, and so for anything that is not a client's Initial.
    plain = ours(Role.CLIENT, ca.issue(SLEEP, now=utcnow()))
    plain.connect(SERVER_ADDR, clock.now)
    assert client_hello_server_name(_send(plain, clock.now)[0]) is None
    assert client_hello_server_name(b"\xc0" + bytes(1300)) is None
    tampered = bytearray(first)
    tampered[100] ^= 0xFF  # the AEAD tag no longer matches: not decrypted, not trusted
    assert client_hello_server_name(bytes(tampered)) is None


def test_certificate_chosen_by_sni_completes_the_handshake(ca: MeshCA) -> None:
    """The server presents the certificate the SNI named; the client's verification (expected
    identity) passes only for that one."""
    clock = Clock()
    name = server_name_for("10.1.0.7")
    certs = {name: ca.issue(ECHO, now=utcnow())}
    client = ours(Role.CLIENT, ca.issue(SLEEP, now=utcnow()), server_name=name)
    client.connect(SERVER_ADDR, clock.now)
    first = _send(client, clock.now)
    chosen = client_hello_server_name(first[0])
    assert chosen == name
    server = ours(Role.SERVER, certs[chosen], original_dcid=initial_dcid(first[0]))
    s_events: list[Any] = []
    for d in first:
        s_events += server.receive_datagram(d, CLIENT_ADDR, clock.now)
    c_events, more = pump(client, server, clock)
    s_events += more
    assert any(isinstance(e, PeerVerified) and e.identity == ECHO for e in c_events)
    assert any(isinstance(e, PeerVerified) and e.identity == SLEEP for e in s_events)


# ---- congestion control: restart after idle (meshcore.hbone.h3cc) -----------------------------


def _sent(number: int, at: float, size: int = 1200) -> QuicSentPacket:
    return QuicSentPacket(
        epoch=tls.Epoch.ONE_RTT,
        in_flight=True,
        is_ack_eliciting=True,
        is_crypto_packet=False,
        packet_number=number,
        packet_type=QuicPacketType.ONE_RTT,
        sent_time=at,
        sent_bytes=size,
    )


def _busy_for_3s_over_a_2_5s_rtt(cc: Any) -> tuple[int, int]:
    """Packets always in flight over a 2.5 s round trip (a CPU-starved peer): (window grown
    by the ACKs, window after sending on)."""
    for n in range(20):
        cc.on_packet_sent(packet=_sent(n, 1.0 + n * 0.1))
    for n in range(10):  # the first ones acknowledged 2.5 s after they left
        cc.on_packet_acked(now=3.5 + n * 0.1, packet=_sent(n, 1.0 + n * 0.1))
    grown = cc.congestion_window
    cc.on_packet_sent(packet=_sent(20, 4.0))  # 3 s after the last acknowledged one was sent
    return grown, cc.congestion_window


def test_aioquic_cubic_restarts_a_busy_connection_after_2s_without_a_fresh_ack() -> None:
    """aioquic 1.7.2's CUBIC: a packet sent 2 s after the send time of the last acknowledged
    one resets the window to 10 packets, however many are in flight (why `MeshCubic`)."""
    cc = CubicCongestionControl(max_datagram_size=1350)
    grown, after = _busy_for_3s_over_a_2_5s_rtt(cc)
    assert grown > 10 * 1350
    assert after == 10 * 1350
    assert cc.ssthresh is None  # slow start from scratch


def test_our_connections_restart_the_window_only_after_an_idle_period(ca: MeshCA) -> None:
    """Both roles use `MeshCubic`: a busy connection keeps its window whatever the RTT; one
    that had nothing in flight for 2 s restarts from the initial window (RFC 5681 §4.1)."""
    cert = ca.issue(SLEEP, now=utcnow())
    for role in (Role.CLIENT, Role.SERVER):
        assert quic_configuration(cert, role).congestion_control_algorithm == CONGESTION_CONTROL
        dcid = b"\x01" * 8 if role is Role.SERVER else None
        cc = ours(role, cert, original_dcid=dcid).quic._loss._cc
        assert isinstance(cc, MeshCubic)
        grown, after = _busy_for_3s_over_a_2_5s_rtt(cc)
        assert after == grown > 10 * 1350
    idle = MeshCubic(max_datagram_size=1350)
    idle.on_packet_sent(packet=_sent(0, 1.0))
    idle.on_packet_acked(now=1.1, packet=_sent(0, 1.0))
    idle.on_packet_sent(packet=_sent(1, 1.2))
    idle.on_packet_acked(now=1.3, packet=_sent(1, 1.2))
    grown = idle.congestion_window
    assert grown > 10 * 1350
    idle.on_packet_sent(packet=_sent(2, 2.0))  # 0.8 s idle: kept
    assert idle.congestion_window == grown
    idle.on_packet_acked(now=2.1, packet=_sent(2, 2.0))
    idle.on_packet_sent(packet=_sent(3, 4.5))  # nothing in flight for 2.4 s: restart
    assert idle.congestion_window == 10 * 1350
