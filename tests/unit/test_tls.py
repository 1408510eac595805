"""mTLS contexts and peer verification (meshcore.tls), with real handshakes over 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import ssl
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshcore.ca import MeshCA
from meshcore.certs import WorkloadCertificate
from meshcore.errors import CertificateError, PeerVerificationError
from meshcore.identity import SpiffeId
from meshcore.tls import ContextCache, client_context, server_context, verify_peer
from tests.unit.certfixtures import (
    TD,
    PeerChecks,
    handshake,
    key_pem,
    pem,
    real_now,
    sid,
    uri,
    write_plugin_ca,
)

ALICE = sid("apps", "alice")  # server (destination) in most tests
BOB = sid("apps", "bob")  # client (source)


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.create_root(now=real_now() - timedelta(days=10))


@pytest.fixture(scope="module")
def alice(ca: MeshCA) -> WorkloadCertificate:
    return ca.issue(ALICE, now=real_now())


@pytest.fixture(scope="module")
def bob(ca: MeshCA) -> WorkloadCertificate:
    return ca.issue(BOB, now=real_now())


def _is_handshake_failure(error: BaseException | None) -> bool:
    return isinstance(error, ssl.SSLError | ConnectionError | socket.timeout)


# --------------------------------------------------------------------------- contexts


def test_context_settings(alice: WorkloadCertificate) -> None:
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    server = server_context(alice)
    client = client_context(alice)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_TICKET
        assert not ctx.check_hostname
        # only the mesh root is trusted, never the system store
        assert [c["subject"] for c in ctx.get_ca_certs()] == [
            ((("organizationName", TD),), (("commonName", "ambient-mesh root CA"),))
        ]
    assert server.num_tickets == 0
    # the temporary key file is gone
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not [n for n in after - before if n.startswith("mesh-key-")]


def test_key_file_directory_is_fresh_private_and_removed_even_on_error(
    alice: WorkloadCertificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_load_identity`'s directory (no `tempfile` in a worker): fresh, 0700, gone afterwards,
    also when OpenSSL refuses the key."""
    made: list[tuple[str, int]] = []
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        made.append((path, os.stat(path).st_mode & 0o777))

    monkeypatch.setattr(os, "mkdir", mkdir)
    server_context(alice)
    bad = dataclasses.replace(
        alice, key_pem=b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(CertificateError):
        server_context(bad)
    assert len(made) == 2
    assert len({path for path, _ in made}) == 2
    assert {mode for _, mode in made} == {0o700}
    assert [path for path, _ in made if os.path.exists(path)] == []


def test_key_file_removal_error_neither_hides_the_load_error_nor_keeps_the_directory(
    alice: WorkloadCertificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unlink failing with an OSError other than "no such file" (EACCES, EIO...): the
    CertificateError still surfaces and the directory is still removed."""
    made: list[str] = []
    real_mkdir, real_unlink = os.mkdir, os.unlink

    def mkdir(path: str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        made.append(path)

    def unlink(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            real_unlink(path)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "unlink", unlink)
    bad = dataclasses.replace(
        alice, key_pem=b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(CertificateError):
        server_context(bad)
    assert len(made) == 1
    assert not os.path.exists(made[0])


def test_handshake_both_sides_learn_peer_identity(
    alice: WorkloadCertificate, bob: WorkloadCertificate
) -> None:
    result = handshake(
        server_context(alice),
        client_context(bob),
        PeerChecks(client_expected=[ALICE, sid("apps", "carol")]),
    )
    assert result.server_error is None
    assert result.client_error is None
    assert result.server_peer == BOB
    assert result.client_peer == ALICE
    assert result.client_received == b"ok"


def test_handshake_details_tls13_h2_no_ticket(
    alice: WorkloadCertificate, bob: WorkloadCertificate
) -> None:
    """Inspect the client socket directly: TLS 1.3, h2, a GCM suite, no resumption ticket."""
    server_ctx = server_context(alice)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            conn, _ = listener.accept()
            conn.settimeout(10)
            client = client_context(bob).wrap_socket(
                raw, server_hostname=None, do_handshake_on_connect=False
            )
            server = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            client.setblocking(False)
            server.setblocking(False)
            done = {"c": False, "s": False}
            for _ in range(1000):
                for name, sock in (("c", client), ("s", server)):
                    if not done[name]:
                        try:
                            sock.do_handshake()
                            done[name] = True
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                            pass
                if all(done.values()):
                    break
            assert all(done.values())
            assert client.version() == "TLSv1.3"
            assert client.selected_alpn_protocol() == "h2"
            cipher = client.cipher()
            assert cipher is not None
            assert cipher[0] == "TLS_AES_256_GCM_SHA384"
            server.sendall(b"x")  # tickets (if any) would be sent before application data
            client.setblocking(True)
            client.settimeout(10)
            assert client.recv(1) == b"x"
            session = client.session
            assert session is None or not session.has_ticket
            assert verify_peer(server, trust_domain=TD, expected=None) == BOB
            client.close()
            server.close()


def test_intermediate_chain_handshake(tmp_path: Path, bob: WorkloadCertificate) -> None:
    write_plugin_ca(tmp_path, now=real_now())
    plugin = MeshCA.load_or_create(tmp_path)
    server_cert = plugin.issue(ALICE, now=real_now())
    assert len(server_cert.chain_pem) == 3
    client_cert = plugin.issue(BOB, now=real_now())
    result = handshake(server_context(server_cert), client_context(client_cert))
    assert (result.server_peer, result.client_peer) == (BOB, ALICE)


def test_root_rollover_bundle(ca: MeshCA, alice: WorkloadCertificate) -> None:
    """A server trusting old+new roots accepts clients from either CA. Both roots have the
    same subject name (as Istio roots do); OpenSSL tells them apart by AKI/SKI."""
    new = MeshCA.create_root(now=real_now() - timedelta(days=1))
    new.add_trusted_root(ca.roots_pem)
    client_cert = new.issue(BOB, now=real_now())
    server_cert = WorkloadCertificate.from_chain(
        ALICE, alice.key_pem, alice.chain_pem, new.roots_pem
    )
    result = handshake(server_context(server_cert), client_context(client_cert))
    assert result.server_error is None
    assert result.server_peer == BOB
    # the client trusts both roots too (new.roots_pem holds both), so it accepts the old-CA server
    assert result.client_peer == ALICE


def test_asyncio_handshake_without_sni(
    alice: WorkloadCertificate, bob: WorkloadCertificate
) -> None:
    async def main() -> None:
        server_ctx = server_context(alice)
        sni: list[str | None] = []
        server_ctx.sni_callback = lambda sslobj, name, ctx: sni.append(name)
        seen: asyncio.Future[SpiffeId] = asyncio.get_running_loop().create_future()

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            obj = writer.get_extra_info("ssl_object")
            seen.set_result(verify_peer(obj, trust_domain=TD, expected=None))
            writer.write(b"ok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(bob), server_hostname=""
        )
        peer = verify_peer(writer.get_extra_info("ssl_object"), trust_domain=TD, expected=[ALICE])
        assert peer == ALICE
        assert await reader.read(2) == b"ok"
        assert await asyncio.wait_for(seen, 5) == BOB
        assert sni == [None]
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


# --------------------------------------------------------------------------- refusals


def test_client_cert_from_other_ca_refused(ca: MeshCA, alice: WorkloadCertificate) -> None:
    other = MeshCA.create_root(now=real_now() - timedelta(days=1))
    issued = other.issue(BOB, now=real_now())
    # The stranger trusts our root too, so only the server's check of the client chain can fail.
    stranger = WorkloadCertificate.from_chain(
        BOB, issued.key_pem, issued.chain_pem, other.roots_pem + ca.roots_pem
    )
    result = handshake(
        server_context(alice), client_context(stranger), PeerChecks(client_verifies=False)
    )
    assert _is_handshake_failure(result.server_error)
    assert "certificate verify failed" in str(result.server_error)
    assert result.server_peer is None
    assert result.client_received == b""  # no application data ever reached the client


def test_server_cert_from_other_ca_refused(bob: WorkloadCertificate) -> None:
    stranger = MeshCA.create_root(now=real_now() - timedelta(days=1)).issue(ALICE, now=real_now())
    result = handshake(server_context(stranger), client_context(bob))
    assert _is_handshake_failure(result.client_error)
    assert "certificate verify failed" in str(result.client_error)
    assert result.client_peer is None


def test_other_trust_domain_refused_by_verify_peer(ca: MeshCA, alice: WorkloadCertificate) -> None:
    other = MeshCA.create_root(trust_domain="other.example", now=real_now() - timedelta(days=1))
    issued = other.issue(sid("apps", "bob", td="other.example"), now=real_now())
    foreign = WorkloadCertificate.from_chain(
        issued.identity, issued.key_pem, issued.chain_pem, other.roots_pem + ca.roots_pem
    )
    # The server trusts both roots, so the chain verifies; the trust-domain rule must refuse it.
    server_cert = WorkloadCertificate.from_chain(
        ALICE, alice.key_pem, alice.chain_pem, ca.roots_pem + other.roots_pem
    )
    result = handshake(
        server_context(server_cert), client_context(foreign), PeerChecks(client_verifies=False)
    )
    assert isinstance(result.server_error, PeerVerificationError)
    assert "in trust domain 'other.example', expected 'cluster.local'" in str(result.server_error)
    assert result.client_received == b""


def test_expired_client_cert_refused(ca: MeshCA, alice: WorkloadCertificate) -> None:
    expired = ca.issue(BOB, now=real_now() - timedelta(days=2), ttl=timedelta(days=1))
    result = handshake(
        server_context(alice), client_context(expired), PeerChecks(client_verifies=False)
    )
    assert _is_handshake_failure(result.server_error)
    assert "certificate has expired" in str(result.server_error)
    assert result.server_peer is None
    assert result.client_received == b""


def test_expired_server_cert_refused(ca: MeshCA, bob: WorkloadCertificate) -> None:
    expired = ca.issue(ALICE, now=real_now() - timedelta(days=2), ttl=timedelta(days=1))
    result = handshake(server_context(expired), client_context(bob))
    assert _is_handshake_failure(result.client_error)
    assert "certificate has expired" in str(result.client_error)


def test_server_san_not_expected_refused(
    alice: WorkloadCertificate, bob: WorkloadCertificate
) -> None:
    carol = sid("apps", "carol")
    result = handshake(
        server_context(alice), client_context(bob), PeerChecks(client_expected=[carol])
    )
    assert isinstance(result.client_error, PeerVerificationError)
    assert str(result.client_error) == (f"peer {ALICE} is not an expected identity ({carol})")
    assert result.client_peer is None


def test_client_san_not_expected_refused(
    alice: WorkloadCertificate, bob: WorkloadCertificate
) -> None:
    result = handshake(server_context(alice), client_context(bob), PeerChecks(server_expected=[]))
    assert isinstance(result.server_error, PeerVerificationError)
    assert "not an expected identity (<none>)" in str(result.server_error)


def test_tls12_client_refused(alice: WorkloadCertificate, bob: WorkloadCertificate) -> None:
    legacy = client_context(bob)
    legacy.minimum_version = ssl.TLSVersion.TLSv1_2
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(server_context(alice), legacy)
    assert _is_handshake_failure(result.server_error)
    assert _is_handshake_failure(result.client_error)
    assert result.server_peer is None
    assert result.client_peer is None


def test_verify_peer_refuses_tls12(alice: WorkloadCertificate, bob: WorkloadCertificate) -> None:
    """Even if a context were misconfigured to allow TLS 1.2, verify_peer refuses it."""
    server_ctx = server_context(alice)
    client_ctx = client_context(bob)
    for ctx in (server_ctx, client_ctx):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(server_ctx, client_ctx)
    assert isinstance(result.server_error, PeerVerificationError)
    assert str(result.server_error) == "TLS version is TLSv1.2, HBONE requires TLSv1.3"
    assert isinstance(result.client_error, PeerVerificationError)


@pytest.mark.parametrize("alpn", [["http/1.1"], None])
def test_no_h2_alpn_refused(
    alice: WorkloadCertificate, bob: WorkloadCertificate, alpn: list[str] | None, tmp_path: Path
) -> None:
    client_ctx = client_context(bob)
    if alpn is None:
        # a context that offers no ALPN at all
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.load_verify_locations(cadata=bob.roots_pem.decode())
        (tmp_path / "c.pem").write_bytes(bob.chain_pem[0])
        (tmp_path / "k.pem").write_bytes(bob.key_pem)
        client_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    else:
        client_ctx.set_alpn_protocols(alpn)
    result = handshake(server_context(alice), client_ctx)
    assert isinstance(result.server_error, PeerVerificationError)
    assert str(result.server_error) == "ALPN protocol is None, HBONE requires 'h2'"
    assert isinstance(result.client_error, PeerVerificationError)


def test_client_without_certificate_refused(alice: WorkloadCertificate) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=alice.roots_pem.decode())
    anonymous.set_alpn_protocols(["h2"])
    result = handshake(server_context(alice), anonymous, PeerChecks(client_verifies=False))
    assert _is_handshake_failure(result.server_error)
    assert "certificate" in str(result.server_error).lower()
    assert result.client_received == b""


def _odd_leaf(sans: list[x509.GeneralName]) -> tuple[WorkloadCertificate, bytes]:
    """A leaf (signed by a plug-in intermediate) with arbitrary SANs, bypassing MeshCA rules."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        plugin = write_plugin_ca(Path(d), now=real_now())
    key = ec.generate_private_key(ec.SECP256R1())
    now = real_now()
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(plugin.intermediate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(plugin.intermediate_key, hashes.SHA256())
    )
    roots = pem(plugin.root)
    cert = WorkloadCertificate(
        identity=ALICE,
        key_pem=key_pem(key),
        chain_pem=(pem(leaf), pem(plugin.intermediate), roots),
        not_before=now,
        not_after=now + timedelta(hours=1),
        roots_pem=roots,
        serial=leaf.serial_number,
        presented_pem=(pem(leaf), pem(plugin.intermediate)),
    )
    return cert, roots


@pytest.mark.parametrize(
    ("sans", "message"),
    [
        ([uri(ALICE.uri), uri(BOB.uri)], "exactly one URI SAN, has 2"),
        ([x509.DNSName("alice.example")], "exactly one URI SAN, has 0"),
        ([uri("spiffe://cluster.local/alice")], "not a workload SPIFFE ID"),
    ],
)
def test_peer_san_shape_refused(
    bob: WorkloadCertificate, sans: list[x509.GeneralName], message: str
) -> None:
    server_cert, roots = _odd_leaf(sans)
    client_cert = WorkloadCertificate.from_chain(
        BOB, bob.key_pem, bob.chain_pem, bob.roots_pem + roots
    )
    result = handshake(
        server_context(server_cert), client_context(client_cert), PeerChecks(server_verifies=False)
    )
    assert isinstance(result.client_error, PeerVerificationError)
    assert message in str(result.client_error)


def test_context_cache(ca: MeshCA, alice: WorkloadCertificate) -> None:
    cache = ContextCache()
    s1 = cache.server(alice)
    assert cache.server(alice) is s1
    c1 = cache.client(alice)
    assert c1 is not s1
    assert cache.client(alice) is c1
    assert len(cache) == 2
    rotated = ca.issue(ALICE, now=real_now())
    s2 = cache.server(rotated)
    assert s2 is not s1
    assert len(cache) == 2  # the old server context of alice was evicted
    assert cache.server(rotated) is s2
    bob_cert = ca.issue(BOB, now=real_now())
    cache.client(bob_cert)
    cache.invalidate(ALICE)
    assert len(cache) == 1
    assert cache.server(rotated) is not s2  # rebuilt after invalidation
