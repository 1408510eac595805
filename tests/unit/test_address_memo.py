"""The memo of address texts (`meshcore.state`) under a hostile peer: the per-connection memo
holds the addresses the control plane's state knows, and a constant few texts a peer chose.

A peer with a mesh certificate picks its CONNECT targets (`:authority`), and a local workload
picks the destinations its connections are captured with. Before, each text was memoised by an
LRU (65,536 entries in `meshcore.model` and `meshcore.state`, 4,096 in the plan), so a peer's
distinct addresses stayed in a worker's memory for good (+14.9 MiB for 65,536 of them in one
cache). Here: the memory the real parsing and planning path retains after many distinct
peer-chosen texts, and which texts the memo admits (canonical texts of known addresses, bounded
by the state's size; a constant few others), correct for IPv4, IPv6, IPv4-mapped, scoped
addresses and networks."""

from __future__ import annotations

import gc
import ipaddress
import random
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from meshcore import state as state_mod
from meshcore.address import parse_authority
from meshcore.errors import BadRequest
from meshcore.identity import SpiffeId
from meshcore.proto.yamlform import parse_mesh_config, parse_workload
from meshcore.state import MeshState, address_key
from ztunnel.protocol.plan import PlanScope, plan_inbound, plan_outbound
from ztunnel.protocol.plantypes import InboundConnect, PlanKind

RECEIVER, CLIENT, V6, VIP = "10.1.0.10", "10.1.0.20", "fd00::10", "10.2.0.10"
SLEEP = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="client")


def _wl(name: str, ip: str, node: str, **over: Any) -> dict[str, Any]:
    return {
        "uid": name,
        "name": name,
        "namespace": "default",
        "serviceAccount": name,
        "addresses": [ip],
        "tunnelProtocol": "HBONE",
        "node": node,
        **over,
    }


STATE = MeshState.from_config(
    parse_mesh_config(
        {
            "workloads": [
                _wl("receiver", RECEIVER, "node-b", services={"default/echo.default.svc": {}}),
                _wl("client", CLIENT, "node-a"),
                _wl("v6", V6, "node-b"),
                _wl("mapped", "::ffff:10.9.0.1", "node-b"),
                _wl("scoped", "fe80::1%eth0", "node-b"),
                _wl("remote", "10.1.0.10", "node-c", network="net-2"),
            ],
            "services": [
                {
                    "name": "echo",
                    "namespace": "default",
                    "hostname": "echo.default.svc",
                    "addresses": [{"address": VIP}],
                    "ports": [{"servicePort": 80, "targetPort": 8080}],
                }
            ],
        }
    )
)
SCOPE = PlanScope(node="node-a", rng=random.Random(1))


@pytest.fixture(autouse=True)
def fresh_memo() -> None:
    """Each test starts from an empty memo (it is shared by the process's snapshots). The
    module's new names are read through `state_mod` so that the attack test runs on main too
    (there it fails)."""
    getattr(state_mod, "_known", {}).clear()
    getattr(state_mod, "_recent", {}).clear()


def _peer_texts(n: int) -> Iterator[tuple[str, str]]:
    """`n` distinct CONNECT :authority texts a peer picks, IPv4 and IPv6, none of them known."""
    for i in range(n):
        yield f"10.{100 + i % 100}.{i // 100 % 256}.{i // 25600}:8080", f"[fd00:bad::{i:x}]:80"


def _attack(n: int) -> None:
    """The real per-connection path with peer-chosen texts: node B parses the :authority and
    plans the CONNECT (refused: not the connection's destination); node A plans a captured
    connection to an outside address (passthrough) and to a known workload on a port the
    client picks (HBONE)."""
    for v4, v6 in _peer_texts(n):
        for authority in (v4, v6):
            host, port = parse_authority(authority)
            connect = InboundConnect(
                dst_ip=host, dst_port=port, src_identity=SLEEP, src_ip=CLIENT, conn_dst_ip=RECEIVER
            )
            with pytest.raises(BadRequest, match="does not match"):
                plan_inbound(STATE, connect, node="node-b")
        host = v4.rpartition(":")[0]
        passthrough = plan_outbound(STATE, SCOPE, src_ip=CLIENT, dst_ip=host, dst_port=443)
        assert passthrough.kind is PlanKind.PASSTHROUGH
        port = 1 + len(host) * 977 % 65000 + n % 7
        hbone = plan_outbound(STATE, SCOPE, src_ip=CLIENT, dst_ip=RECEIVER, dst_port=port)
        assert hbone.authority == f"{RECEIVER}:{port}"


def _retained(n: int) -> int:
    """Bytes the attack with `n` distinct texts leaves allocated (tracemalloc, after a GC)."""
    _attack(50)  # the known addresses' memo entries and any first-call allocations
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _attack(n)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_peer_chosen_addresses_leave_no_memory_behind() -> None:
    """3,200 distinct peer-chosen texts (1,600 IPv4 and IPv6 CONNECT targets, 800 outside
    destinations, 800 client-picked ports) through the real parsing and planning path retain
    at most the constant memo of recent texts (256 entries, ~70 KB), whatever their number.
    Before, the LRUs kept every text: ~0.65 MB for this run, ~0.8 KB per distinct input."""
    bound = 112 * 1024
    assert _retained(100) < bound
    large = _retained(800)
    assert large < bound, f"{large} bytes retained after 3,200 distinct peer texts"


def test_the_memo_holds_the_canonical_texts_of_known_addresses_only() -> None:
    known = [RECEIVER, CLIENT, V6, str(ipaddress.ip_address("::ffff:10.9.0.1")), "fe80::1%eth0"]
    for text in known:
        assert STATE.workload_by_address(text) is not None
    assert STATE.service_by_vip(VIP) is not None
    assert STATE.workload_by_address(RECEIVER, "net-2") is not None
    assert (
        state_mod.known_address_texts() == len(known) + 1
    )  # one text for both networks' 10.1.0.10
    # Other spellings of known addresses, and unknown addresses, are answered, not admitted.
    for text in ("fd00:0:0::10", "FD00::10", "fd00:0000::0010", "FE80::1%eth0", "fe80::1"):
        found = STATE.workload_by_address(text)
        assert (found is None) == (text == "fe80::1"), text
    for text in ("10.1.0.11", "fd00::11", "::ffff:10.9.0.2", "fe80::1%eth1"):
        assert STATE.workload_by_address(text) is None
        assert STATE.service_by_vip(text) is None
    assert STATE.workload_by_address(CLIENT, "net-2") is None  # known text, other network
    assert state_mod.known_address_texts() == len(known) + 1
    _attack(1000)  # peer-chosen texts are not admitted; the recent ones stay a constant few
    assert state_mod.known_address_texts() == len(known) + 1
    assert 0 < len(state_mod._recent) <= state_mod.RECENT_MAX
    long_scope = "fe80::1%" + "x" * 1000  # a scope id is free text: parsed, never kept
    assert STATE.workload_by_address(long_scope) is None
    assert long_scope not in state_mod._recent


@pytest.mark.parametrize(
    "text",
    [
        RECEIVER,
        VIP,
        V6,
        "FD00::10",
        "fd00:0:0::10",
        "::ffff:10.9.0.1",
        "::ffff:a09:1",
        "fe80::1%eth0",
        "fe80::1",
        "10.200.0.1",
    ],
)
def test_memoised_and_computed_answers_agree(text: str) -> None:
    """Before and after the memo admits a text, every function answers what `ipaddress` does."""
    want = ipaddress.ip_address(text)
    for _ in range(2):
        assert state_mod.parse_address(text) == want
        assert state_mod.address_texts[text][2] == str(want)
        for network in ("", "net-2"):
            assert address_key(text, network) == address_key(want, network)
        STATE.workload_by_address(text)
        STATE.service_by_vip(text)


def test_the_memo_is_bounded_by_the_state_under_churn() -> None:
    """Addresses of removed records leave the memo: 5,000 snapshots, each with one workload at
    a new address, looked up once each; the memo stays within max(MEMO_FLOOR, 2 x state)."""
    state = STATE
    most = 0
    for i in range(5000):
        ip = f"10.50.{i // 256}.{i % 256}"
        record = parse_workload(_wl(f"churn-{i}", ip, "node-b"))
        state = state.with_updates(upserts=[record], removals=[f"churn-{i - 1}"])
        assert state.workload_by_address(ip) is not None
        most = max(most, state_mod.known_address_texts())
    assert most <= state_mod.MEMO_FLOOR
