"""eBPF capture of pods attached by the CNI `bridge` plugin (veths enslaved to cni0).

Topology, built by exec'ing the REAL containernetworking `bridge` + `host-local` plugins in the
node netns, with the lab's config (`isGateway`, no masquerade, one /24 per node):

    pod1 (ENROLLED)  eth0 10.244.1.x ── vethA ┐
    pod2 (observed)  eth0 10.244.1.y ── vethB ├─ cni0 10.244.1.1/24 (bridge, node netns)
    pod3 (no filter) eth0 10.244.1.z ── vethC ┘
    peer host        eth0 172.30.0.2/24 ── up0 172.30.0.1 (the node's uplink)

The pods share one subnet, so pod -> pod traffic is forwarded by the bridge at L2 and never
reaches the node's IP stack unless our programs send it there. A fresh netns has
`net.bridge.bridge-nf-call-iptables=1` (br_netfilter), whose bridge PRE_ROUTING hook orphans
the socket `bpf_sk_assign` put on the packet at the veth: `test_root_cause` shows that, with the
bridge program removed, the SYN is lost exactly when br_netfilter runs. The datapath tests run
with both settings.

The proxy stand-in, servers and clients are those of `test_ebpf_capture` (same behaviour:
transparent listeners that relay from the ORIGINAL client IP to the ORIGINAL destination).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns
from pyroute2.netlink.exceptions import NetlinkError

from ebpf.maps import decode_port, open_ports
from ebpf.netns import entered
from ebpf.redirect import FILTER_BRIDGE, FILTER_POD, FILTER_UPLINK, CaptureConfig, NodeCapture
from tests.root.test_ebpf_capture import (
    PEER_PORT,
    SERVER_PORT,
    WAIT,
    Conn,
    Proxy,
    Server,
    _veth,
    connect_fails,
    flow_counters,
    fwmark_rules,
    has_clsact,
    ipr_in,
    nft,
    ours,
    sysctl,
    table_routes,
)

TAG = f"ebb{os.getpid() % 100000}"
NODE, POD1, POD2, POD3, PEER = (f"{TAG}{s}" for s in ("node", "pod1", "pod2", "pod3", "peer"))
PEER_IP = "172.30.0.2"
GATEWAY = "10.244.1.1"
PIN_DIR = Path(f"/sys/fs/bpf/ambient-test-{TAG}")
CONFIG = CaptureConfig(uplink="up0", bpffs_dir=PIN_DIR)
CNI_PATH = Path("/usr/lib/cni")
BRNF = "net.bridge.bridge-nf-call-iptables"


def brnf(value: str) -> None:
    sysctl(NODE, BRNF, value)


# ------------------------------------------------------------------------ the CNI bridge plugin


def cni_conf(ipam_dir: Path) -> dict[str, Any]:
    """The lab's primary plugin config for `--cni bridge` (ambientctl/lab/topology.py)."""
    return {
        "cniVersion": "1.0.0",
        "name": f"{TAG}net",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": True,
        "ipMasq": False,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.244.1.0/24", "gateway": GATEWAY}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(ipam_dir),
        },
    }


def cni(command: str, pod: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Exec the bridge plugin in the node netns the way a runtime does (CNI spec 1.0.0)."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod,
        "CNI_NETNS": f"/var/run/netns/{pod}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(CNI_PATH),
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    res = subprocess.run(
        ["nsenter", f"--net=/var/run/netns/{NODE}", str(CNI_PATH / "bridge")],
        input=json.dumps(conf),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0:
        raise AssertionError(f"CNI {command} {pod}: {res.stdout} {res.stderr}")
    return json.loads(res.stdout) if res.stdout.strip() else {}


class Pod:
    def __init__(self, ns: str, result: dict[str, Any]) -> None:
        self.ns = ns
        ifaces = result["interfaces"]
        # The bridge plugin reports [bridge, host veth, container interface].
        assert ifaces[0]["name"] == "cni0", ifaces
        assert ifaces[2]["name"] == "eth0", ifaces
        self.veth = str(ifaces[1]["name"])
        self.ip = str(result["ips"][0]["address"]).split("/")[0]


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Pod]]:
    if os.geteuid() != 0:  # same policy as conftest's autouse check (which runs after us)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("kernel tests must run as root in CI")
        pytest.skip("needs root (runs in CI)")
    if not (CNI_PATH / "bridge").exists() or not (CNI_PATH / "host-local").exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("containernetworking-plugins missing (scripts/setup installs it)")
        pytest.skip("needs containernetworking-plugins")
    ipam_dir = tmp_path_factory.mktemp("ipam")
    conf = cni_conf(ipam_dir)
    made: list[str] = []
    added: list[str] = []
    try:
        for ns in (NODE, POD1, POD2, POD3, PEER):
            netns.create(ns)
            made.append(ns)
        with ipr_in(NODE) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            _veth(ipr, "up0", PEER, "172.30.0.1", PEER_IP)
        pods = {}
        for name, ns in (("pod1", POD1), ("pod2", POD2), ("pod3", POD3)):
            result = cni("ADD", ns, conf)
            added.append(ns)
            pods[name] = Pod(ns, result)
        yield pods
    finally:
        for ns in reversed(added):
            with contextlib.suppress(AssertionError, subprocess.SubprocessError):
                cni("DEL", ns, conf)
        for ns in made:
            with contextlib.suppress(OSError):
                netns.remove(ns)
        shutil.rmtree(ipam_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def servers(lab: dict[str, Pod]) -> Iterator[dict[str, Server]]:
    made = {"peer": Server(PEER, "peer", PEER_PORT)}
    for name, pod in lab.items():
        made[name] = Server(pod.ns, name, SERVER_PORT)
    try:
        yield made
    finally:
        for s in made.values():
            s.close()


def enroll_all(cap: NodeCapture, pods: dict[str, Pod]) -> None:
    cap.enroll(uid="uid-pod1", ip=pods["pod1"].ip, host_ifname=pods["pod1"].veth)
    cap.observe(ip=pods["pod2"].ip, host_ifname=pods["pod2"].veth)
    # pod3 is neither: a pod the agent does not know about has no filter at all.


@pytest.fixture(scope="module")
def capture(lab: dict[str, Pod]) -> Iterator[NodeCapture]:
    cap = NodeCapture(CONFIG, netns=NODE)
    try:
        cap.install()  # the module's single compile
        enroll_all(cap, lab)
        yield cap
    finally:
        cap.uninstall()


@pytest.fixture(scope="module")
def proxy(capture: NodeCapture, servers: dict[str, Server]) -> Iterator[Proxy]:
    p = Proxy(NODE)
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture
def px(proxy: Proxy) -> Iterator[Proxy]:
    """The running proxy, empty event queue, br_netfilter back on (the netns default) after."""
    if proxy.proc is None:
        proxy.start()
    proxy.drain()
    try:
        yield proxy
    finally:
        brnf("1")


@pytest.fixture(params=["1", "0"], ids=["br_netfilter", "no_br_netfilter"])
def bridge_nf(request: pytest.FixtureRequest, px: Proxy) -> str:
    value = str(request.param)
    brnf(value)
    return value


def ifindex(ns: str, ifname: str) -> int:
    with ipr_in(ns) as ipr:
        return int(ipr.link_lookup(ifname=ifname)[0])


@contextlib.contextmanager
def client_port_watch(ns: str, client: Pod) -> Iterator[tuple[Any, Any]]:
    """An nft counter in `ns` (the destination pod) of frames sent by `client` itself: its
    eth0 MAC as source and its socket's port. Yields (on_bound for `Conn`, read()). Through
    the proxy, the pod only ever gets the proxy's upstream connection, in frames the bridge
    device sends (source MAC cni0's): a non-zero count means the client reached it directly."""
    with ipr_in(client.ns) as ipr:
        (eth0,) = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])
        mac = eth0.get_attr("IFLA_ADDRESS")
    table = f"amport{os.getpid() % 100000}"

    def on_bound(port: int) -> None:
        nft(
            ns,
            "-f",
            "-",
            stdin=f"table ip {table} {{\n chain pre {{\n"
            "  type filter hook prerouting priority -400; policy accept;\n"
            f"  ether saddr {mac} tcp sport {port} counter\n }}\n}}\n",
        )

    def read() -> int:
        listing = json.loads(nft(ns, "-j", "list", "table", "ip", table))
        (rule,) = (e["rule"] for e in listing["nftables"] if "rule" in e)
        return int(rule["expr"][-1]["counter"]["packets"])

    try:
        yield on_bound, read
    finally:
        with contextlib.suppress(AssertionError):
            nft(ns, "delete", "table", "ip", table)


def remove_bridge_filter() -> None:
    """Fault injection: take our filter off cni0 (a reconcile, `install()`, puts it back)."""
    with ipr_in(NODE) as ipr:
        idx = ipr.link_lookup(ifname="cni0")[0]
        ipr.tc("del-filter", "bpf", idx, ":1", parent="ffff:fff2", prio=CONFIG.tc_priority)


# ------------------------------------------------------------------------ tests: state


def test_cni_bridge_topology(lab: dict[str, Pod]) -> None:
    """What the plugin built: the thing this module is about."""
    with ipr_in(NODE) as ipr:
        (br,) = ipr.get_links(ipr.link_lookup(ifname="cni0")[0])
        assert br.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "bridge"
        addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=br["index"])}
        assert GATEWAY in addrs
        for pod in lab.values():
            (veth,) = ipr.get_links(ipr.link_lookup(ifname=pod.veth)[0])
            assert veth.get_attr("IFLA_MASTER") == br["index"]
    assert len({p.ip for p in lab.values()}) == 3
    assert all(p.ip.startswith("10.244.1.") for p in lab.values())
    with entered(NODE), open(f"/proc/sys/{BRNF.replace('.', '/')}") as f:
        assert f.read().strip() == "1"  # br_netfilter is on in a fresh netns


def test_install_attaches_to_the_bridge(
    capture: NodeCapture, lab: dict[str, Pod], px: Proxy
) -> None:
    p1, p2, p3 = lab["pod1"], lab["pod2"], lab["pod3"]
    cni0 = ifindex(NODE, "cni0")
    # A flow established before a reconcile keeps going through it.
    c = Conn(p1.ns, (PEER_IP, PEER_PORT))
    try:
        assert px.accept()["port"] == 15001
        assert c.echo(b"before") == b"before"
        NodeCapture(CONFIG, netns=NODE).install()  # a restarted agent: recompile + re-attach
        NodeCapture(CONFIG, netns=NODE).install()  # idempotent
        assert c.echo(b"after") == b"after"
    finally:
        c.close()
    assert ours(NODE, "cni0") == [FILTER_BRIDGE]
    assert ours(NODE, p1.veth) == [FILTER_POD]
    assert ours(NODE, p2.veth) == [FILTER_POD]
    assert ours(NODE, p3.veth) == []
    assert ours(NODE, "up0") == [FILTER_UPLINK]
    assert capture.enrolled()[p1.ip].bridge_ifindex == cni0
    assert capture.observed()[p2.ip].bridge_ifindex == cni0
    with ipr_in(NODE) as ipr:
        (br,) = ipr.get_links(cni0)
        mac = br.get_attr("IFLA_ADDRESS")
    with open_ports(PIN_DIR) as ports:
        recs = [decode_port(k, v) for k in ports.all_keys() if (v := ports.lookup(k)) is not None]
    assert {(r.ifindex, r.bridge_ifindex, r.mac) for r in recs} == {
        (ifindex(NODE, p1.veth), cni0, mac),
        (ifindex(NODE, p2.veth), cni0, mac),
    }


def test_root_cause_br_netfilter_orphans_the_assignment(
    capture: NodeCapture, lab: dict[str, Pod], px: Proxy
) -> None:
    """Fault injection: without the bridge program, the veth's assignment (counted `outbound`)
    reaches the IP stack only if br_netfilter does not run (its PRE_ROUTING hook orphans the
    skb). With it, the SYN is lost: no SYN-ACK, no RST, the client times out."""
    p1 = lab["pod1"]
    remove_bridge_filter()
    try:
        before = capture.stats()
        brnf("1")
        with entered(p1.ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1.0)
        with s, pytest.raises(TimeoutError):  # not refused: no RST came back either
            s.connect((PEER_IP, PEER_PORT))
        mid = capture.stats()
        assert mid["outbound"] > before["outbound"]  # assigned at the veth ...
        assert mid["bridge"] == before["bridge"]  # ... and nothing re-assigned it
        brnf("0")
        c = Conn(p1.ns, (PEER_IP, PEER_PORT))  # the same path works without br_netfilter
        try:
            assert px.accept()["port"] == 15001
            assert c.hello["peer"][0] == p1.ip
        finally:
            c.close()
    finally:
        brnf("1")
        capture.install()  # the reconcile puts the bridge filter back
    assert ours(NODE, "cni0") == [FILTER_BRIDGE]


# ------------------------------------------------------------------------ tests: datapath


def test_outbound_capture_keeps_original_destination(
    capture: NodeCapture, lab: dict[str, Pod], bridge_nf: str, px: Proxy
) -> None:
    p1 = lab["pod1"]
    before = capture.stats()
    with flow_counters(NODE, p1.ip, PEER_PORT) as counts:
        c = Conn(p1.ns, (PEER_IP, PEER_PORT))
        try:
            ev = px.accept()
            assert ev["port"] == 15001
            assert tuple(ev["local"]) == (PEER_IP, PEER_PORT)  # original destination
            assert ev["peer"][0] == p1.ip
            assert tuple(c.sock.getsockname()) == tuple(ev["peer"])
            # The proxy's upstream left from pod1's IP; the peer's replies came back to it.
            assert c.hello["server"] == "peer"
            assert c.hello["peer"][0] == p1.ip
            assert c.echo(b"x" * 100_000) == b"x" * 100_000
        finally:
            c.close()
        seen = counts()
    assert seen["marked"] > 0  # the positive control of test_unenrolled_pods_untouched
    after = capture.stats()
    assert after["outbound"] == before["outbound"] + 1
    assert after["bridge"] > before["bridge"]
    assert after["assign_error"] == before["assign_error"]


def test_inbound_from_uplink_to_bridge_pod(
    capture: NodeCapture, lab: dict[str, Pod], px: Proxy
) -> None:
    p1, p2 = lab["pod1"], lab["pod2"]
    c = Conn(PEER, (p1.ip, SERVER_PORT))
    try:
        ev = px.accept()
        assert ev["port"] == 15006
        assert tuple(ev["local"]) == (p1.ip, SERVER_PORT)
        assert ev["peer"][0] == PEER_IP
        # The proxy reached pod1 (behind cni0) from the ORIGINAL client IP; pod1's replies
        # crossed its veth and the bridge back to the proxy's socket.
        assert c.hello["server"] == "pod1"
        assert c.hello["peer"][0] == PEER_IP
        assert c.echo(b"inbound" * 1000) == b"inbound" * 1000
    finally:
        c.close()
    with entered(PEER):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    try:
        s.connect((p1.ip, 15008))
        ev = px.accept()
        assert ev["port"] == 15008
        assert tuple(ev["local"]) == (p1.ip, 15008)
    finally:
        s.close()
    c2 = Conn(PEER, (p2.ip, SERVER_PORT))  # a non-mesh pod is reached directly
    try:
        assert c2.hello["server"] == "pod2"
        assert c2.hello["peer"][0] == PEER_IP
    finally:
        c2.close()
    assert px.quiet()


def test_same_node_non_mesh_to_mesh_goes_inbound(
    capture: NodeCapture, lab: dict[str, Pod], bridge_nf: str, px: Proxy
) -> None:
    """pod2 -> pod1 on the same bridge and subnet: an L2 frame to pod1's MAC, which the bridge
    would forward straight to pod1 (bypassing the mesh) unless it is sent up to the node."""
    p1, p2 = lab["pod1"], lab["pod2"]
    with client_port_watch(p1.ns, p2) as (on_bound, direct):
        c = Conn(p2.ns, (p1.ip, SERVER_PORT), on_bound=on_bound)
        try:
            ev = px.accept()
            assert ev["port"] == 15006
            assert tuple(ev["local"]) == (p1.ip, SERVER_PORT)
            assert ev["peer"] == list(c.sock.getsockname())
            assert c.hello["server"] == "pod1"
            assert c.hello["peer"][0] == p2.ip
            assert c.echo(b"same-node") == b"same-node"
        finally:
            c.close()
        assert direct() == 0  # no frame of the client's reached pod1's netns


def test_mesh_to_same_node_pod_goes_outbound(
    capture: NodeCapture, lab: dict[str, Pod], bridge_nf: str, px: Proxy
) -> None:
    """pod1 -> pod2 on the same bridge: captured at 15001, and the proxy's original-source
    connection to pod2 gets pod2's replies (addressed to pod1's MAC) back through the node."""
    p1, p2 = lab["pod1"], lab["pod2"]
    with client_port_watch(p2.ns, p1) as (on_bound, direct):
        c = Conn(p1.ns, (p2.ip, SERVER_PORT), on_bound=on_bound)
        try:
            ev = px.accept()
            assert ev["port"] == 15001
            assert tuple(ev["local"]) == (p2.ip, SERVER_PORT)
            assert ev["peer"] == list(c.sock.getsockname())
            assert c.hello["server"] == "pod2"
            assert c.hello["peer"][0] == p1.ip
            assert c.echo(b"to-pod2" * 1000) == b"to-pod2" * 1000
        finally:
            c.close()
        assert direct() == 0  # no frame of the client's reached pod2's netns


def test_unenrolled_pods_untouched(capture: NodeCapture, lab: dict[str, Pod], px: Proxy) -> None:
    p2, p3 = lab["pod2"], lab["pod3"]
    before = capture.stats()
    with flow_counters(NODE, p2.ip, PEER_PORT) as counts:
        c = Conn(p2.ns, (PEER_IP, PEER_PORT))  # observed pod -> outside
        try:
            assert c.hello["server"] == "peer"
            assert tuple(c.hello["peer"]) == tuple(c.sock.getsockname())  # direct
            assert c.echo(b"plain") == b"plain"
        finally:
            c.close()
        seen = counts()
    assert seen["marked"] == 0, seen
    assert seen["out"] >= 3, seen
    assert seen["back"] >= 3, seen
    for ns, dst, server in (
        (p2.ns, (p3.ip, SERVER_PORT), "pod3"),  # observed -> unknown pod, bridged at L2
        (p3.ns, (p2.ip, SERVER_PORT), "pod2"),
        (p3.ns, (PEER_IP, PEER_PORT), "peer"),  # no filter at all
    ):
        c = Conn(ns, dst)
        try:
            assert c.hello["server"] == server
            assert tuple(c.hello["peer"]) == tuple(c.sock.getsockname())
        finally:
            c.close()
    assert px.quiet()
    after = capture.stats()
    for key in ("outbound", "inbound", "hbone", "no_listener_drop", "spoof_drop"):
        assert after[key] == before[key], key


def test_fail_closed_on_the_bridge(capture: NodeCapture, lab: dict[str, Pod], proxy: Proxy) -> None:
    p1, p2 = lab["pod1"], lab["pod2"]
    proxy.stop()
    try:
        before = capture.stats()
        assert connect_fails(p1.ns, (PEER_IP, PEER_PORT))  # enrolled outbound
        assert connect_fails(p2.ns, (p1.ip, SERVER_PORT))  # no L2 shortcut to pod1
        assert connect_fails(p1.ns, (p2.ip, SERVER_PORT))  # nor from it
        assert connect_fails(PEER, (p1.ip, SERVER_PORT))
        assert capture.stats()["no_listener_drop"] >= before["no_listener_drop"] + 4
        c = Conn(p2.ns, (PEER_IP, PEER_PORT))  # non-mesh: unaffected
        try:
            assert tuple(c.hello["peer"]) == tuple(c.sock.getsockname())
        finally:
            c.close()
    finally:
        proxy.start()


def test_unenroll_releases_the_bridge_last(
    capture: NodeCapture, lab: dict[str, Pod], px: Proxy
) -> None:
    p1, p2 = lab["pod1"], lab["pod2"]
    try:
        capture.unenroll(ip=p1.ip)
        assert ours(NODE, p1.veth) == []
        assert not has_clsact(NODE, p1.veth)
        assert ours(NODE, "cni0") == [FILTER_BRIDGE]  # pod2's veth still relies on it
        capture.unenroll(ip=p2.ip)
        assert ours(NODE, "cni0") == []
        assert not has_clsact(NODE, "cni0")
        with open_ports(PIN_DIR) as ports:
            assert list(ports.all_keys()) == []
        c = Conn(p1.ns, (p2.ip, SERVER_PORT))  # released: direct
        try:
            assert tuple(c.hello["peer"]) == tuple(c.sock.getsockname())
        finally:
            c.close()
        assert px.quiet()
    finally:
        enroll_all(capture, lab)
    assert ours(NODE, "cni0") == [FILTER_BRIDGE]
    c = Conn(p1.ns, (p2.ip, SERVER_PORT))  # captured again
    try:
        assert px.accept()["port"] == 15001
    finally:
        c.close()


def test_uninstall_leaves_nothing(capture: NodeCapture, lab: dict[str, Pod], px: Proxy) -> None:
    try:
        capture.uninstall()
        capture.uninstall()  # idempotent
        for ifname in ("cni0", "up0", *(p.veth for p in lab.values())):
            assert ours(NODE, ifname) == [], ifname
            assert not has_clsact(NODE, ifname), ifname
        assert fwmark_rules(NODE) == []
        assert table_routes(NODE, 100) == []
        assert "ambient_mesh" not in nft(NODE, "list", "tables")
        assert not PIN_DIR.exists()
        c = Conn(lab["pod1"].ns, (PEER_IP, PEER_PORT))
        try:
            assert tuple(c.hello["peer"]) == tuple(c.sock.getsockname())
        finally:
            c.close()
        assert px.quiet()
    finally:
        with contextlib.suppress(NetlinkError):
            capture.install()
            enroll_all(capture, lab)
