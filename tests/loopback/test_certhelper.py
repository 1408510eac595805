"""The certificate helper (`meshcore.certhelper`): a node proxy's X.509 work in short-lived
helper processes, so its workers never import `cryptography` (issue 14, RSS per worker).

Real helper processes (`python -m meshcore.certhelper`) and real certificates: what the helper
answers is what the in-process code answers (same checks, same errors), every failure of the
helper itself (crash, garbage, hang) is a CertificateError, and concurrent requests share one
helper run. No network.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from meshcore import certhelper
from meshcore.ca import MeshCA, generate_csr
from meshcore.certhelper import CAMaterial, CertHelper, HelperCAProvider, load_local_ca
from meshcore.certs import WorkloadCertificate, utcnow
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from meshcore.tls import ContextCache
from tests.helpers import run
from tests.unit.certfixtures import sid, write_plugin_ca

ALICE = sid("default", "alice")
BOB = sid("default", "bob")


def material(ca: MeshCA) -> CAMaterial:
    return CAMaterial.of(*ca.pem_material(), trust_domain=ca.trust_domain)


def same_as_in_process(got: WorkloadCertificate, ca: MeshCA) -> None:
    """`got` is what `from_chain` in this process makes of the same chain."""
    want = WorkloadCertificate.from_chain(got.identity, got.key_pem, got.chain_pem, ca.roots_pem)
    assert got == want


def test_issue_by_a_plugin_ca_in_a_helper(tmp_path: Path) -> None:
    """Static mode: the CA directory read once by a helper (an Istio plug-in CA: root,
    intermediate), then a batch of two identities signed by one helper run; the certificates
    are the in-process ones (serial, presented chain without the root) and build TLS contexts."""
    write_plugin_ca(tmp_path, now=utcnow())
    ca = load_local_ca(tmp_path, "cluster.local")
    in_process = MeshCA.load_or_create(tmp_path, trust_domain="cluster.local")
    assert ca == material(in_process)
    helper = CertHelper()
    provider = HelperCAProvider(ca, ttl=timedelta(hours=2), helper=helper)

    async def main() -> list[WorkloadCertificate]:
        return list(await asyncio.gather(provider.fetch(ALICE), provider.fetch(BOB)))

    alice, bob = run(main())
    assert helper.runs == 1  # one helper process for both
    assert (alice.identity, bob.identity) == (ALICE, BOB)
    assert alice.serial != bob.serial
    assert len(alice.chain_pem) == 3
    assert alice.presented_pem == alice.chain_pem[:2]
    assert alice.not_after - alice.not_before == timedelta(hours=2, minutes=1)
    same_as_in_process(alice, in_process)
    contexts = ContextCache()
    assert isinstance(contexts.server(alice), ssl.SSLContext)
    assert isinstance(contexts.client(bob), ssl.SSLContext)


def test_load_local_ca_creates_a_root_and_refuses_a_partial_directory(tmp_path: Path) -> None:
    created = load_local_ca(tmp_path / "new", "cluster.local")
    assert (tmp_path / "new" / "root-key.pem").exists()
    again = MeshCA.load_or_create(tmp_path / "new", trust_domain="cluster.local")
    assert created == material(again)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ca-cert.pem").write_bytes(again.root_pem)
    with pytest.raises(CertificateError, match="incomplete plug-in CA files"):
        load_local_ca(partial, "cluster.local")


def test_csr_and_checks_in_a_helper_fail_as_in_process() -> None:
    """Control-plane mode: key + CSR from a helper, signed by a CA, the answer checked by a
    helper; a wrong identity, a key that is not the leaf's, and a chain to another root are
    refused with `from_chain`'s errors, each request of the batch on its own."""
    ca, other = MeshCA.create_root(), MeshCA.create_root()
    helper = CertHelper()

    async def main() -> list[WorkloadCertificate | BaseException]:
        key, csr = await helper.csr(ALICE)
        chain = ca.sign_csr(csr, now=utcnow(), identity=ALICE)
        other_key, _ = generate_csr(ALICE)
        results = await asyncio.gather(
            helper.check(ALICE, key, chain, ca.roots_pem),
            helper.check(BOB, key, chain, ca.roots_pem),
            helper.check(ALICE, other_key, chain, ca.roots_pem),
            helper.check(ALICE, key, chain[:1], other.roots_pem),
            return_exceptions=True,
        )
        return list(results)

    good, wrong_identity, wrong_key, wrong_root = run(main())
    assert helper.runs == 2  # the CSR, then the four checks together
    assert isinstance(good, WorkloadCertificate)
    same_as_in_process(good, ca)
    assert isinstance(wrong_identity, CertificateError)
    assert f"is for {ALICE}, expected {BOB}" in str(wrong_identity)
    assert isinstance(wrong_key, CertificateError)
    assert "private key does not match" in str(wrong_key)
    assert isinstance(wrong_root, CertificateError)
    assert "does not end at a trusted root" in str(wrong_root)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import sys; sys.exit(3)", "certificate helper exited 3"),
        ("print('not json')", "unreadable answer"),
        ("print('[]')", "different number of requests"),
        ("import time; time.sleep(30)", "took more than 0.5 s"),
    ],
)
def test_a_failing_helper_fails_closed(
    monkeypatch: pytest.MonkeyPatch, code: str, message: str
) -> None:
    """A helper that crashes, writes garbage, answers the wrong count or hangs (killed after
    the timeout): the request is a CertificateError, nothing is installed."""
    monkeypatch.setattr(certhelper, "HELPER_ARGV", (sys.executable, "-c", code))
    helper = CertHelper(timeout=0.5)
    with pytest.raises(CertificateError, match=message):
        run(helper.csr(ALICE))


def test_answer_for_another_identity_is_refused() -> None:
    """The caller checks the helper's answer names the identity it asked for."""
    ca = MeshCA.create_root()
    answer = certhelper.cert_to_json(ca.issue(ALICE, now=utcnow()))
    with pytest.raises(CertificateError, match=r"answered for .*alice, asked for .*bob"):
        certhelper.cert_from_json(answer, BOB)
    for field, value in (("serial", "1"), ("chain", []), ("not_after", "2030-01-01T00:00:00")):
        with pytest.raises(CertificateError):
            certhelper.cert_from_json({**answer, field: value}, ALICE)
    assert certhelper.cert_from_json(answer, ALICE).identity == ALICE


def test_in_process_helper_answers_the_same_without_a_process() -> None:
    ca = MeshCA.create_root()
    helper = CertHelper(in_process=True)

    async def main() -> WorkloadCertificate:
        key, csr = await helper.csr(ALICE)
        chain = ca.sign_csr(csr, now=utcnow(), identity=ALICE)
        with pytest.raises(CertificateError, match="expected"):
            await helper.check(BOB, key, chain, ca.roots_pem)
        return await helper.check(ALICE, key, chain, ca.roots_pem)

    same_as_in_process(run(main()), ca)
    assert helper.runs == 0


def test_the_working_directory_does_not_shadow_the_helpers_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``meshcore`` package in the caller's working directory does not run in the helper
    (which may hold the CA key): the helper runs the caller's own code."""
    fake = tmp_path / "meshcore"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "certhelper.py").write_text('print(\'[{"key": "planted", "csr": "x"}]\')\n')
    monkeypatch.chdir(tmp_path)
    key, csr = run(CertHelper().csr(ALICE))
    assert key.startswith(b"-----BEGIN")
    assert csr.startswith(b"-----BEGIN CERTIFICATE REQUEST")


def test_a_stopped_helper_fails_every_waiting_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop shutting down cancels the runner: the requests in flight and those queued
    behind them get a CertificateError, none waits for ever or sees CancelledError."""
    monkeypatch.setattr(certhelper, "MAX_BATCH", 1)
    monkeypatch.setattr(
        certhelper, "HELPER_ARGV", (sys.executable, "-c", "import time; time.sleep(30)")
    )
    helper = CertHelper(timeout=1)

    async def main() -> list[BaseException | tuple[bytes, bytes]]:
        calls = [asyncio.ensure_future(helper.csr(ident)) for ident in (ALICE, BOB)]
        await asyncio.sleep(0.2)
        assert helper._runner is not None
        helper._runner.cancel()
        return list(await asyncio.gather(*calls, return_exceptions=True))

    results = run(main())
    assert [type(r) for r in results] == [CertificateError, CertificateError]
    assert all("certificate helper stopped" in str(r) for r in results)


def test_a_non_ascii_pem_is_a_certificate_error() -> None:
    ca = MeshCA.create_root()
    answer = certhelper.cert_to_json(ca.issue(ALICE, now=utcnow()))
    with pytest.raises(CertificateError, match="not ASCII"):
        certhelper.cert_from_json({**answer, "key": "-----BEGIN é"}, ALICE)
    with pytest.raises(CertificateError, match="not ASCII"):
        run(CertHelper(in_process=True).check(ALICE, "é".encode(), [b"x"], b"y"))


def test_a_batch_builds_each_ca_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper run's `issue` requests by one CA (a node's identities at start) parse and check
    that CA once (before: `MeshCA.from_pem` per request); a second CA in the same batch is built
    once too, and each certificate is signed by its own CA."""
    first, second = MeshCA.create_root(), MeshCA.create_root()
    built: list[str] = []
    real = MeshCA.from_pem.__func__  # type: ignore[attr-defined]

    def counting(cls: type[MeshCA], /, **kwargs: object) -> MeshCA:
        built.append(str(kwargs["trust_domain"]))
        ca: MeshCA = real(cls, **kwargs)
        return ca

    monkeypatch.setattr(MeshCA, "from_pem", classmethod(counting))
    now = utcnow().isoformat()

    def issue(ca: MeshCA, who: str) -> dict[str, object]:
        return {
            "op": "issue",
            "ca": material(ca).to_json(),
            "identity": sid("default", who).uri,
            "ttl": 3600,
            "now": now,
        }

    requests = [issue(first, "a"), issue(first, "b"), issue(second, "c"), issue(first, "d")]
    got = certhelper.answers(requests)
    assert len(built) == 2
    for reply, ca in zip(got, [first, first, second, first], strict=True):
        cert = certhelper.cert_from_json(reply, SpiffeId.parse(str(reply["identity"])))
        WorkloadCertificate.from_chain(cert.identity, cert.key_pem, cert.chain_pem, ca.roots_pem)
