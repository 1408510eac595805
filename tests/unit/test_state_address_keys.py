"""meshcore.state's address indexes keyed by (network, packed address), not `ipaddress` objects
(issue 14: a lookup per connection hashed an `IPv4Address` in interpreted Python): the lookups
answer exactly what a map keyed by (network, `ipaddress` object) answers, for IPv4, IPv6, an
IPv4-mapped IPv6 address, a scoped IPv6 address, text in any accepted spelling and any
network; and a lookup by text hashes no `ipaddress` object."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.model import IPAddress, NetworkAddress, Service, Workload
from meshcore.proto.yamlform import parse_service, parse_workload
from meshcore.state import MeshState, address_key

NETWORKS = ("", "net-1", "net-2")


def _wl(uid: str, network: str, addrs: tuple[IPAddress, ...]) -> Workload:
    base = parse_workload(
        {"uid": uid, "name": uid, "namespace": "default", "addresses": ["192.0.2.1"], "node": "n"}
    )
    return dataclasses.replace(base, network=network, addresses=addrs)


def _svc(name: str, vips: tuple[tuple[str, IPAddress], ...]) -> Service:
    base = parse_service({"name": name, "namespace": "default", "hostname": f"{name}.svc"})
    return dataclasses.replace(
        base, addresses=tuple(NetworkAddress(network=n, address=a) for n, a in vips)
    )


def _spellings(ip: IPAddress) -> set[str]:
    """Texts `ipaddress` parses to `ip`: canonical, exploded, upper case."""
    out = {str(ip)}
    if ip.version == 6:
        scope = f"%{ip.scope_id}" if ip.scope_id else ""
        bare = ipaddress.IPv6Address(int(ip))  # .exploded fails on a scoped one
        out |= {bare.exploded + scope, str(bare).upper() + scope, bare.exploded.upper() + scope}
    return out


V4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
V6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
MAPPED = V4.map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}"))
SCOPED = st.builds(
    lambda a, s: ipaddress.IPv6Address(f"{a}%{s}"),
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
    st.sampled_from(["eth0", "1", "lo"]),
)
# Small pools so that records collide with the queries, across versions and networks.
SMALL_V4 = st.sampled_from([ipaddress.IPv4Address(f"10.0.0.{i}") for i in range(4)])
SMALL_V6 = st.sampled_from(
    [ipaddress.IPv6Address(t) for t in ("::a00:1", "::ffff:10.0.0.1", "fe80::1", "fe80::1%eth0")]
)
ADDR = st.one_of(V4, V6, MAPPED, SCOPED, SMALL_V4, SMALL_V6)


@settings(max_examples=150, deadline=None)
@given(
    records=st.lists(st.tuples(st.sampled_from(NETWORKS), ADDR), min_size=1, max_size=12),
    extra=st.lists(ADDR, max_size=6),
    as_service=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_lookups_equal_a_map_keyed_by_ipaddress_objects(
    records: list[tuple[str, IPAddress]], extra: list[IPAddress], as_service: list[bool]
) -> None:
    """Differential: `workload_by_address` / `service_by_vip` against the old keying, a dict
    of (network, `ipaddress` object), last writer wins as in `with_updates`."""
    state = MeshState.empty()
    ref_wl: dict[tuple[str, IPAddress], Workload] = {}
    ref_svc: dict[tuple[str, IPAddress], Service] = {}
    for i, (net, addr) in enumerate(records):
        if as_service[i]:
            svc = _svc(f"s{i}", ((net, addr),))
            state = state.with_updates([svc])
            ref_svc[(net, addr)] = svc
        else:
            w = _wl(f"w{i}", net, (addr,))
            state = state.with_updates([w])
            ref_wl[(net, addr)] = w
    queries = [a for _, a in records] + extra
    for addr in queries:
        for net in NETWORKS:
            want_wl, want_svc = ref_wl.get((net, addr)), ref_svc.get((net, addr))
            assert state.workload_by_address(addr, net) is want_wl, (addr, net)
            assert state.service_by_vip(addr, net) is want_svc, (addr, net)
            for text in _spellings(addr):
                assert ipaddress.ip_address(text) == addr  # the spelling is one of addr's
                assert state.workload_by_address(text, net) is want_wl, (text, net)
                assert state.service_by_vip(text, net) is want_svc, (text, net)


@settings(max_examples=200, deadline=None)
@given(a=ADDR, b=ADDR, na=st.sampled_from(NETWORKS), nb=st.sampled_from(NETWORKS))
def test_keys_are_equal_exactly_when_the_addresses_are(
    a: IPAddress, b: IPAddress, na: str, nb: str
) -> None:
    assert (address_key(a, na) == address_key(b, nb)) == (na == nb and a == b)
    assert address_key(str(a), na) == address_key(a, na)


@pytest.mark.parametrize(
    ("stored", "query", "found"),
    [
        ("10.0.0.1", "10.0.0.1", True),
        ("10.0.0.1", "::ffff:10.0.0.1", False),  # IPv4-mapped IPv6 is another address
        ("::ffff:10.0.0.1", "10.0.0.1", False),
        ("::ffff:10.0.0.1", "::FFFF:a00:1", True),
        ("fd00::1", "fd00:0:0:0:0:0:0:1", True),
        ("fe80::1", "fe80::1%eth0", False),  # a scope id tells addresses apart (ipaddress)
        ("fe80::1%eth0", "fe80::1%eth0", True),
        ("fe80::1%eth0", "fe80::1%eth1", False),
    ],
)
def test_versions_mapped_and_scoped_addresses(stored: str, query: str, found: bool) -> None:
    w = _wl("w", "", (ipaddress.ip_address(stored),))
    state = MeshState.build(workloads=[w])
    assert (state.workload_by_address(query) is w) is found
    assert state.workload_by_address(query, "other-network") is None


def test_a_text_that_is_no_address_raises_value_error() -> None:
    state = MeshState.build(workloads=[_wl("w", "", (ipaddress.ip_address("10.0.0.1"),))])
    for bad in ("10.0.0.256", "010.0.0.1", "not-an-ip", "", "1.2.3.4 "):
        with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
            state.workload_by_address(bad)
        with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
            state.service_by_vip(bad)


def test_a_lookup_by_text_hashes_no_ipaddress_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-connection path: the proxies look addresses up by the text the socket gave.
    Fails on the old keying, whose every lookup hashed an `IPv4Address` (`hash(hex(int))`,
    interpreted) twice: the shard, then the shard's dict."""
    w4 = _wl("w4", "", (ipaddress.ip_address("10.1.2.3"),))
    w6 = _wl("w6", "net-1", (ipaddress.ip_address("fd00::7"),))
    svc = _svc("s", (("", ipaddress.ip_address("10.9.9.9")),))
    state = MeshState.build(workloads=[w4, w6], services=[svc])
    for q in ("10.1.2.3", "fd00::7", "10.9.9.9"):  # parse (memoised) before hashing is banned
        state.workload_by_address(q)

    def banned(self: Any) -> int:
        raise AssertionError("an ipaddress object was hashed")

    monkeypatch.setattr(ipaddress.IPv4Address, "__hash__", banned)
    monkeypatch.setattr(ipaddress.IPv6Address, "__hash__", banned)
    assert state.workload_by_address("10.1.2.3") is w4
    assert state.workload_by_address("fd00::7", "net-1") is w6
    assert state.workload_by_address("fd00::7") is None
    assert state.service_by_vip("10.9.9.9") is svc
    assert state.service_by_vip("10.1.2.3") is None
