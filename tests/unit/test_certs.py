"""Workload certificates and the certificate manager (meshcore.certs)."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime, timedelta

import pytest
from cryptography import x509

from meshcore.ca import MeshCA, generate_csr
from meshcore.certs import (
    CertificateManager,
    CertificateProvider,
    LocalCAProvider,
    WorkloadCertificate,
    backoff_delay,
)
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from tests.unit.certfixtures import NOW, sid

ALICE = sid("apps", "alice")
BOB = sid("apps", "bob")
DAY = timedelta(hours=24)


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.create_root(now=NOW - timedelta(days=30))


# --------------------------------------------------------------------------- WorkloadCertificate


def test_from_chain_parses_validity_and_schedule(ca: MeshCA) -> None:
    key_pem, csr_pem = generate_csr(ALICE)
    chain = ca.sign_csr(csr_pem, now=NOW)
    cert = WorkloadCertificate.from_chain(ALICE, key_pem, chain, ca.roots_pem)
    assert cert.identity == ALICE
    assert cert.chain_pem == tuple(chain)
    assert cert.leaf_pem == chain[0]
    assert cert.serial == x509.load_pem_x509_certificate(chain[0]).serial_number
    assert cert.not_before == NOW - timedelta(minutes=1)
    assert cert.not_after == NOW + DAY
    # refresh at 50% of the lifetime (which includes the 1-minute backdating)
    assert cert.refresh_at == cert.not_before + (cert.not_after - cert.not_before) / 2
    assert cert.refresh_at == NOW + timedelta(hours=12) - timedelta(seconds=30)
    assert not cert.expired(NOW)
    assert not cert.expired(cert.not_after - timedelta(seconds=1))
    assert cert.expired(cert.not_after)
    # a single concatenated PEM blob is accepted too
    blob = WorkloadCertificate.from_chain(ALICE, key_pem, b"".join(chain), ca.roots_pem)
    assert blob == cert


def test_from_chain_refuses_other_identity(ca: MeshCA) -> None:
    key_pem, csr_pem = generate_csr(ALICE)
    chain = ca.sign_csr(csr_pem, now=NOW)
    with pytest.raises(CertificateError, match=r"certificate is for .*alice, expected .*bob"):
        WorkloadCertificate.from_chain(BOB, key_pem, chain, ca.roots_pem)


def test_from_chain_refuses_wrong_key(ca: MeshCA) -> None:
    _, csr_pem = generate_csr(ALICE)
    other_key, _ = generate_csr(ALICE)
    with pytest.raises(CertificateError, match="private key does not match"):
        WorkloadCertificate.from_chain(
            ALICE, other_key, ca.sign_csr(csr_pem, now=NOW), ca.roots_pem
        )


def test_from_chain_refuses_untrusted_chain(ca: MeshCA) -> None:
    other = MeshCA.create_root(now=NOW)
    key_pem, csr_pem = generate_csr(ALICE)
    chain = other.sign_csr(csr_pem, now=NOW)
    with pytest.raises(CertificateError, match="does not end at a trusted root"):
        WorkloadCertificate.from_chain(ALICE, key_pem, chain, ca.roots_pem)
    # leaf followed by a root that did not sign it: broken link
    with pytest.raises(CertificateError, match="chain link broken"):
        WorkloadCertificate.from_chain(ALICE, key_pem, [chain[0], ca.root_pem], ca.roots_pem)
    with pytest.raises(CertificateError, match=r"trust bundle .* is empty"):
        WorkloadCertificate.from_chain(ALICE, key_pem, chain, b"")
    with pytest.raises(CertificateError, match="chain is empty"):
        WorkloadCertificate.from_chain(ALICE, key_pem, [], ca.roots_pem)


def test_local_ca_provider(ca: MeshCA) -> None:
    provider: CertificateProvider = LocalCAProvider(ca, timedelta(hours=2), lambda: NOW)
    cert = asyncio.run(provider.fetch(ALICE))
    assert cert.identity == ALICE
    assert cert.not_after == NOW + timedelta(hours=2)


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("attempt", "base"),
    [
        (0, 0.5),
        (1, 1.0),
        (2, 2.0),
        (3, 4.0),
        (4, 8.0),
        (5, 16.0),
        (6, 32.0),
        (7, 64.0),
        (8, 128.0),
        (9, 150.0),  # 256 capped
        (10, 150.0),
        (1000, 150.0),
    ],
)
def test_backoff_table(attempt: int, base: float) -> None:
    rng = random.Random(attempt)
    delays = [backoff_delay(attempt, rng) for _ in range(200)]
    assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
    # the jitter really spreads (not a constant), and reaches both sides of the base
    assert min(delays) < base * 0.9
    assert max(delays) > base * 1.1


def test_backoff_extremes_and_errors() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def uniform(self, a: float, b: float) -> float:
            return a if self.value < 0 else b

    assert backoff_delay(0, Fixed(-1)) == pytest.approx(0.4)
    assert backoff_delay(0, Fixed(1)) == pytest.approx(0.6)
    assert backoff_delay(20, Fixed(1)) == pytest.approx(180.0)
    assert backoff_delay(20, Fixed(-1)) == pytest.approx(120.0)
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1, random.Random(0))


# --------------------------------------------------------------------------- manager


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class CountingProvider:
    """Issues real certificates at the fake clock's time; can fail or be held at a gate."""

    def __init__(self, ca: MeshCA, clock: FakeClock, ttl: timedelta = DAY) -> None:
        self.ca = ca
        self.clock = clock
        self.ttl = ttl
        self.calls: list[SpiffeId] = []
        self.forgotten: list[SpiffeId] = []
        self.fail = False
        self.gate: asyncio.Event | None = None
        self.wrong_identity = False

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        self.calls.append(identity)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise CertificateError("CA unavailable")
        ask = BOB if self.wrong_identity else identity
        return self.ca.issue(ask, ttl=self.ttl, now=self.clock())

    def forget(self, identity: SpiffeId) -> None:
        self.forgotten.append(identity)


def make_manager(
    ca: MeshCA, seed: int = 7
) -> tuple[CertificateManager, CountingProvider, FakeClock]:
    clock = FakeClock(NOW)
    provider = CountingProvider(ca, clock)
    return CertificateManager(provider, clock=clock, rng=random.Random(seed)), provider, clock


def test_get_fetches_once_and_shares_concurrent_fetch(ca: MeshCA) -> None:
    async def main() -> None:
        manager, provider, _ = make_manager(ca)
        assert manager.current(ALICE) is None
        provider.gate = asyncio.Event()
        waiters = [asyncio.create_task(manager.get(ALICE)) for _ in range(5)]
        await asyncio.sleep(0)
        assert manager.state(ALICE) == "initializing"
        assert manager.refresh_due(NOW) == []  # in flight: not due again
        provider.gate.set()
        certs = await asyncio.gather(*waiters)
        assert provider.calls == [ALICE]
        assert len({c.serial for c in certs}) == 1
        assert manager.current(ALICE) is certs[0]
        assert await manager.get(ALICE) is certs[0]
        assert provider.calls == [ALICE]

    asyncio.run(main())


def test_cancelled_caller_does_not_cancel_shared_fetch(ca: MeshCA) -> None:
    async def main() -> None:
        manager, provider, _ = make_manager(ca)
        provider.gate = asyncio.Event()
        first = asyncio.create_task(manager.get(ALICE))
        second = asyncio.create_task(manager.get(ALICE))
        await asyncio.sleep(0)
        first.cancel()
        provider.gate.set()
        cert = await second
        assert first.cancelled()
        assert cert.identity == ALICE
        assert provider.calls == [ALICE]

    asyncio.run(main())


def test_refresh_at_half_lifetime(ca: MeshCA) -> None:
    async def main() -> None:
        manager, provider, clock = make_manager(ca)
        rotated: list[WorkloadCertificate] = []
        manager.on_rotate(rotated.append)
        first = await manager.get(ALICE)
        assert rotated == [first]
        assert manager.next_deadline() == first.refresh_at
        for now in (NOW, NOW + timedelta(hours=6), first.refresh_at - timedelta(seconds=1)):
            assert manager.refresh_due(now) == []
            assert await manager.tick(now) == []
        assert provider.calls == [ALICE]

        clock.now = first.refresh_at
        assert manager.refresh_due(clock.now) == [ALICE]
        assert await manager.tick(clock.now) == [ALICE]
        second = manager.current(ALICE)
        assert second is not None
        assert second.serial != first.serial
        assert second.not_before == first.refresh_at - timedelta(minutes=1)
        assert rotated == [first, second]
        assert manager.next_deadline() == second.refresh_at
        assert len(provider.calls) == 2

    asyncio.run(main())


def test_failure_backs_off_and_keeps_old_cert_until_expiry(ca: MeshCA) -> None:
    async def main() -> None:
        manager, provider, clock = make_manager(ca, seed=11)
        expected_rng = random.Random(11)
        old = await manager.get(ALICE)
        provider.fail = True
        clock.now = old.refresh_at
        deadline = old.refresh_at
        for attempt in range(5):
            assert await manager.tick(clock.now) == [ALICE]
            deadline = clock.now + timedelta(seconds=backoff_delay(attempt, expected_rng))
            assert manager.next_deadline() == deadline
            # nothing due until the backoff elapses
            assert manager.refresh_due(deadline - timedelta(milliseconds=1)) == []
            assert manager.current(ALICE) is old  # old certificate still served
            assert manager.state(ALICE) == "available"
            clock.now = deadline
        assert len(provider.calls) == 6
        [snap] = manager.snapshot()
        assert snap["failures"] == 5
        assert "CA unavailable" in snap["last_error"]
        assert snap["serial"] == str(old.serial)
        assert snap["state"] == "available"

        # After expiry the old certificate is never handed out.
        clock.now = old.not_after
        assert manager.current(ALICE) is None
        assert manager.state(ALICE) == "unavailable"
        assert manager.snapshot()[0]["state"] == "unavailable"
        # get() while backing off fails fast instead of hammering the CA...
        await manager.tick(clock.now)
        calls = len(provider.calls)
        with pytest.raises(CertificateError, match=r"no certificate for .*next retry at"):
            await manager.get(ALICE)
        assert len(provider.calls) == calls
        # ...and once the CA is back, the scheduled retry installs a fresh certificate.
        provider.fail = False
        next_deadline = manager.next_deadline()
        assert next_deadline is not None
        clock.now = next_deadline
        assert await manager.tick(clock.now) == [ALICE]
        fresh = manager.current(ALICE)
        assert fresh is not None
        assert fresh.not_after == clock.now.replace(microsecond=0) + DAY
        assert manager.snapshot()[0]["failures"] == 0
        assert manager.next_deadline() == fresh.refresh_at

    asyncio.run(main())


def test_get_refetches_after_expiry(ca: MeshCA) -> None:
    async def main() -> None:
        manager, provider, clock = make_manager(ca)
        old = await manager.get(ALICE)
        clock.now = old.not_after + timedelta(seconds=1)  # nobody ran the refresh loop
        assert manager.current(ALICE) is None
        new = await manager.get(ALICE)
        assert new.serial != old.serial
        assert not new.expired(clock.now)
        assert len(provider.calls) == 2

    asyncio.run(main())


def test_first_fetch_failure_raises_then_retries_on_schedule(ca: MeshCA) -> None:
    async def main() -> None:
        manager, provider, clock = make_manager(ca)
        provider.fail = True
        with pytest.raises(CertificateError, match="CA unavailable"):
            await manager.get(ALICE)
        assert manager.state(ALICE) == "unavailable"
        deadline = manager.next_deadline()
        assert deadline is not None
        assert timedelta(seconds=0.4) <= deadline - NOW <= timedelta(seconds=0.6)
        provider.fail = False
        clock.now = deadline
        assert (await manager.get(ALICE)).identity == ALICE

    asyncio.run(main())


def test_provider_returning_wrong_identity_is_a_failure(ca: MeshCA) -> None:
    async def main() -> None:
        manager, provider, _ = make_manager(ca)
        provider.wrong_identity = True
        with pytest.raises(CertificateError, match=r"provider returned .*bob for .*alice"):
            await manager.get(ALICE)
        assert manager.current(ALICE) is None

    asyncio.run(main())


def test_expired_certificate_from_provider_is_a_failure(ca: MeshCA) -> None:
    async def main() -> None:
        manager, provider, clock = make_manager(ca)
        clock.now = NOW
        provider.clock = FakeClock(NOW - 2 * DAY)
        with pytest.raises(CertificateError, match="expired certificate"):
            await manager.get(ALICE)
        assert manager.snapshot()[0]["failures"] == 1

    asyncio.run(main())


def test_add_remove_and_snapshot(ca: MeshCA) -> None:
    async def main() -> None:
        manager, provider, _ = make_manager(ca)
        manager.add(BOB)
        manager.add(ALICE)
        manager.add(ALICE)
        assert manager.identities() == [ALICE, BOB]
        assert manager.refresh_due(NOW) == [ALICE, BOB]
        assert [s["state"] for s in manager.snapshot()] == ["initializing", "initializing"]
        assert await manager.tick(NOW) == [ALICE, BOB]
        snap = manager.snapshot()
        json.dumps(snap)  # config_dump-ready
        assert [s["identity"] for s in snap] == [ALICE.uri, BOB.uri]
        bob = manager.current(BOB)
        assert bob is not None
        assert snap[1] | {"last_error": None} == {
            "identity": BOB.uri,
            "state": "available",
            "serial": str(bob.serial),
            "not_before": bob.not_before.isoformat(),
            "not_after": bob.not_after.isoformat(),
            "refresh_at": bob.refresh_at.isoformat(),
            "next_attempt": bob.refresh_at.isoformat(),
            "failures": 0,
            "last_error": None,
            "chain_length": 2,
        }
        manager.remove(BOB)
        assert manager.identities() == [ALICE]
        assert manager.current(BOB) is None
        assert provider.forgotten == [BOB]  # its pending key (ControlPlaneCAProvider) goes
        assert [s["identity"] for s in manager.snapshot()] == [ALICE.uri]

        # removed while fetching: the waiter gets its certificate, but it is not installed
        provider.gate = asyncio.Event()
        waiter = asyncio.create_task(manager.get(BOB))
        await asyncio.sleep(0)
        manager.remove(BOB)
        provider.gate.set()
        assert (await waiter).identity == BOB
        assert manager.current(BOB) is None
        assert BOB not in manager.identities()

    asyncio.run(main())


def test_listener_errors_do_not_break_rotation(ca: MeshCA) -> None:
    async def main() -> None:
        manager, _, _ = make_manager(ca)
        seen: list[int] = []

        def broken(cert: WorkloadCertificate) -> None:
            raise RuntimeError("listener bug")

        manager.on_rotate(broken)
        manager.on_rotate(lambda c: seen.append(c.serial))
        cert = await manager.get(ALICE)
        assert seen == [cert.serial]
        assert manager.current(ALICE) is cert

    asyncio.run(main())


def test_run_loop_fetches_refreshes_and_cancels(ca: MeshCA) -> None:
    async def wait_for(predicate: object) -> None:
        for _ in range(500):
            if predicate():  # type: ignore[operator]
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")

    async def main() -> None:
        manager, provider, clock = make_manager(ca)
        rotated: list[WorkloadCertificate] = []
        manager.on_rotate(rotated.append)
        task = asyncio.create_task(manager.run())
        manager.add(ALICE)
        await wait_for(lambda: manager.current(ALICE) is not None)
        first = manager.current(ALICE)
        assert first is not None
        # jump the clock to the refresh time and wake the loop
        clock.now = first.refresh_at
        manager.wake()
        await wait_for(lambda: len(rotated) == 2)
        second = manager.current(ALICE)
        assert second is not None
        assert second.serial != first.serial
        # a workload arriving while the loop sleeps is fetched at once
        manager.add(BOB)
        await wait_for(lambda: manager.current(BOB) is not None)
        assert provider.calls == [ALICE, ALICE, BOB]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
