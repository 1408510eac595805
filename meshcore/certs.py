"""Workload certificates and their lifecycle on the node proxy.

Owns: `WorkloadCertificate` (key + chain leaf..root + trust bundle for one SPIFFE ID), the
`CertificateProvider` protocol (where certificates come from: the control-plane CA or an
in-process `MeshCA`), and `CertificateManager`, which keeps one certificate per local identity
fresh.

Invariants:
- A `WorkloadCertificate` is checked on construction via `from_chain`: the leaf's single URI SAN
  equals the identity asked for, the private key matches the leaf, and each chain link is signed
  by the next (ending at a trusted root). A wrong answer from a CA is never installed. A node
  proxy's workers run `from_chain` (and every other X.509 function here, the only ones that
  import `cryptography`) in `meshcore.certhelper`'s helper process, never in their own.
- Refresh at 50% of the lifetime (ztunnel/istio-agent default); on failure retry with exponential
  backoff (500 ms, x2, jitter ±20%, cap 150 s) and keep serving the old certificate until it
  expires; an expired certificate is never handed out.
- Scheduling is pure: `refresh_due(now)` / `next_deadline()` decide; `tick(now)` and `run()` act.
  Time comes from the injected clock, never read inside the scheduling logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from meshcore.backoff import Backoff
from meshcore.errors import CertificateError, IdentityError
from meshcore.identity import SpiffeId

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from meshcore.ca import MeshCA

log = logging.getLogger(__name__)

BACKOFF_INITIAL = 0.5  # seconds
BACKOFF_MULTIPLIER = 2.0
BACKOFF_JITTER = 0.2
BACKOFF_CAP = 150.0  # seconds
REFRESH_FRACTION = 0.5
_MAX_SLEEP = 60.0  # run() re-reads the clock at least this often (wall-clock jumps, suspend)


def utcnow() -> datetime:
    """The default clock: timezone-aware UTC now."""
    return datetime.now(UTC)


# --------------------------------------------------------------------------- PEM / X.509 helpers
# Each imports `cryptography` itself: a node proxy's worker never calls them (its certificates are
# made and checked by `meshcore.certhelper`'s helper process), so it never loads the package.


def split_pem_chain(pem: bytes) -> list[bytes]:
    """Split concatenated PEM certificates into one normalised PEM per certificate.
    Blank input gives an empty list."""
    if not pem.strip():
        return []
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CertificateError(f"invalid PEM certificate chain: {e}") from e
    return [c.public_bytes(serialization.Encoding.PEM) for c in certs]


def load_cert(pem: bytes) -> x509.Certificate:
    """Load exactly one PEM certificate, as CertificateError on failure."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise CertificateError(f"invalid PEM certificate: {e}") from e


def load_private_key(pem: bytes) -> PrivateKeyTypes:
    """Load an unencrypted PEM private key (PKCS#8, SEC1 or PKCS#1), as CertificateError."""
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"invalid PEM private key: {e}") from e


def public_key_der(key: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a public key (for comparing keys)."""
    from cryptography.hazmat.primitives import serialization

    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def uri_sans(ext_holder: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """All URI SubjectAltNames of a certificate or CSR (empty if there is no SAN extension)."""
    from cryptography import x509

    try:
        san = ext_holder.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def cert_identity(cert: x509.Certificate) -> SpiffeId:
    """The SpiffeId of a leaf: it must carry exactly one URI SAN (SPIFFE X509-SVID §2)."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise CertificateError(f"certificate must have exactly one URI SAN, has {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except IdentityError as e:
        raise CertificateError(f"certificate URI SAN is not a workload SPIFFE ID: {e}") from e


def verify_chain_links(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> None:
    """Check each certificate is signed by the next, and the last is (or is signed by) a root.

    This is signature/issuer linkage only (RFC 5280 §6.1.3 (a)(1) and (a)(4)); validity periods
    and extensions are checked by OpenSSL at handshake time.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    if not chain:
        raise CertificateError("certificate chain is empty")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CertificateError(
                f"chain link broken: {child.subject.rfc4514_string() or '<leaf>'} is not issued "
                f"by {parent.subject.rfc4514_string()}: {e or type(e).__name__}"
            ) from e
    last = chain[-1]
    root_ders = {r.public_bytes(serialization.Encoding.DER) for r in roots}
    if last.public_bytes(serialization.Encoding.DER) in root_ders:
        return
    for root in roots:
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            last.verify_directly_issued_by(root)
            return
    raise CertificateError("certificate chain does not end at a trusted root")


# --------------------------------------------------------------------------- WorkloadCertificate


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadCertificate:
    """One workload's key and certificate chain. Build with `from_chain` (which validates)."""

    identity: SpiffeId
    """The SPIFFE ID in the leaf's URI SAN."""
    key_pem: bytes
    """The leaf's private key (PEM, unencrypted)."""
    chain_pem: tuple[bytes, ...]
    """Certificates leaf..root, one PEM per element."""
    not_before: datetime
    """Leaf notBefore (aware, UTC)."""
    not_after: datetime
    """Leaf notAfter (aware, UTC)."""
    roots_pem: bytes
    """Trust bundle (one or more concatenated root PEMs) used to verify peers."""
    serial: int
    """The leaf's serial number."""
    presented_pem: tuple[bytes, ...]
    """What a TLS handshake sends: the leaf and its intermediates, without self-issued
    certificates (roots: RFC 8446 §4.4.2 allows omitting the trust anchor; peers have it)."""

    @classmethod
    def from_chain(
        cls,
        identity: SpiffeId,
        key_pem: bytes,
        chain_pem: Sequence[bytes] | bytes,
        roots_pem: bytes,
    ) -> WorkloadCertificate:
        """Validate and wrap a signed chain (leaf first) as returned by a CA.

        `chain_pem` may be a sequence of PEMs or one concatenated PEM blob. Raises
        CertificateError if the leaf's SAN is not `identity` (the node proxy checks the CA gave
        it what it asked for), the key does not match the leaf, or the chain does not link up
        to a root in `roots_pem`.
        """
        blob = chain_pem if isinstance(chain_pem, bytes) else b"".join(chain_pem)
        pems = split_pem_chain(blob)
        if not pems:
            raise CertificateError("certificate chain is empty")
        certs = [load_cert(p) for p in pems]
        roots = [load_cert(p) for p in split_pem_chain(roots_pem)]
        if not roots:
            raise CertificateError("trust bundle (roots_pem) is empty")
        leaf = certs[0]
        got = cert_identity(leaf)
        if got != identity:
            raise CertificateError(f"certificate is for {got}, expected {identity}")
        key = load_private_key(key_pem)
        if public_key_der(key.public_key()) != public_key_der(leaf.public_key()):
            raise CertificateError(f"private key does not match the certificate for {identity}")
        verify_chain_links(certs, roots)
        above = zip(pems[1:], certs[1:], strict=True)
        presented = [pems[0], *(pem for pem, c in above if c.subject != c.issuer)]
        return cls(
            identity=identity,
            key_pem=key_pem,
            chain_pem=tuple(pems),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            roots_pem=roots_pem,
            serial=leaf.serial_number,
            presented_pem=tuple(presented),
        )

    @property
    def leaf_pem(self) -> bytes:
        return self.chain_pem[0]

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    @property
    def refresh_at(self) -> datetime:
        """When to fetch a replacement: notBefore + 50% of the lifetime."""
        return self.not_before + self.lifetime * REFRESH_FRACTION

    def expired(self, now: datetime) -> bool:
        """True once `now` is at or past notAfter (RFC 5280 §4.1.2.5: notAfter is inclusive,
        so we stop one instant early rather than serve a certificate on its last second)."""
        return now >= self.not_after


# --------------------------------------------------------------------------- providers


class CertificateProvider(Protocol):
    """Where workload certificates come from."""

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate: ...

    def forget(self, identity: SpiffeId) -> None:
        """`identity` is no longer managed: drop what is kept for its next fetch (if any)."""


class LocalCAProvider:
    """Signs with an in-process MeshCA (the waypoint without a control plane, and tests; the
    node proxy's is `meshcore.certhelper.HelperCAProvider`, which signs in a helper process)."""

    def __init__(
        self,
        ca: MeshCA,
        ttl: timedelta = timedelta(hours=24),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.ca = ca
        self.ttl = ttl
        self.clock = clock

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        return self.ca.issue(identity, ttl=self.ttl, now=self.clock())

    def forget(self, identity: SpiffeId) -> None:
        pass  # nothing kept between fetches


# --------------------------------------------------------------------------- manager


CERT_BACKOFF = Backoff(
    initial=BACKOFF_INITIAL, cap=BACKOFF_CAP, multiplier=BACKOFF_MULTIPLIER, jitter=BACKOFF_JITTER
)
"""500 ms x 2**attempt, capped at 150 s, then randomised by ±20% (like ztunnel's
ExponentialBackoff: the cap applies before jitter, so a capped delay lies in [120, 180])."""


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before retry number `attempt` (0 = first retry after the first failure)."""
    return CERT_BACKOFF.delay(attempt, rng)


@dataclass(slots=True, kw_only=True, eq=False)
class _Entry:
    """Mutable per-identity state, private to CertificateManager."""

    identity: SpiffeId
    cert: WorkloadCertificate | None = None
    due: datetime | None = None  # next refresh/retry; None = due now
    failures: int = 0  # consecutive failures
    last_error: str | None = None
    inflight: asyncio.Task[WorkloadCertificate] | None = None


class CertificateManager:
    """Keeps one certificate per local identity, refreshed in the background.

    `get()` fetches on first use (concurrent callers share one fetch). `run()` refreshes due
    certificates; tests can drive `tick(now)` instead. Listeners registered with `on_rotate`
    are called with every newly installed certificate (first one included); connections already
    established keep their old TLS context and stay alive.
    """

    def __init__(
        self,
        provider: CertificateProvider,
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self._provider = provider
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._entries: dict[SpiffeId, _Entry] = {}
        self._listeners: list[Callable[[WorkloadCertificate], None]] = []
        self._wake = asyncio.Event()

    # ---- membership

    def add(self, identity: SpiffeId) -> None:
        """Start managing `identity` (idempotent); its first fetch is due immediately."""
        if identity not in self._entries:
            self._entries[identity] = _Entry(identity=identity)
            self._wake.set()

    def remove(self, identity: SpiffeId) -> None:
        """Stop managing `identity`. An in-flight fetch still completes for its waiters but its
        result is not installed; the provider forgets what it kept for it (a pending key)."""
        self._entries.pop(identity, None)
        self._provider.forget(identity)
        self._wake.set()

    def identities(self) -> list[SpiffeId]:
        return sorted(self._entries)

    def wake(self) -> None:
        """Make `run()` re-read the clock now (e.g. after a wall-clock jump or resume)."""
        self._wake.set()

    def on_rotate(self, callback: Callable[[WorkloadCertificate], None]) -> None:
        self._listeners.append(callback)

    # ---- reads

    def current(
        self, identity: SpiffeId, now: datetime | None = None
    ) -> WorkloadCertificate | None:
        """The installed certificate if it has not expired, else None. Never blocks."""
        entry = self._entries.get(identity)
        if entry is None or entry.cert is None:
            return None
        if entry.cert.expired(self._clock() if now is None else now):
            return None
        return entry.cert

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        """A valid certificate for `identity`, fetching it if needed.

        - valid certificate installed: returned at once;
        - a fetch in flight: wait for it (shared by all callers);
        - the last attempt failed and its backoff has not elapsed: raise CertificateError at
          once rather than hammer the CA (the retry happens on schedule in `run()`);
        - otherwise (first use, or expired): start a fetch and wait for it.
        """
        self.add(identity)
        entry = self._entries[identity]
        now = self._clock()
        cert = self.current(identity, now)
        if cert is not None:
            return cert
        if entry.inflight is None:
            if entry.failures and entry.due is not None and now < entry.due:
                raise CertificateError(
                    f"no certificate for {identity}: {entry.last_error} "
                    f"(next retry at {entry.due.isoformat()})"
                )
            self._start(entry)
        assert entry.inflight is not None
        # shield: one caller being cancelled must not cancel the fetch shared with the others.
        return await asyncio.shield(entry.inflight)

    # ---- pure scheduling

    def refresh_due(self, now: datetime) -> list[SpiffeId]:
        """Identities whose (re)fetch is due at `now` and not already in flight."""
        return sorted(
            e.identity
            for e in self._entries.values()
            if e.inflight is None and (e.due is None or e.due <= now)
        )

    def next_deadline(self) -> datetime | None:
        """Earliest scheduled refresh/retry among idle identities; None if nothing is scheduled.
        An identity never fetched is due immediately (returned as `datetime.min` in UTC)."""
        dues = [
            e.due if e.due is not None else datetime.min.replace(tzinfo=UTC)
            for e in self._entries.values()
            if e.inflight is None
        ]
        return min(dues) if dues else None

    # ---- acting

    async def tick(self, now: datetime | None = None) -> list[SpiffeId]:
        """Fetch everything due at `now` concurrently; return the identities attempted.
        Failures are recorded (and backed off), never raised."""
        due = self.refresh_due(self._clock() if now is None else now)
        tasks = [self._start(self._entries[i]) for i in due]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return due

    async def run(self) -> None:
        """Refresh certificates forever (cancel the task to stop)."""
        while True:
            self._wake.clear()
            await self.tick(self._clock())
            deadline = self.next_deadline()
            timeout = _MAX_SLEEP
            if deadline is not None:
                timeout = min(_MAX_SLEEP, max(0.0, (deadline - self._clock()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _start(self, entry: _Entry) -> asyncio.Task[WorkloadCertificate]:
        task = asyncio.get_running_loop().create_task(
            self._fetch(entry), name=f"cert-fetch {entry.identity}"
        )
        entry.inflight = task
        # Failures are recorded in the entry; mark the exception retrieved so a fetch nobody
        # awaited (its caller was cancelled) does not log "exception was never retrieved".
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        return task

    async def _fetch(self, entry: _Entry) -> WorkloadCertificate:
        try:
            cert = await self._provider.fetch(entry.identity)
            if cert.identity != entry.identity:
                raise CertificateError(f"provider returned {cert.identity} for {entry.identity}")
        except asyncio.CancelledError:
            entry.inflight = None
            raise
        except Exception as e:
            entry.inflight = None
            self._record_failure(entry, e, self._clock())
            raise
        entry.inflight = None
        now = self._clock()
        if cert.expired(now):
            error = CertificateError(
                f"provider returned an expired certificate for {cert.identity}"
            )
            self._record_failure(entry, error, now)
            raise error
        self._install(entry, cert, now)
        return cert

    def _record_failure(self, entry: _Entry, error: BaseException, now: datetime) -> None:
        delay = backoff_delay(entry.failures, self._rng)
        entry.failures += 1
        entry.last_error = f"{type(error).__name__}: {error}"
        entry.due = now + timedelta(seconds=delay)
        log.warning(
            "certificate fetch for %s failed (attempt %d), retry in %.1fs: %s",
            entry.identity,
            entry.failures,
            delay,
            entry.last_error,
        )

    def _install(self, entry: _Entry, cert: WorkloadCertificate, now: datetime) -> None:
        if self._entries.get(entry.identity) is not entry:
            return  # removed while fetching
        entry.failures = 0
        entry.last_error = None
        entry.cert = cert
        # Refresh at 50% of the lifetime; the floor stops a CA that only hands out almost-expired
        # certificates from turning the refresh loop into a busy loop.
        entry.due = max(cert.refresh_at, now + timedelta(seconds=BACKOFF_INITIAL))
        self._wake.set()
        for listener in list(self._listeners):
            try:
                listener(cert)
            except Exception:
                log.exception("on_rotate listener failed for %s", cert.identity)

    # ---- introspection

    def state(self, identity: SpiffeId, now: datetime | None = None) -> str:
        """`initializing` (never had a cert, no failure yet), `available` (valid cert),
        `unavailable` (no valid cert and the last attempt failed, or it expired)."""
        entry = self._entries.get(identity)
        if entry is None:
            raise KeyError(identity)
        if self.current(identity, now) is not None:
            return "available"
        if entry.cert is None and not entry.failures:
            return "initializing"
        return "unavailable"

    def snapshot(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """JSON-ready state per identity for /config_dump (serial as a decimal string)."""
        now = self._clock() if now is None else now
        out: list[dict[str, Any]] = []
        for identity in sorted(self._entries):
            e = self._entries[identity]
            c = e.cert
            out.append(
                {
                    "identity": str(identity),
                    "state": self.state(identity, now),
                    "serial": str(c.serial) if c else None,
                    "not_before": c.not_before.isoformat() if c else None,
                    "not_after": c.not_after.isoformat() if c else None,
                    "refresh_at": c.refresh_at.isoformat() if c else None,
                    "next_attempt": e.due.isoformat() if e.due else None,
                    "failures": e.failures,
                    "last_error": e.last_error,
                    "chain_length": len(c.chain_pem) if c else 0,
                }
            )
        return out
