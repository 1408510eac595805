"""The mesh certificate authority: a root (or Istio plug-in intermediate) that signs workload CSRs.

Owns: creating/persisting/loading the CA key material, the trust bundle (roots, possibly more
than one during a root rollover), validating CSRs and issuing X.509-SVIDs.

Invariants:
- The CA signs only CSRs whose signature verifies, whose key is ECDSA P-256 or RSA >= 2048, and
  which carry exactly one SubjectAltName: a URI that is a workload SPIFFE ID in this CA's trust
  domain (and equal to the caller-authenticated identity when one is given).
- Issued leaves follow the SPIFFE X509-SVID spec (github.com/spiffe/spiffe,
  standards/X509-SVID.md): empty subject with a critical URI SAN (§2, RFC 5280 §4.2.1.6),
  basicConstraints CA:false (§4.1), keyUsage digitalSignature (+keyEncipherment for RSA,
  +keyAgreement for EC) (§4.3), EKU serverAuth+clientAuth (§4.4), plus SKI/AKI.
- A leaf never outlives any certificate above it: notAfter is clamped to the chain's earliest
  notAfter (a path with an expired issuer fails RFC 5280 §6.1.3 anyway). The clamp is done on
  the lifetime before adding it to `now`, so no requested ttl overflows datetime arithmetic.
- Errors: a request the CA refuses is `CertificateError`; the CA unable to sign anything (its
  chain expired) is `SigningUnavailable`, so callers can tell "your CSR" from "our CA".
- notBefore is backdated by `CLOCK_SKEW` (1 minute) so peers whose clocks are slightly behind the
  CA's accept a fresh certificate. The lifetime is therefore ttl + 1 minute.
- Key files are written 0600 in a 0700 directory, atomically (temp file + rename), under an
  flock so two processes starting together create one root, not two halves of two.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcore.certs import (
    WorkloadCertificate,
    load_cert,
    load_private_key,
    public_key_der,
    split_pem_chain,
    uri_sans,
    utcnow,
    verify_chain_links,
)
from meshcore.errors import CertificateError, IdentityError
from meshcore.identity import DEFAULT_TRUST_DOMAIN, SpiffeId, validate_trust_domain

ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"
# Istio's plug-in CA ("cacerts" secret) file names.
PLUGIN_CERT_FILE = "ca-cert.pem"
PLUGIN_KEY_FILE = "ca-key.pem"
PLUGIN_CHAIN_FILE = "cert-chain.pem"
PLUGIN_FILES = (PLUGIN_CERT_FILE, PLUGIN_KEY_FILE, PLUGIN_CHAIN_FILE, ROOT_CERT_FILE)

ROOT_TTL = timedelta(days=3650)
DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
CLOCK_SKEW = timedelta(minutes=1)
MIN_RSA_BITS = 2048
_ALLOWED_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class SigningUnavailable(CertificateError):
    """The CA cannot sign at all (its own chain expired): not the requester's fault."""


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _require_ca(cert: x509.Certificate, what: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CertificateError(f"{what} has no basicConstraints; not a CA certificate") from None
    if not bc.ca:
        raise CertificateError(f"{what} is not a CA certificate (basicConstraints CA:false)")
    with contextlib.suppress(x509.ExtensionNotFound):
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CertificateError(f"{what} keyUsage lacks keyCertSign")


def _spiffe_trust_domains(cert: x509.Certificate) -> set[str]:
    """Trust domains named by spiffe:// URI SANs on a CA certificate (X509-SVID §3)."""
    out = set()
    for uri in uri_sans(cert):
        if uri.startswith("spiffe://"):
            out.add(uri[len("spiffe://") :].split("/", 1)[0])
    return out


def generate_csr(identity: SpiffeId) -> tuple[bytes, bytes]:
    """New ECDSA P-256 key and a SHA-256 CSR with one URI SAN. Returns (key_pem, csr_pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # umask may have narrowed or (for O_TRUNC of a stale file) kept it
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class MeshCA:
    """Signs workload certificates. Build with `load_or_create`, `from_pem` or `create_root`."""

    def __init__(
        self,
        *,
        signing_cert: x509.Certificate,
        signing_key: SigningKey,
        intermediates: list[x509.Certificate],
        root: x509.Certificate,
        trust_domain: str,
    ) -> None:
        """Low level: prefer the factories, which validate the material."""
        self.trust_domain = validate_trust_domain(trust_domain)
        self._signing_cert = signing_cert
        self._signing_key = signing_key
        self._intermediates = intermediates
        self._root = root
        self._roots: list[x509.Certificate] = [root]

    # ---- factories

    @classmethod
    def create_root(
        cls, *, trust_domain: str = DEFAULT_TRUST_DOMAIN, now: datetime | None = None
    ) -> MeshCA:
        """A fresh self-signed ECDSA P-256 root, valid 10 years from `now` (in memory only)."""
        validate_trust_domain(trust_domain)
        now = utcnow() if now is None else now
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "ambient-mesh root CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_TTL)
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
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            # X509-SVID §3: a signing certificate MAY carry the trust domain's SPIFFE ID.
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(
            signing_cert=cert,
            signing_key=key,
            intermediates=[],
            root=cert,
            trust_domain=trust_domain,
        )

    @classmethod
    def from_pem(
        cls,
        *,
        cert_pem: bytes,
        key_pem: bytes,
        chain_pem: bytes = b"",
        root_pem: bytes | None = None,
        trust_domain: str,
    ) -> MeshCA:
        """A CA from PEM material: signing cert + key, chain (may include the signing cert and
        the root, as Istio's cert-chain.pem does) and root(s).

        Without `root_pem` the root is the self-signed last certificate of `chain_pem`, or the
        signing certificate itself when it is self-signed. With several certificates in
        `root_pem`, all are trusted (rollover) and the signing chain must end at one of them.
        """
        validate_trust_domain(trust_domain)
        cert = load_cert(cert_pem)
        key = load_private_key(key_pem)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CertificateError(f"CA key type {type(key).__name__} is not supported (EC/RSA)")
        if public_key_der(key.public_key()) != public_key_der(cert.public_key()):
            raise CertificateError("CA private key does not match the CA certificate")
        _require_ca(cert, "CA certificate")
        chain = [load_cert(p) for p in split_pem_chain(chain_pem)] if chain_pem.strip() else []
        if root_pem is not None:
            roots = [load_cert(p) for p in split_pem_chain(root_pem)]
            if not roots:
                raise CertificateError("root certificate file is empty")
        elif chain and _is_self_signed(chain[-1]):
            roots = [chain[-1]]
        elif _is_self_signed(cert):
            roots = [cert]
        else:
            raise CertificateError(
                "no root given and neither the chain nor the CA certificate ends in a "
                "self-signed root"
            )
        for i, r in enumerate(roots):
            _require_ca(r, f"root certificate #{i}")
        root_ders = {_der(r) for r in roots}
        intermediates = [c for c in chain if _der(c) != _der(cert) and _der(c) not in root_ders]
        for i, c in enumerate(intermediates):
            _require_ca(c, f"intermediate certificate #{i}")
        verify_chain_links([cert, *intermediates], roots)
        top = intermediates[-1] if intermediates else cert
        root = top if _der(top) in root_ders else next(r for r in roots if _issued_by(top, r))
        for c in (cert, *intermediates, root):
            other = _spiffe_trust_domains(c) - {trust_domain}
            if other:
                raise CertificateError(
                    f"CA certificate {c.subject.rfc4514_string()} is for trust domain "
                    f"{sorted(other)[0]!r}, not {trust_domain!r}"
                )
        ca = cls(
            signing_cert=cert,
            signing_key=key,
            intermediates=intermediates,
            root=root,
            trust_domain=trust_domain,
        )
        for r in roots:
            if r is not root:
                ca._roots.append(r)
        return ca

    @classmethod
    def load_or_create(
        cls,
        directory: Path,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        now: datetime | None = None,
    ) -> MeshCA:
        """Load the CA persisted in `directory`, creating a self-signed root on first use.

        Istio plug-in CA files (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem) take
        precedence; otherwise root-cert.pem + root-key.pem; otherwise a new root is created and
        written there (directory 0700, key 0600). A partial set of files is an error, never
        silently replaced.
        """
        validate_trust_domain(trust_domain)
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _dir_lock(directory):
            present = {p.name for p in directory.iterdir()}
            if all(f in present for f in PLUGIN_FILES):
                return cls.from_pem(
                    cert_pem=(directory / PLUGIN_CERT_FILE).read_bytes(),
                    key_pem=(directory / PLUGIN_KEY_FILE).read_bytes(),
                    chain_pem=(directory / PLUGIN_CHAIN_FILE).read_bytes(),
                    root_pem=(directory / ROOT_CERT_FILE).read_bytes(),
                    trust_domain=trust_domain,
                )
            partial_plugin = [f for f in PLUGIN_FILES[:3] if f in present]
            if partial_plugin:
                missing = [f for f in PLUGIN_FILES if f not in present]
                raise CertificateError(
                    f"{directory}: incomplete plug-in CA files, missing {', '.join(missing)}"
                )
            if ROOT_CERT_FILE in present and ROOT_KEY_FILE in present:
                ca = cls.from_pem(
                    cert_pem=(directory / ROOT_CERT_FILE).read_bytes(),
                    key_pem=(directory / ROOT_KEY_FILE).read_bytes(),
                    trust_domain=trust_domain,
                )
                if ca._intermediates or ca._signing_cert is not ca._root:
                    raise CertificateError(f"{directory / ROOT_CERT_FILE} is not self-signed")
                return ca
            if ROOT_CERT_FILE in present or ROOT_KEY_FILE in present:
                have = ROOT_CERT_FILE if ROOT_CERT_FILE in present else ROOT_KEY_FILE
                lack = ROOT_KEY_FILE if have == ROOT_CERT_FILE else ROOT_CERT_FILE
                raise CertificateError(f"{directory}: has {have} but not {lack}")
            ca = cls.create_root(trust_domain=trust_domain, now=now)
            # Key first: a crash between the two writes leaves "key without cert", which is
            # reported above rather than a cert whose key is lost.
            _write_atomic(directory / ROOT_KEY_FILE, _key_pem(ca._signing_key), 0o600)
            _write_atomic(directory / ROOT_CERT_FILE, _pem(ca._root), 0o644)
            return ca

    # ---- trust bundle

    @property
    def roots_pem(self) -> bytes:
        """The trust bundle: every trusted root, the signing chain's root first."""
        return b"".join(_pem(r) for r in self._roots)

    @property
    def root_pem(self) -> bytes:
        """The root of this CA's own signing chain."""
        return _pem(self._root)

    @property
    def signing_cert_pem(self) -> bytes:
        return _pem(self._signing_cert)

    def pem_material(self) -> tuple[bytes, bytes, bytes, bytes]:
        """(signing cert, its key, the intermediates above it, every root): what `from_pem`
        rebuilds this CA from (`meshcore.certhelper` hands a CA to its helper process so)."""
        chain = b"".join(_pem(c) for c in self._intermediates)
        return self.signing_cert_pem, _key_pem(self._signing_key), chain, self.roots_pem

    def add_trusted_root(self, pem: bytes) -> None:
        """Trust additional root(s) (root rollover). Duplicates are ignored."""
        certs = [load_cert(p) for p in split_pem_chain(pem)]
        if not certs:
            raise CertificateError("no certificate in the PEM given to add_trusted_root")
        have = {_der(r) for r in self._roots}
        for c in certs:
            _require_ca(c, "trusted root")
            if _der(c) not in have:
                self._roots.append(c)
                have.add(_der(c))

    # ---- signing

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        now: datetime,
        identity: SpiffeId | None = None,
    ) -> list[bytes]:
        """Validate a CSR and issue a workload leaf. Returns PEMs leaf, intermediates.., root.

        `identity`, when given, is who the caller authenticated as (e.g. the impersonated
        identity the control plane vouched for); the CSR's SAN must equal it.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware (UTC)")
        if ttl <= timedelta(0):
            raise CertificateError(f"ttl must be positive, got {ttl}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            valid = csr.is_signature_valid
            algorithm = csr.signature_hash_algorithm
            public_key = csr.public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise CertificateError(f"invalid CSR: {e}") from e
        if not valid:
            raise CertificateError("CSR signature is invalid")
        if not isinstance(algorithm, _ALLOWED_CSR_HASHES):
            name = algorithm.name if algorithm else "none"
            raise CertificateError(f"CSR signature hash {name} is not allowed (SHA-256 or better)")
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, ec.SECP256R1):
                raise CertificateError(f"CSR EC key curve {public_key.curve.name} is not P-256")
            is_rsa = False
        elif isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < MIN_RSA_BITS:
                raise CertificateError(
                    f"CSR RSA key is {public_key.key_size} bits; at least {MIN_RSA_BITS} required"
                )
            is_rsa = True
        else:
            raise CertificateError(
                f"CSR key type {type(public_key).__name__} is not allowed (ECDSA P-256 or RSA)"
            )
        requested = self._csr_identity(csr)
        if identity is not None and requested != identity:
            raise CertificateError(f"CSR asks for {requested} but the caller is {identity}")

        chain_above = [self._signing_cert, *self._intermediates]
        if self._signing_cert is not self._root:
            chain_above.append(self._root)
        ca_not_after = min(c.not_valid_after_utc for c in chain_above)
        if now >= ca_not_after:
            raise SigningUnavailable(f"CA certificate chain expired at {ca_not_after.isoformat()}")
        not_after = now + min(ttl, ca_not_after - now)  # clamp first: no overflow

        issuer_ski = _subject_key_identifier(self._signing_cert)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._signing_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=is_rsa,
                    data_encipherment=False,
                    key_agreement=not is_rsa,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # RFC 5280 §4.2.1.6: with an empty subject the SAN extension MUST be critical.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(requested.uri)]),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False,
            )
            .sign(self._signing_key, hashes.SHA256())
        )
        return [_pem(leaf), *(_pem(c) for c in chain_above)]

    def issue(
        self, identity: SpiffeId, *, ttl: timedelta = DEFAULT_WORKLOAD_TTL, now: datetime
    ) -> WorkloadCertificate:
        """Generate a key + CSR for `identity` and sign it (static mode and tests)."""
        key_pem, csr_pem = generate_csr(identity)
        chain = self.sign_csr(csr_pem, ttl=ttl, now=now, identity=identity)
        return WorkloadCertificate.from_chain(identity, key_pem, chain, self.roots_pem)

    def issue_serving(
        self,
        *,
        dns_names: list[str],
        identity: SpiffeId,
        now: datetime,
        ttl: timedelta = timedelta(days=30),
    ) -> tuple[bytes, bytes]:
        """(key PEM, chain PEM without the root) of a TLS SERVER certificate for a mesh service
        (the control plane's gRPC endpoint): DNS SANs, which gRPC clients verify, plus the
        service's SPIFFE ID. Workload certificates (exactly one URI SAN) come from `sign_csr`;
        this is the one other kind of certificate the CA issues."""
        if not dns_names:
            raise CertificateError("a serving certificate needs at least one DNS name")
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = now + min(ttl, self._signing_cert.not_valid_after_utc - now)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans.append(x509.UniformResourceIdentifier(identity.uri))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._signing_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._signing_key, hashes.SHA256())
        )
        roots = {r.strip() for r in split_pem_chain(self.roots_pem)}
        above = [p for p in split_pem_chain(self.signing_cert_pem) if p.strip() not in roots]
        return _key_pem(key), b"".join([_pem(cert), *above])

    def _csr_identity(self, csr: x509.CertificateSigningRequest) -> SpiffeId:
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CertificateError("CSR has no subjectAltName extension") from None
        except ValueError as e:  # e.g. duplicate extensions
            raise CertificateError(f"CSR extensions are malformed: {e}") from e
        names = list(san)
        uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
        others = [n for n in names if not isinstance(n, x509.UniformResourceIdentifier)]
        if others:
            kinds = sorted({type(n).__name__ for n in others})
            raise CertificateError(
                f"CSR may only carry one URI SAN; it also has {', '.join(kinds)}"
            )
        if len(uris) != 1:
            raise CertificateError(f"CSR must have exactly one URI SAN, has {len(uris)}")
        try:
            requested = SpiffeId.parse(uris[0])
        except IdentityError as e:
            raise CertificateError(f"CSR URI SAN is not a workload SPIFFE ID: {e}") from e
        if requested.trust_domain != self.trust_domain:
            raise CertificateError(
                f"CSR identity {requested} is not in trust domain {self.trust_domain!r}"
            )
        return requested


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _subject_key_identifier(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # RFC 5280 §4.2.1.2 method (1): SHA-1 of the subjectPublicKey.
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
