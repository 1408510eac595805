"""The mesh CA (meshcore.ca): persistence, plug-in CA files, CSR validation, issued leaves."""

from __future__ import annotations

import re
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshcore.ca import MeshCA, generate_csr
from meshcore.certs import WorkloadCertificate
from meshcore.errors import CertificateError
from tests.unit.certfixtures import NOW, TD, make_csr, pem, sid, uri, write_plugin_ca

ALICE = sid("apps", "alice")


def certs_of(chain: list[bytes] | tuple[bytes, ...]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p) for p in chain]


def verify_with_policy(
    chain: list[bytes] | tuple[bytes, ...], roots_pem: bytes, when: object
) -> list[x509.Certificate]:
    """RFC 5280 path validation by cryptography's verifier (client profile: EKU clientAuth)."""
    certs = certs_of(chain)
    store = Store(x509.load_pem_x509_certificates(roots_pem))
    verifier = PolicyBuilder().store(store).time(when).build_client_verifier()  # type: ignore[arg-type]
    verified = verifier.verify(certs[0], certs[1:])
    assert [str(s.value) for s in verified.subjects or []] == [ALICE.uri]
    return list(verified.chain)


# --------------------------------------------------------------------------- persistence


def test_load_or_create_persists_root(tmp_path: Path) -> None:
    directory = tmp_path / "ca" / "nested"
    ca = MeshCA.load_or_create(directory, now=NOW)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "root-key.pem").stat().st_mode) == 0o600
    assert (directory / "root-cert.pem").read_bytes() == ca.roots_pem
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]

    again = MeshCA.load_or_create(directory, now=NOW + timedelta(days=3))
    assert again.roots_pem == ca.roots_pem
    assert again.trust_domain == TD
    # The reloaded CA signs with the same key: its leaf verifies against the first root.
    cert = again.issue(ALICE, now=NOW)
    verify_with_policy(cert.chain_pem, ca.roots_pem, NOW)


def test_root_certificate_profile() -> None:
    ca = MeshCA.create_root(trust_domain="example.org", now=NOW)
    root = x509.load_pem_x509_certificate(ca.roots_pem)
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    pub = root.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.curve.name == "secp256r1"
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert root.not_valid_after_utc - NOW == timedelta(days=3650)
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]


def test_load_existing_root_for_other_trust_domain_refused(tmp_path: Path) -> None:
    MeshCA.load_or_create(tmp_path, trust_domain="one.example", now=NOW)
    with pytest.raises(CertificateError, match=r"trust domain 'one\.example', not 'two\.example'"):
        MeshCA.load_or_create(tmp_path, trust_domain="two.example", now=NOW)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["root-cert.pem"], "has root-cert.pem but not root-key.pem"),
        (["root-key.pem"], "has root-key.pem but not root-cert.pem"),
        (["ca-cert.pem", "root-cert.pem"], "incomplete plug-in CA files, missing ca-key.pem"),
    ],
)
def test_partial_files_refused(tmp_path: Path, files: list[str], message: str) -> None:
    src = tmp_path / "src"
    write_plugin_ca(src, now=NOW)
    (src / "root-key.pem").write_bytes((src / "ca-key.pem").read_bytes())
    dst = tmp_path / "dst"
    dst.mkdir()
    for f in files:
        (dst / f).write_bytes((src / f).read_bytes())
    with pytest.raises(CertificateError, match=message):
        MeshCA.load_or_create(dst, now=NOW)
    assert sorted(p.name for p in dst.iterdir() if not p.name.startswith(".")) == sorted(files)


def test_mismatched_root_key_refused(tmp_path: Path) -> None:
    MeshCA.load_or_create(tmp_path, now=NOW)
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "root-key.pem").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CertificateError, match="does not match"):
        MeshCA.load_or_create(tmp_path, now=NOW)


def test_plugin_ca_files(tmp_path: Path) -> None:
    plugin = write_plugin_ca(tmp_path, now=NOW)
    ca = MeshCA.load_or_create(tmp_path, now=NOW)
    assert ca.roots_pem == pem(plugin.root)
    assert not (tmp_path / "root-key.pem").exists()  # nothing was generated
    chain = ca.sign_csr(generate_csr(ALICE)[1], now=NOW)
    # leaf, intermediate, root: cert-chain.pem's copies of ca-cert and root are not duplicated.
    assert chain[1:] == [pem(plugin.intermediate), pem(plugin.root)]
    verified = verify_with_policy(chain, ca.roots_pem, NOW)
    assert [c.subject for c in verified[1:]] == [plugin.intermediate.subject, plugin.root.subject]
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.issuer == plugin.intermediate.subject
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = plugin.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_from_pem_without_root_uses_chain_tail(tmp_path: Path) -> None:
    plugin = write_plugin_ca(tmp_path, now=NOW)
    ca = MeshCA.from_pem(
        cert_pem=(tmp_path / "ca-cert.pem").read_bytes(),
        key_pem=(tmp_path / "ca-key.pem").read_bytes(),
        chain_pem=(tmp_path / "cert-chain.pem").read_bytes(),
        trust_domain=TD,
    )
    assert ca.roots_pem == pem(plugin.root)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chain_pem": b""}, "self-signed root"),
        ({"root_pem": b"garbage"}, "invalid PEM"),
        ({"key_pem_from": "root"}, "does not match"),
        ({"root_pem_wrong": True}, "does not end at a trusted root"),
    ],
)
def test_from_pem_refusals(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    write_plugin_ca(tmp_path / "a", now=NOW)
    write_plugin_ca(tmp_path / "b", now=NOW)
    a = tmp_path / "a"
    key_pem = (a / "ca-key.pem").read_bytes()
    if kwargs.get("key_pem_from") == "root":
        key_pem = (tmp_path / "b" / "ca-key.pem").read_bytes()
    root_pem: bytes | None = None
    if "root_pem" in kwargs:
        root_pem = kwargs["root_pem"]  # type: ignore[assignment]
    if kwargs.get("root_pem_wrong"):
        root_pem = (tmp_path / "b" / "root-cert.pem").read_bytes()
    chain_pem = (a / "cert-chain.pem").read_bytes()
    if "chain_pem" in kwargs:
        chain_pem = kwargs["chain_pem"]  # type: ignore[assignment]
    with pytest.raises(CertificateError, match=message):
        MeshCA.from_pem(
            cert_pem=(a / "ca-cert.pem").read_bytes(),
            key_pem=key_pem,
            chain_pem=chain_pem,
            root_pem=root_pem,
            trust_domain=TD,
        )


def test_from_pem_refuses_leaf_as_ca() -> None:
    ca = MeshCA.create_root(now=NOW)
    leaf = ca.issue(ALICE, now=NOW)
    with pytest.raises(CertificateError, match="not a CA certificate"):
        MeshCA.from_pem(
            cert_pem=leaf.leaf_pem, key_pem=leaf.key_pem, root_pem=ca.roots_pem, trust_domain=TD
        )


# --------------------------------------------------------------------------- issued leaves


def test_issued_leaf_profile() -> None:
    ca = MeshCA.create_root(now=NOW)
    _, csr_pem = generate_csr(ALICE)
    chain = ca.sign_csr(csr_pem, now=NOW, identity=ALICE)
    assert len(chain) == 2
    assert chain[1] == ca.roots_pem
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.subject == x509.Name([])
    assert leaf.not_valid_before_utc == NOW - timedelta(minutes=1)  # clock-skew allowance
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=24)  # default TTL
    assert leaf.serial_number > 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # empty subject => SAN critical (RFC 5280 §4.2.1.6)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [ALICE.uri]
    assert len(list(san.value)) == 1
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_agreement
    assert not ku.key_encipherment
    assert not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    root = x509.load_pem_x509_certificate(ca.roots_pem)
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    # The chain verifies (RFC 5280 path validation) while valid, and not after notAfter.
    verify_with_policy(chain, ca.roots_pem, NOW)
    with pytest.raises(VerificationError):
        verify_with_policy(chain, ca.roots_pem, NOW + timedelta(hours=25))
    # The same CA never reuses serials.
    serials = {x509.load_pem_x509_certificate(ca.sign_csr(csr_pem, now=NOW)[0]).serial_number}
    serials.add(leaf.serial_number)
    assert len(serials) == 2


def test_rsa_csr_gets_key_encipherment() -> None:
    ca = MeshCA.create_root(now=NOW)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    chain = ca.sign_csr(make_csr(key, [uri(ALICE.uri)]), now=NOW, ttl=timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(chain[0])
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_encipherment
    assert not ku.key_agreement
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=1)


def test_ttl_clamped_to_ca_validity(tmp_path: Path) -> None:
    plugin = write_plugin_ca(tmp_path, now=NOW, intermediate_days=2)
    ca = MeshCA.load_or_create(tmp_path, now=NOW)
    chain = ca.sign_csr(generate_csr(ALICE)[1], now=NOW, ttl=timedelta(days=30))
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.not_valid_after_utc == plugin.intermediate.not_valid_after_utc
    with pytest.raises(CertificateError, match="CA certificate chain expired"):
        ca.sign_csr(generate_csr(ALICE)[1], now=NOW + timedelta(days=3))


def _tampered_signature(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def _refusal_cases() -> list[object]:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    good = uri(ALICE.uri)
    cases: list[tuple[str, bytes, str]] = [
        ("garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "invalid CSR"),
        (
            "two URI SANs",
            make_csr(ec_key, [good, uri(sid("apps", "bob").uri)]),
            "exactly one URI SAN, has 2",
        ),
        ("no SAN", make_csr(ec_key, []), "no subjectAltName"),
        (
            "URI + DNS SAN",
            make_csr(ec_key, [good, x509.DNSName("alice.apps.svc")]),
            "only carry one URI SAN; it also has DNSName",
        ),
        (
            "wrong trust domain",
            make_csr(ec_key, [uri("spiffe://other.example/ns/apps/sa/alice")]),
            "not in trust domain 'cluster.local'",
        ),
        (
            "not a workload id",
            make_csr(ec_key, [uri("spiffe://cluster.local/ns/apps")]),
            "not a workload SPIFFE ID",
        ),
        ("https URI", make_csr(ec_key, [uri("https://alice.example")]), "not a workload SPIFFE ID"),
        (
            "RSA 1024",
            make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024), [good]),
            "RSA key is 1024 bits",
        ),
        (
            "EC P-384",
            make_csr(ec.generate_private_key(ec.SECP384R1()), [good]),
            "curve secp384r1 is not P-256",
        ),
        (
            "SHA-224 signature",
            make_csr(ec_key, [good], algorithm=hashes.SHA224()),
            "hash sha224 is not allowed",
        ),
        ("bad signature", _tampered_signature(make_csr(ec_key, [good])), "signature is invalid"),
    ]
    return [pytest.param(csr, message, id=name) for name, csr, message in cases]


@pytest.mark.parametrize(("csr_pem", "message"), _refusal_cases())
def test_sign_csr_refusals(csr_pem: bytes, message: str) -> None:
    ca = MeshCA.create_root(now=NOW)
    with pytest.raises(CertificateError, match=message):
        ca.sign_csr(csr_pem, now=NOW)


def test_sign_csr_identity_must_match() -> None:
    ca = MeshCA.create_root(now=NOW)
    _, csr_pem = generate_csr(ALICE)
    with pytest.raises(
        CertificateError,
        match=re.escape(
            f"CSR asks for {ALICE} but the caller is spiffe://cluster.local/ns/apps/sa/bob"
        ),
    ):
        ca.sign_csr(csr_pem, now=NOW, identity=sid("apps", "bob"))
    assert len(ca.sign_csr(csr_pem, now=NOW, identity=ALICE)) == 2


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1)])
def test_sign_csr_ttl_must_be_positive(ttl: timedelta) -> None:
    ca = MeshCA.create_root(now=NOW)
    with pytest.raises(CertificateError, match="ttl must be positive"):
        ca.sign_csr(generate_csr(ALICE)[1], now=NOW, ttl=ttl)


def test_sign_csr_requires_aware_now() -> None:
    ca = MeshCA.create_root(now=NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.sign_csr(generate_csr(ALICE)[1], now=NOW.replace(tzinfo=None))


def test_generate_csr() -> None:
    key_pem, csr_pem = generate_csr(ALICE)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    pub = csr.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.curve.name == "secp256r1"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [uri(ALICE.uri)]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key().public_numbers() == pub.public_numbers()  # type: ignore[union-attr]


def test_issue_returns_workload_certificate() -> None:
    ca = MeshCA.create_root(now=NOW)
    cert = ca.issue(ALICE, now=NOW, ttl=timedelta(hours=2))
    assert isinstance(cert, WorkloadCertificate)
    assert cert.identity == ALICE
    assert cert.not_after == NOW + timedelta(hours=2)
    assert cert.roots_pem == ca.roots_pem
    assert len(cert.chain_pem) == 2


def test_add_trusted_root() -> None:
    old = MeshCA.create_root(now=NOW)
    new = MeshCA.create_root(now=NOW)
    new.add_trusted_root(old.roots_pem)
    new.add_trusted_root(old.roots_pem)  # duplicate ignored
    roots = x509.load_pem_x509_certificates(new.roots_pem)
    assert [pem(r) for r in roots] == [new.root_pem, old.root_pem]
    # Certificates from either CA verify against the merged bundle.
    verify_with_policy(old.issue(ALICE, now=NOW).chain_pem, new.roots_pem, NOW)
    verify_with_policy(new.issue(ALICE, now=NOW).chain_pem, new.roots_pem, NOW)
    # Issued certificates carry the full bundle.
    assert new.issue(ALICE, now=NOW).roots_pem == new.roots_pem
    with pytest.raises(CertificateError, match="not a CA certificate"):
        new.add_trusted_root(old.issue(ALICE, now=NOW).leaf_pem)
