"""Helpers for the identity-layer tests: throwaway CAs, hand-made CSRs, loopback TLS handshakes.

Everything is real: real keys, real certificates, real TLS over 127.0.0.1 sockets.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshcore.identity import SpiffeId
from meshcore.tls import verify_peer

# Fixed instant for pure tests (whole seconds: X.509 times have no sub-second part).
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
TD = "cluster.local"


def sid(ns: str = "default", sa: str = "default", td: str = TD) -> SpiffeId:
    return SpiffeId(trust_domain=td, namespace=ns, service_account=sa)


def real_now() -> datetime:
    """Wall-clock now truncated to seconds (for certificates used in real handshakes)."""
    return datetime.now(UTC).replace(microsecond=0)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(
    key: object,
    sans: list[x509.GeneralName],
    *,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    """A CSR with exactly the SANs given (possibly none, several, or non-URI ones)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    csr = builder.sign(key, algorithm if algorithm is not None else hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


def _ca_cert(
    *,
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    now: datetime,
    days: int,
) -> x509.Certificate:
    """A CA certificate signed by `issuer` (certificate, key); None: self-signed."""
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    issuer_ski = (
        ski
        if issuer_cert is None
        else x509.SubjectKeyIdentifier.from_public_key(issuer_key.public_key())
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer_cert is None else issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginCA:
    root: x509.Certificate
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey


def write_plugin_ca(directory: Path, *, now: datetime, intermediate_days: int = 365) -> PluginCA:
    """Write Istio plug-in CA files: a root and an intermediate signed by it.

    cert-chain.pem is intermediate + root, like Istio's tools/certs Makefile produces.
    """
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert(subject="test root", key=root_key, issuer=None, now=now, days=3650)
    int_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca_cert(
        subject="test intermediate",
        key=int_key,
        issuer=(root, root_key),
        now=now,
        days=intermediate_days,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "root-cert.pem").write_bytes(pem(root))
    (directory / "ca-cert.pem").write_bytes(pem(inter))
    (directory / "ca-key.pem").write_bytes(key_pem(int_key))
    (directory / "cert-chain.pem").write_bytes(pem(inter) + pem(root))
    return PluginCA(root=root, intermediate=inter, intermediate_key=int_key)


# --------------------------------------------------------------------------- loopback TLS


@dataclass(slots=True)
class Handshake:
    """What each side saw. `*_peer` is set when the handshake and verify_peer succeeded."""

    server_peer: SpiffeId | None = None
    server_error: BaseException | None = None
    client_peer: SpiffeId | None = None
    client_error: BaseException | None = None
    client_received: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerChecks:
    """Which side of a `handshake` runs verify_peer, expecting which identities (None: any of
    the trust domain)."""

    server_verifies: bool = True
    client_verifies: bool = True
    server_expected: list[SpiffeId] | None = None
    client_expected: list[SpiffeId] | None = None


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    checks: PeerChecks | None = None,
    *,
    trust_domain: str = TD,
) -> Handshake:
    """Run one TLS connection over 127.0.0.1 (server in a thread, blocking ssl sockets).

    The server runs verify_peer and, only if it passes, sends b"ok". The client runs
    verify_peer and reads: with TLS 1.3 a server-side refusal of the client certificate only
    shows after the client's handshake returned, as an alert or EOF on the first read.
    """
    checks = checks or PeerChecks()
    result = Handshake()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            result.server_error = e
            return
        conn.settimeout(10)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                if checks.server_verifies:
                    result.server_peer = verify_peer(
                        tls, trust_domain=trust_domain, expected=checks.server_expected
                    )
                tls.sendall(b"ok")
                tls.recv(16)  # wait for the client to finish
        except Exception as e:
            result.server_error = e
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                with client_ctx.wrap_socket(raw, server_hostname=None) as tls:
                    if checks.client_verifies:
                        result.client_peer = verify_peer(
                            tls, trust_domain=trust_domain, expected=checks.client_expected
                        )
                    result.client_received = tls.recv(2)
                    tls.sendall(b"bye")
            except Exception as e:
                result.client_error = e
    finally:
        thread.join(10)
        listener.close()
    assert not thread.is_alive(), "server thread hung"
    return result
