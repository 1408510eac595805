"""Mutual-TLS contexts for HBONE and verification of the peer's SPIFFE identity.

Owns: building `ssl.SSLContext`s from a `WorkloadCertificate` (server and client side), caching
them per certificate, and `verify_peer`, run right after the handshake and before any data;
`verify_peer_chain` applies the same checks (plus the chain, which OpenSSL's handshake does for
`verify_peer`) for HBONE over QUIC, whose TLS stack (aioquic) does not verify client chains.
Only `verify_peer_chain` imports `cryptography` (with HTTP/3, which needs it anyway): HBONE over
TCP runs on the stdlib `ssl` alone, so a node proxy's worker never loads it.

Invariants (the HBONE wire contract of Istio ambient):
- TLS 1.3 only (RFC 8446), ALPN "h2" (RFC 7301) on both sides, mutual authentication against the
  mesh trust bundle only (never the system store), no session tickets / resumption, no SNI and no
  hostname check on the client: identity is the peer leaf's URI SAN, checked by `verify_peer`.
- Chain and validity-period verification is OpenSSL's (RFC 5280 §6); `verify_peer` adds the
  mesh rules: one URI SAN that is a workload SPIFFE ID, same trust domain, optionally in an
  expected set (the client's list of acceptable server identities).
- Private keys touch the filesystem only for the instant `load_cert_chain` needs a path (the
  stdlib has no in-memory loader): a 0600 file in a fresh 0700 directory, on /dev/shm (tmpfs)
  when available, unlinked before the function returns, even on error.
- Limitation: Python's ssl module cannot restrict the TLS 1.3 cipher suites (no
  SSL_CTX_set_ciphersuites binding), so OpenSSL's defaults apply; the server prefers its own
  order, which puts AES-256-GCM first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from meshcore.certs import WorkloadCertificate
from meshcore.errors import CertificateError, IdentityError, PeerVerificationError
from meshcore.identity import SpiffeId

if TYPE_CHECKING:
    from cryptography import x509

ALPN_H2 = "h2"
Side = Literal["server", "client"]

_SHM = "/dev/shm"


def _secret_dir() -> str | None:
    return _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK | os.X_OK) else None


def _key_dir() -> str:
    """A fresh 0700 directory for a key file, on /dev/shm (tmpfs) when available. Not
    `tempfile.mkdtemp` there: `tempfile` (with `shutil`, `bz2`, `lzma`) would be a
    worker's only user of it (bench/README.md, "Session 8: fewer modules per worker")."""
    if _secret_dir() is None:
        import tempfile  # no usable /dev/shm: tempfile's default directory

        return tempfile.mkdtemp(prefix="mesh-key-")
    for _ in range(100):  # as mkdtemp: a fresh random name, never an existing directory
        path = os.path.join(_SHM, f"mesh-key-{os.urandom(8).hex()}")
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
            return path
    raise FileExistsError(f"no fresh directory name under {_SHM}")


def _load_identity(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    tmpdir = _key_dir()  # mode 0700
    path = os.path.join(tmpdir, "identity.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, cert.key_pem + b"".join(cert.presented_pem))
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)  # key and chain read from the same file
    except ssl.SSLError as e:
        raise CertificateError(f"cannot load certificate for {cert.identity}: {e}") from e
    finally:
        # Any OSError here (not only "never written") must neither replace the exception
        # being raised nor skip the rmdir: the directory is 0700 either way.
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)


class DirectSSLObject(ssl.SSLObject):
    """`ssl.SSLObject` whose `read`, `write` and `pending` are the methods of the underlying
    `_ssl` object itself. The event loop's TLS layer (uvloop's and asyncio's `SSLProtocol`)
    calls `read` and `pending` once per TLS record received and `write` once per write; the
    stdlib's wrappers only forward the same arguments, at the cost of an interpreted frame per
    call (bench/README.md, "Bulk and memory, session 5"). Set as the contexts' `sslobject_class`."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        create = vars(ssl.SSLObject)["_create"].__func__  # the stdlib's, for this class
        obj: DirectSSLObject = create(cls, *args, **kwargs)
        inner = obj.__dict__["_sslobj"]
        obj.__dict__.update(read=inner.read, write=inner.write, pending=inner.pending)
        return obj


def _common(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> ssl.SSLContext:
    ctx.sslobject_class = DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.options |= ssl.OP_NO_TICKET
    try:
        ctx.load_verify_locations(cadata=cert.roots_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as e:
        raise CertificateError(f"invalid trust bundle: {e}") from e
    _load_identity(ctx, cert)
    return ctx


def server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """Server side of HBONE: present `cert`, require a client certificate from the mesh roots."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # RFC 8446 §4.6.1: send no NewSessionTicket, so no resumption
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return _common(ctx, cert)


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """Client side of HBONE: present `cert` (the SOURCE identity), verify the server chain.

    Hostname checking is off: callers pass ``server_hostname=None`` (or ``""`` with asyncio) so
    no SNI is sent, and check the server's SAN with `verify_peer(..., expected=...)`.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _common(ctx, cert)


class ContextCache:
    """SSL contexts per (identity, serial, side, trust bundle), so a context is built once per
    certificate rather than per connection. Storing a context for a new certificate evicts the
    older ones of that identity and side; connections still using them keep their reference."""

    def __init__(self) -> None:
        self._contexts: dict[tuple[SpiffeId, int, Side, bytes], ssl.SSLContext] = {}

    def get(self, cert: WorkloadCertificate, side: Side) -> ssl.SSLContext:
        key = (cert.identity, cert.serial, side, hashlib.sha256(cert.roots_pem).digest())
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = server_context(cert) if side == "server" else client_context(cert)
            for old in [k for k in self._contexts if k[0] == key[0] and k[2] == side]:
                del self._contexts[old]
            self._contexts[key] = ctx
        return ctx

    def server(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        return self.get(cert, "server")

    def client(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        return self.get(cert, "client")

    def invalidate(self, identity: SpiffeId) -> None:
        """Forget every context of `identity` (e.g. the workload left the node)."""
        for k in [k for k in self._contexts if k[0] == identity]:
            del self._contexts[k]

    def __len__(self) -> int:
        return len(self._contexts)


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    *,
    trust_domain: str,
    expected: Collection[SpiffeId] | None,
) -> SpiffeId:
    """The peer's identity after a completed handshake, or PeerVerificationError.

    The chain was verified by OpenSSL against the mesh roots (CERT_REQUIRED); this adds the
    protocol and identity checks. Call before reading or writing any application data.
    """
    version = ssl_object.version()
    if version != "TLSv1.3":
        raise PeerVerificationError(f"TLS version is {version}, HBONE requires TLSv1.3")
    alpn = ssl_object.selected_alpn_protocol()
    if alpn != ALPN_H2:
        raise PeerVerificationError(f"ALPN protocol is {alpn!r}, HBONE requires 'h2'")
    peer = ssl_object.getpeercert()
    if not peer:
        raise PeerVerificationError("peer presented no (verified) certificate")
    sans = peer.get("subjectAltName", ())
    if not isinstance(sans, tuple):
        raise PeerVerificationError("peer certificate subjectAltName is malformed")
    uris = [str(pair[1]) for pair in sans if len(pair) == 2 and pair[0] == "URI"]
    return identity_from_uri_sans(uris, trust_domain=trust_domain, expected=expected)


def identity_from_uri_sans(
    uris: Sequence[str], *, trust_domain: str, expected: Collection[SpiffeId] | None
) -> SpiffeId:
    """The mesh identity rules on a verified peer leaf's URI SANs, shared by HBONE over TLS
    (`verify_peer`) and over QUIC (`verify_peer_chain`): exactly one URI SAN, a workload SPIFFE
    ID, our trust domain, and one of `expected` when given."""
    if len(uris) != 1:
        raise PeerVerificationError(
            f"peer certificate must have exactly one URI SAN, has {len(uris)}"
        )
    try:
        identity = SpiffeId.parse(uris[0])
    except IdentityError as e:
        raise PeerVerificationError(f"peer URI SAN is not a workload SPIFFE ID: {e}") from e
    if identity.trust_domain != trust_domain:
        raise PeerVerificationError(
            f"peer {identity} is in trust domain {identity.trust_domain!r}, expected "
            f"{trust_domain!r}"
        )
    if expected is not None and identity not in expected:
        allowed = ", ".join(sorted(str(e) for e in expected)) or "<none>"
        raise PeerVerificationError(f"peer {identity} is not an expected identity ({allowed})")
    return identity


def _has_usage(cert: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    """OpenSSL's purpose check as the ssl module applies it: an extendedKeyUsage extension, if
    present, must list the usage (RFC 5280 §4.2.1.12); no extension allows every usage."""
    from cryptography import x509

    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage in eku


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerPolicy:
    """Whom `verify_peer_chain` accepts: the peer's role, its trust domain, and (a client's
    view of a server) the identities expected; None accepts any identity of the domain."""

    peer_side: Side
    trust_domain: str
    expected: Collection[SpiffeId] | None = None


def verify_peer_chain(
    leaf_der: bytes | None,
    chain_der: Sequence[bytes],
    policy: PeerPolicy,
    *,
    roots_pem: bytes,
    now: datetime,
) -> SpiffeId:
    """`verify_peer` for TLS stacks that do not verify the peer themselves (aioquic, see
    `meshcore.hbone.h3`): the chain to `roots_pem` by OpenSSL (RFC 5280 §6, validity at `now`),
    the key usage of the peer's role (`policy.peer_side`), then the same identity rules."""
    # pyOpenSSL wraps the same OpenSSL verifier the ssl module uses for HBONE over TCP. Both it
    # and `cryptography` load with HTTP/3 only (aioquic needs them anyway).
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from OpenSSL import crypto

    if leaf_der is None:
        raise PeerVerificationError("peer presented no certificate")
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
        roots = x509.load_pem_x509_certificates(roots_pem)
    except ValueError as e:
        raise PeerVerificationError(f"peer certificate cannot be parsed: {e}") from e
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    store.set_time(now)  # the injected clock (aware UTC); X.509 validity is checked at it
    ctx = crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        [crypto.X509.from_cryptography(c) for c in chain],
    )
    try:
        ctx.verify_certificate()
    except crypto.X509StoreContextError as e:
        raise PeerVerificationError(f"certificate verify failed: {e}") from e
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if policy.peer_side == "server"
        else (ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    if not _has_usage(leaf, usage):
        raise PeerVerificationError(f"peer certificate is not valid for {policy.peer_side} use")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except ValueError as e:
        raise PeerVerificationError(f"peer certificate subjectAltName is malformed: {e}") from e
    return identity_from_uri_sans(uris, trust_domain=policy.trust_domain, expected=policy.expected)
