"""eBPF capture against the real kernel: a node netns, two pod netns and a peer host.

Topology (all addresses private and only inside these namespaces):

    pod1 (ENROLLED)  eth0 10.244.1.2/24 ── vp1 10.244.1.1 ┐
    pod2 (observed)  eth0 10.244.2.2/24 ── vp2 10.244.2.1 ├─ node netns (ip_forward=1, proxy here)
    peer host        eth0 172.30.0.2/24 ── up0 172.30.0.1 ┘  up0 = the node's uplink

The node proxy stand-in is a subprocess started with `nsenter --net=/var/run/netns/<node>` (not
`ip netns exec`, which remounts /sys and hides bpffs) running this file in "proxy" mode:
IP_TRANSPARENT listeners on 15001/15006/15008 that report getsockname()/getpeername() of every
accepted connection, then connect to the original destination FROM THE ORIGINAL CLIENT IP
(IP_TRANSPARENT + bind((client_ip, 0))) and relay. Servers in pod1/pod2/peer greet each connection
with a JSON line saying what they saw, then echo. Clients and servers are sockets made inside the
namespaces by this process (per-thread setns, `ebpf.netns.entered`).

The programs are compiled once per module (module-scoped `capture`); tests that change the
capture state restore it in `finally`. Every namespace is removed at module teardown, even on
failure, and every network wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

IP_TRANSPARENT = 19  # linux/in.h


# ------------------------------------------------------------------------ proxy stand-in (child)


def _relay(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _proxy_main(ports: list[int]) -> int:
    """Runs in the node netns. One line of JSON per event on stdout."""
    lock = threading.Lock()

    def emit(**event: Any) -> None:
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def handle(conn: socket.socket, port: int) -> None:
        local, peer = conn.getsockname(), conn.getpeername()
        emit(event="accept", port=port, local=list(local), peer=list(peer))
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        up.settimeout(3)
        try:
            up.bind((peer[0], 0))  # the ORIGINAL client's IP as source
            up.connect(local)  # the ORIGINAL destination
        except OSError as exc:
            emit(event="upstream_error", port=port, error=str(exc))
            conn.close()
            up.close()
            return
        emit(event="upstream", port=port, local=list(up.getsockname()))
        conn.settimeout(30)
        up.settimeout(30)
        t = threading.Thread(target=_relay, args=(up, conn), daemon=True)
        t.start()
        _relay(conn, up)
        t.join(30)
        conn.close()
        up.close()

    def serve(ls: socket.socket, port: int) -> None:
        while True:
            conn, _ = ls.accept()
            threading.Thread(target=handle, args=(conn, port), daemon=True).start()

    for port in ports:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        ls.bind(("0.0.0.0", port))
        ls.listen(64)
        threading.Thread(target=serve, args=(ls, port), daemon=True).start()
    emit(event="ready")
    threading.Event().wait()  # until killed
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["proxy"]:
        sys.exit(_proxy_main([int(p) for p in sys.argv[2:]]))
    sys.exit(f"usage: {sys.argv[0]} proxy PORT...")


# ------------------------------------------------------------------------ the tests

import pytest  # noqa: E402
from pyroute2 import IPRoute, netns  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

from ebpf.errors import (  # noqa: E402
    CaptureError,
    InterfaceNotFoundError,
    NotInstalledError,
)
from ebpf.netns import entered  # noqa: E402
from ebpf.redirect import (  # noqa: E402
    FILTER_POD,
    FILTER_UPLINK,
    CaptureConfig,
    NodeCapture,
)
from meshcore.errors import ConfigError  # noqa: E402

TAG = f"eb{os.getpid() % 100000}"
NODE, POD1, POD2, PEER = (f"{TAG}{s}" for s in ("node", "pod1", "pod2", "peer"))
POD1_IP, POD2_IP, PEER_IP = "10.244.1.2", "10.244.2.2", "172.30.0.2"
VIP = "10.96.0.10"
SERVER_PORT = 8080  # pod servers
PEER_PORT = 9000  # peer host server
UDP_PORT = 9999
PIN_DIR = Path(f"/sys/fs/bpf/ambient-test-{TAG}")
CONFIG = CaptureConfig(uplink="up0", bpffs_dir=PIN_DIR)
WAIT = 5.0  # bound on every "should happen" network wait
SHORT = 0.4  # bound on every "should NOT happen" wait


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    """The nft CLI in a netns (test-side inspection/fixtures only; ebpf/ itself uses netlink)."""
    res = subprocess.run(
        ["nsenter", f"--net=/var/run/netns/{ns}", "nft", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=10,
    )
    if res.returncode != 0:
        raise AssertionError(f"nft {args}: {res.stderr}")
    return res.stdout


def sysctl(ns: str, key: str, value: str) -> None:
    with entered(ns), open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
        f.write(value)


@contextlib.contextmanager
def ipr_in(ns: str) -> Iterator[Any]:
    with entered(ns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


@contextlib.contextmanager
def flow_counters(ns: str, pod_ip: str, port: int) -> Iterator[Any]:
    """nft counters in `ns` for the TCP flow(s) between `pod_ip` and remote `port`: `out`
    (pod -> port), `back` (port -> pod) and `marked` (either direction, carrying our mark bit
    0x400, i.e. steered by our programs). Yields a function reading them."""
    table = f"amflow{os.getpid() % 100000}"
    rules = {
        "out": f"ip saddr {pod_ip} tcp dport {port}",
        "back": f"ip daddr {pod_ip} tcp sport {port}",
        "marked_out": f"ip saddr {pod_ip} tcp dport {port} meta mark & 0x400 == 0x400",
        "marked_back": f"ip daddr {pod_ip} tcp sport {port} meta mark & 0x400 == 0x400",
    }
    body = "\n".join(f'{r} counter comment "{k}"' for k, r in rules.items())
    nft(
        ns,
        "-f",
        "-",
        stdin=f"table ip {table} {{\n chain pre {{\n"
        f"  type filter hook prerouting priority -400; policy accept;\n{body}\n }}\n}}\n",
    )

    def read() -> dict[str, int]:
        listing = json.loads(nft(ns, "-j", "list", "table", "ip", table))
        got = {
            e["rule"]["comment"]: e["rule"]["expr"][-1]["counter"]["packets"]
            for e in listing["nftables"]
            if "rule" in e
        }
        return {
            "out": got["out"],
            "back": got["back"],
            "marked": got["marked_out"] + got["marked_back"],
        }

    try:
        yield read
    finally:
        nft(ns, "delete", "table", "ip", table)


# ------------------------------------------------------------------------ sockets in namespaces


class Server:
    """TCP greeter+echo (and optional UDP sink) living in a namespace, on threads."""

    def __init__(self, ns: str, name: str, port: int, *, udp: int | None = None) -> None:
        self.name = name
        with entered(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if udp else None
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(64)
        self.datagrams: queue.Queue[tuple[bytes, str]] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()
        if self.udp is not None:
            self.udp.bind(("0.0.0.0", udp or 0))
            threading.Thread(target=self._udp, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        hello = {"server": self.name, "local": conn.getsockname(), "peer": conn.getpeername()}
        with contextlib.suppress(OSError):
            conn.sendall((json.dumps(hello) + "\n").encode())
            while data := conn.recv(65536):
                conn.sendall(data)
        conn.close()

    def _udp(self) -> None:
        assert self.udp is not None
        while True:
            try:
                data, addr = self.udp.recvfrom(2048)
            except OSError:
                return
            if addr is None:  # shut down
                return
            self.datagrams.put((data, addr[0]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self.udp is not None:
            with contextlib.suppress(OSError):
                self.udp.shutdown(socket.SHUT_RDWR)
            self.udp.close()


class Conn:
    """A client connection made from inside a namespace; `hello` is the server's greeting."""

    def __init__(
        self,
        ns: str,
        dst: tuple[str, int],
        *,
        timeout: float = WAIT,
        on_bound: Callable[[int], None] | None = None,
    ) -> None:
        with entered(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            if on_bound is not None:  # the client's port, known before its first packet
                self.sock.bind(("0.0.0.0", 0))
                on_bound(self.sock.getsockname()[1])
            self.sock.connect(dst)
            self.reader = self.sock.makefile("rb")
            line = self.reader.readline()
        except BaseException:
            self.sock.close()
            raise
        if not line:
            self.sock.close()
            raise ConnectionError(f"{dst}: closed before greeting")
        self.hello: dict[str, Any] = json.loads(line)

    def echo(self, payload: bytes) -> bytes:
        self.sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = self.reader.read1(len(payload) - len(got))
            if not chunk:
                break
            got += chunk
        return got

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def connect_fails(ns: str, dst: tuple[str, int], timeout: float = 1.0) -> bool:
    """True if a TCP connect from `ns` gets no answer within `timeout` (SYN dropped)."""
    with entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(dst)
    except (TimeoutError, OSError):
        return True
    finally:
        s.close()
    return False


class Proxy:
    """The node proxy stand-in subprocess (in the node netns) and its event stream."""

    def __init__(self, node: str | None = None) -> None:
        self.node = node or NODE
        self.proc: subprocess.Popen[str] | None = None
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()

    def start(self, ports: tuple[int, ...] = (15001, 15006, 15008)) -> None:
        assert self.proc is None
        self.events = queue.Queue()
        self.proc = subprocess.Popen(
            [
                "nsenter",
                f"--net=/var/run/netns/{self.node}",
                sys.executable,
                __file__,
                "proxy",
                *map(str, ports),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        events, out = self.events, self.proc.stdout
        assert out is not None

        def pump() -> None:
            for line in out:
                events.put(json.loads(line))

        threading.Thread(target=pump, daemon=True).start()
        assert self.next(timeout=15)["event"] == "ready"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.events.get_nowait()

    def next(self, timeout: float = WAIT) -> dict[str, Any]:
        return self.events.get(timeout=timeout)

    def accept(self, timeout: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = self.next(max(0.01, deadline - time.monotonic()))
            if ev["event"] == "accept":
                return ev

    def quiet(self, timeout: float = SHORT) -> bool:
        """True if the proxy accepted nothing within `timeout`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                if self.events.get(timeout=left)["event"] == "accept":
                    return False
            except queue.Empty:
                return True
        return True


# ------------------------------------------------------------------------ fixtures


def _veth(ipr: Any, host: str, ns: str, host_ip: str, pod_ip: str) -> None:
    """A veth pair `host` <-> eth0 in `ns`; the pod's default route is via `host_ip`."""
    ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
    idx = ipr.link_lookup(ifname=host)[0]
    ipr.addr("add", index=idx, address=host_ip, prefixlen=24)
    ipr.link("set", index=idx, state="up")
    with ipr_in(ns) as pod:
        eth0 = pod.link_lookup(ifname="eth0")[0]
        pod.addr("add", index=eth0, address=pod_ip, prefixlen=24)
        pod.link("set", index=eth0, state="up")
        pod.link("set", index=pod.link_lookup(ifname="lo")[0], state="up")
        pod.route("add", dst="0.0.0.0/0", gateway=host_ip)


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    if os.geteuid() != 0:  # same policy as conftest's autouse check (which runs after us)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("kernel tests must run as root in CI")
        pytest.skip("needs root (runs in CI)")
    made: list[str] = []
    try:
        for ns in (NODE, POD1, POD2, PEER):
            netns.create(ns)
            made.append(ns)
        with ipr_in(NODE) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            _veth(ipr, "up0", PEER, "172.30.0.1", PEER_IP)
            _veth(ipr, "vp1", POD1, "10.244.1.1", POD1_IP)
            _veth(ipr, "vp2", POD2, "10.244.2.1", POD2_IP)
        sysctl(NODE, "net.ipv4.ip_forward", "1")
        yield
    finally:
        for ns in made:
            with contextlib.suppress(OSError):
                netns.remove(ns)


@pytest.fixture(scope="module")
def servers(lab: None) -> Iterator[dict[str, Server]]:
    made = {
        "peer": Server(PEER, "peer", PEER_PORT, udp=UDP_PORT),
        "pod1": Server(POD1, "pod1", SERVER_PORT),
        "pod2": Server(POD2, "pod2", SERVER_PORT),
    }
    try:
        yield made
    finally:
        for s in made.values():
            s.close()


@pytest.fixture(scope="module")
def capture(lab: None) -> Iterator[NodeCapture]:
    cap = NodeCapture(CONFIG, netns=NODE)
    try:
        cap.install()  # the module's single compile
        cap.enroll(uid="uid-pod1", ip=POD1_IP, host_ifname="vp1")
        cap.observe(ip=POD2_IP, host_ifname="vp2")
        yield cap
    finally:
        cap.uninstall()


@pytest.fixture(scope="module")
def proxy(capture: NodeCapture, servers: dict[str, Server]) -> Iterator[Proxy]:
    p = Proxy()
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture
def px(proxy: Proxy) -> Proxy:
    """The running proxy with an empty event queue (restarted if a test stopped it)."""
    if proxy.proc is None:
        proxy.start()
    proxy.drain()
    return proxy


def ours(ns: str, ifname: str) -> list[str]:
    """Names of the bpf filters on `ifname`'s clsact ingress (empty if no clsact)."""
    with ipr_in(ns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        try:
            msgs = ipr.get_filters(index=idx, parent=0xFFFFFFF2)
        except NetlinkError:
            return []
        out = []
        for m in msgs:
            opts = m.get_attr("TCA_OPTIONS")  # None on the per-priority header entry
            if m.get_attr("TCA_KIND") == "bpf" and opts is not None:
                out.append(opts.get_attr("TCA_BPF_NAME"))
        return out


def has_clsact(ns: str, ifname: str) -> bool:
    with ipr_in(ns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx))


def fwmark_rules(ns: str) -> list[tuple[int, int, int]]:
    with ipr_in(ns) as ipr:
        return [
            (r.get_attr("FRA_FWMARK"), r.get_attr("FRA_FWMASK"), r.get_attr("FRA_PRIORITY"))
            for r in ipr.get_rules(family=socket.AF_INET)
            if r.get_attr("FRA_FWMARK") is not None
        ]


def table_routes(ns: str, table: int) -> list[Any]:
    with ipr_in(ns) as ipr:
        return list(ipr.get_routes(family=socket.AF_INET, table=table))


# ------------------------------------------------------------------------ tests: state


def test_install_is_idempotent_and_complete(capture: NodeCapture) -> None:
    capture.install()  # second install (a reconcile) must not stack anything
    assert ours(NODE, "up0") == [FILTER_UPLINK]
    assert ours(NODE, "vp1") == [FILTER_POD]
    assert ours(NODE, "vp2") == [FILTER_POD]
    assert fwmark_rules(NODE) == [(0x400, 0x400, 100)]
    routes = table_routes(NODE, 100)
    assert len(routes) == 1
    assert routes[0]["type"] == 2  # RTN_LOCAL
    assert "meta mark & 0x00000400 == 0x00000400 notrack" in nft(
        NODE, "list", "table", "ip", "ambient_mesh"
    )
    assert {p.name for p in PIN_DIR.iterdir()} == {
        "capture_pod",
        "capture_uplink",
        "capture_bridge",
        "pods",
        "config",
        "stats",
        "ports",
    }
    assert set(capture.enrolled()) == {POD1_IP}
    assert capture.enrolled()[POD1_IP].host_ifname == "vp1"
    assert set(capture.observed()) == {POD2_IP}


def test_api_errors(capture: NodeCapture) -> None:
    with pytest.raises(CaptureError) as exc:
        capture.enroll(uid="x", ip="fd00::1", host_ifname="vp1")
    assert exc.value.errno == 97  # EAFNOSUPPORT: IPv6 is not done
    with pytest.raises(InterfaceNotFoundError) as nf:
        capture.enroll(uid="x", ip="10.244.9.9", host_ifname="nosuchif")
    assert nf.value.errno == 19  # ENODEV
    assert "10.244.9.9" not in capture.enrolled()
    fresh = NodeCapture(
        replace(CONFIG, bpffs_dir=PIN_DIR.with_name(PIN_DIR.name + "-none")), netns=NODE
    )
    with pytest.raises(NotInstalledError):
        fresh.enroll(uid="x", ip="10.244.9.9", host_ifname="vp1")
    fresh.unenroll(ip="10.244.9.9")  # nothing installed: a no-op
    capture.unenroll(ip="10.244.9.9")  # not enrolled: a no-op
    with pytest.raises(ConfigError):
        CaptureConfig(uplink="up0", mark=0x800, mark_mask=0x400)
    with pytest.raises(ConfigError):
        CaptureConfig(uplink="up0", route_table=254)


# ------------------------------------------------------------------------ tests: datapath


def test_outbound_capture_keeps_original_destination(capture: NodeCapture, px: Proxy) -> None:
    before = capture.stats()
    c = Conn(POD1, (PEER_IP, PEER_PORT))
    try:
        ev = px.accept()
        assert ev["port"] == 15001
        assert tuple(ev["local"]) == (PEER_IP, PEER_PORT)  # original destination preserved
        assert ev["peer"][0] == POD1_IP
        assert tuple(c.sock.getsockname()) == tuple(ev["peer"])
        # The proxy's upstream went out from the pod's IP; the peer's replies (arriving on the
        # uplink, addressed to the pod) were steered back to the proxy's socket.
        assert c.hello["server"] == "peer"
        assert c.hello["peer"][0] == POD1_IP
        assert c.echo(b"x" * 100_000) == b"x" * 100_000
    finally:
        c.close()
    after = capture.stats()
    assert after["outbound"] == before["outbound"] + 1
    assert after["established"] > before["established"]


def test_unenrolled_pod_untouched(capture: NodeCapture, px: Proxy) -> None:
    # The datapath counters are per node: late packets of earlier tests' connections (FIN/ACK,
    # TIME_WAIT) may bump `established` at any time, so this pod's own traffic is measured by
    # nft counters that match only its flow (both directions), split by our mark bit: a packet
    # our programs steer to a proxy socket always carries the mark.
    before = capture.stats()
    with flow_counters(NODE, POD2_IP, PEER_PORT) as counts:
        c = Conn(POD2, (PEER_IP, PEER_PORT))
        try:
            assert c.hello["server"] == "peer"
            assert tuple(c.hello["peer"]) == tuple(c.sock.getsockname())  # direct, no proxy
            assert c.echo(b"plain") == b"plain"
        finally:
            c.close()
        assert px.quiet()
        seen = counts()
    assert seen["marked"] == 0, seen  # not one packet of it was steered
    assert seen["out"] >= 3, seen
    assert seen["back"] >= 3, seen  # the counters did see the flow
    after = capture.stats()
    for key in ("outbound", "inbound", "hbone"):  # only new steered SYNs move these
        assert after[key] == before[key], key


def test_inbound_from_uplink_plaintext_and_hbone(capture: NodeCapture, px: Proxy) -> None:
    c = Conn(PEER, (POD1_IP, SERVER_PORT))
    try:
        ev = px.accept()
        assert ev["port"] == 15006
        assert tuple(ev["local"]) == (POD1_IP, SERVER_PORT)
        assert ev["peer"][0] == PEER_IP
        # The proxy connected to pod1 with the ORIGINAL client's IP; pod1's replies came back
        # through the established lookup on vp1.
        assert c.hello["server"] == "pod1"
        assert c.hello["peer"][0] == PEER_IP
        assert c.echo(b"inbound") == b"inbound"
    finally:
        c.close()
    # HBONE port: accepted by the 15008 listener with the pod's address as local address.
    with entered(PEER):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    try:
        s.connect((POD1_IP, 15008))
        ev = px.accept()
        assert ev["port"] == 15008
        assert tuple(ev["local"]) == (POD1_IP, 15008)
    finally:
        s.close()
    # A non-mesh pod is reached directly from the uplink.
    c2 = Conn(PEER, (POD2_IP, SERVER_PORT))
    try:
        assert c2.hello["server"] == "pod2"
        assert c2.hello["peer"][0] == PEER_IP
    finally:
        c2.close()
    assert px.quiet()


def test_same_node_non_mesh_to_mesh_goes_inbound(capture: NodeCapture, px: Proxy) -> None:
    c = Conn(POD2, (POD1_IP, SERVER_PORT))
    try:
        ev = px.accept()
        assert ev["port"] == 15006
        assert tuple(ev["local"]) == (POD1_IP, SERVER_PORT)
        assert ev["peer"][0] == POD2_IP
        assert c.hello["server"] == "pod1"
        assert c.hello["peer"][0] == POD2_IP
        assert c.echo(b"same-node") == b"same-node"
    finally:
        c.close()


def test_established_survive_agent_restart(capture: NodeCapture, px: Proxy) -> None:
    c = Conn(POD1, (PEER_IP, PEER_PORT))
    try:
        assert px.accept()["port"] == 15001
        assert c.echo(b"before") == b"before"
        # A new agent process: its own NodeCapture, reading the pinned map and re-attaching
        # (no compile: enroll/observe use the pinned program), then exiting.
        code = (
            "from pathlib import Path; from ebpf.redirect import CaptureConfig, NodeCapture;"
            f"cap = NodeCapture(CaptureConfig(uplink='up0', bpffs_dir=Path('{PIN_DIR}')),"
            f" netns='{NODE}');"
            "assert set(cap.enrolled()) == {'%s'}, cap.enrolled();"
            "cap.enroll(uid='uid-pod2', ip='%s', host_ifname='vp2')" % (POD1_IP, POD2_IP)
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert c.echo(b"during") == b"during"
        # The process is gone; programs stay attached and pod2 is now captured by them.
        c2 = Conn(POD2, (PEER_IP, PEER_PORT))
        try:
            ev = px.accept()
            assert ev["port"] == 15001
            assert ev["peer"][0] == POD2_IP
            assert c2.hello["peer"][0] == POD2_IP
        finally:
            c2.close()
        # A restarted agent in this process: drop the object, make a new one, full install
        # (recompile + replace every filter). The established connection keeps flowing.
        restarted = NodeCapture(CONFIG, netns=NODE)
        assert set(restarted.enrolled()) == {POD1_IP, POD2_IP}
        restarted.install()
        assert c.echo(b"after") == b"after"
        assert ours(NODE, "vp1") == [FILTER_POD]
    finally:
        c.close()
        capture.observe(ip=POD2_IP, host_ifname="vp2")
    assert set(capture.enrolled()) == {POD1_IP}


def test_fail_closed_and_fail_open(capture: NodeCapture, proxy: Proxy) -> None:
    proxy.stop()  # no listener on 15001/15006/15008
    before = capture.stats()
    assert connect_fails(POD1, (PEER_IP, PEER_PORT))  # enrolled outbound: dropped
    assert connect_fails(PEER, (POD1_IP, SERVER_PORT))  # inbound to enrolled: dropped
    after = capture.stats()
    assert after["no_listener_drop"] >= before["no_listener_drop"] + 2
    c = Conn(POD2, (PEER_IP, PEER_PORT))  # non-mesh: unaffected
    try:
        assert c.hello["peer"][0] == POD2_IP
    finally:
        c.close()
    open_cap = NodeCapture(replace(CONFIG, fail_closed=False), netns=NODE)
    try:
        open_cap.install()
        c = Conn(POD1, (PEER_IP, PEER_PORT))  # fail-open: goes out directly
        try:
            assert tuple(c.hello["peer"]) == tuple(c.sock.getsockname())
        finally:
            c.close()
        assert capture.stats()["no_listener_pass"] > after["no_listener_pass"]
    finally:
        capture.install()  # back to fail-closed
    assert connect_fails(POD1, (PEER_IP, PEER_PORT))


def test_spoofed_source_dropped(capture: NodeCapture, servers: dict[str, Server]) -> None:
    sink = servers["peer"].datagrams
    spoofs = [(POD1, "10.244.1.99"), (POD1, POD2_IP), (POD2, "10.244.2.99"), (POD2, POD1_IP)]
    added: list[tuple[str, str]] = []
    try:
        for ns, ip in spoofs:
            with ipr_in(ns) as ipr:
                ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=ip, prefixlen=32)
            added.append((ns, ip))
        before = capture.stats()["spoof_drop"]

        def send(ns: str, src: str) -> None:
            with entered(ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with s:
                s.bind((src, 0))
                s.sendto(f"{ns}:{src}".encode(), (PEER_IP, UDP_PORT))

        for ns, ip in spoofs:
            send(ns, ip)
        send(POD1, POD1_IP)  # genuine ones, sent last: they arrive, the spoofed never do
        send(POD2, POD2_IP)
        got: set[str] = set()
        with contextlib.suppress(queue.Empty):
            while len(got) < 2:
                got.add(sink.get(timeout=WAIT)[1])
        with contextlib.suppress(queue.Empty):
            while True:
                got.add(sink.get(timeout=SHORT)[1])
        assert got == {POD1_IP, POD2_IP}
        assert capture.stats()["spoof_drop"] == before + len(spoofs)
    finally:
        for ns, ip in added:
            with ipr_in(ns) as ipr:
                ipr.addr("del", index=ipr.link_lookup(ifname="eth0")[0], address=ip, prefixlen=32)


MARK_SETTER = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
int other_mark(struct __sk_buff *skb) {
    skb->mark |= 0x10000;      /* another component's bit, set before our filter runs */
    return TC_ACT_UNSPEC;      /* continue with the next filter (ours) */
}
"""


def test_other_marks_coexist(capture: NodeCapture, px: Proxy) -> None:
    from bcc import BPF

    bpf = BPF(text=MARK_SETTER.encode())
    fd = bpf.load_func(b"other_mark", BPF.SCHED_CLS).fd
    counters = """
    table ip amtest {
        chain pre {
            type filter hook prerouting priority 0; policy accept;
            ip saddr 10.244.1.2 tcp dport 9000 meta mark 0x00010400 counter
            ip saddr 10.244.2.2 tcp dport 9000 meta mark 0x00010000 counter
        }
    }
    """
    with ipr_in(NODE) as ipr:
        idxs = [ipr.link_lookup(ifname=n)[0] for n in ("vp1", "vp2")]
    try:
        nft(NODE, "-f", "-", stdin=counters)
        with ipr_in(NODE) as ipr:
            for idx in idxs:
                ipr.tc(
                    "add-filter",
                    "bpf",
                    idx,
                    ":1",
                    fd=fd,
                    name="other",
                    parent="ffff:fff2",
                    classid=1,
                    direct_action=True,
                    prio=1,
                )
        c1 = Conn(POD1, (PEER_IP, PEER_PORT))  # captured: other bit kept, ours added
        try:
            assert px.accept()["port"] == 15001
            assert c1.echo(b"m") == b"m"
        finally:
            c1.close()
        c2 = Conn(POD2, (PEER_IP, PEER_PORT))  # not captured: mark untouched (no 0x400)
        c2.close()
        listing = json.loads(nft(NODE, "-j", "list", "table", "ip", "amtest"))
        packets = [
            e["rule"]["expr"][-1]["counter"]["packets"] for e in listing["nftables"] if "rule" in e
        ]
        assert packets[0] >= 3, packets
        assert packets[1] >= 3, packets
    finally:
        with ipr_in(NODE) as ipr:
            for idx in idxs:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del-filter", "bpf", idx, ":1", parent="ffff:fff2", prio=1)
        with contextlib.suppress(AssertionError):
            nft(NODE, "delete", "table", "ip", "amtest")
        bpf.cleanup()
    assert ours(NODE, "vp1") == [FILTER_POD]


def test_dnat_coexistence(capture: NodeCapture, px: Proxy) -> None:
    kube_proxy = f"""
    table ip kubeproxy {{
        chain pre {{
            type nat hook prerouting priority -100; policy accept;
            ip daddr {VIP} tcp dport 80 dnat to {PEER_IP}:{PEER_PORT}
        }}
    }}
    """
    nft(NODE, "-f", "-", stdin=kube_proxy)
    try:
        # Non-mesh pod: kube-proxy DNAT still applies.
        c = Conn(POD2, (VIP, 80))
        try:
            assert c.hello["server"] == "peer"
            assert tuple(c.hello["local"]) == (PEER_IP, PEER_PORT)
        finally:
            c.close()
        assert px.quiet()
        # Enrolled pod: tc captured the SYN before netfilter; notrack kept DNAT away.
        with entered(POD1):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(WAIT)
        with s:
            s.connect((VIP, 80))
            ev = px.accept()
            assert ev["port"] == 15001
            assert tuple(ev["local"]) == (VIP, 80)
        # Control: without our notrack table, conntrack DNATs the captured packets (the handshake
        # then fails: the reply comes from the VIP, the pod's ACK no longer matches the proxy's
        # socket); in no case does the proxy get a connection to the VIP.
        nft(NODE, "delete", "table", "ip", "ambient_mesh")
        try:
            with entered(POD1):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(1.0)
            with s, contextlib.suppress(OSError):
                s.connect((VIP, 80))
                s.recv(1)
            seen = []
            with contextlib.suppress(queue.Empty):
                while True:
                    seen.append(px.accept(timeout=SHORT))
            assert all(tuple(ev["local"]) != (VIP, 80) for ev in seen), seen
        finally:
            capture.install()
    finally:
        nft(NODE, "delete", "table", "ip", "kubeproxy")
    assert "notrack" in nft(NODE, "list", "table", "ip", "ambient_mesh")


def test_uninstall_is_exact_inverse(capture: NodeCapture, px: Proxy) -> None:
    # Someone else's clsact + filter on vp2 egress must survive our uninstall.
    from bcc import BPF

    bpf = BPF(text=MARK_SETTER.encode())
    fd = bpf.load_func(b"other_mark", BPF.SCHED_CLS).fd
    with ipr_in(NODE) as ipr:
        vp2 = ipr.link_lookup(ifname="vp2")[0]
        ipr.tc(
            "add-filter",
            "bpf",
            vp2,
            ":1",
            fd=fd,
            name="foreign",
            parent="ffff:fff3",
            classid=1,
            direct_action=True,
            prio=7,
        )
    try:
        capture.uninstall()
        capture.uninstall()  # idempotent
        for ifname in ("up0", "vp1"):
            assert ours(NODE, ifname) == []
            assert not has_clsact(NODE, ifname)
        assert ours(NODE, "vp2") == []
        assert has_clsact(NODE, "vp2")  # foreign one kept
        assert fwmark_rules(NODE) == []
        assert table_routes(NODE, 100) == []
        assert "ambient_mesh" not in nft(NODE, "list", "tables")
        assert not PIN_DIR.exists()
        # Traffic from the formerly enrolled pod now goes out directly.
        c = Conn(POD1, (PEER_IP, PEER_PORT))
        try:
            assert tuple(c.hello["peer"]) == tuple(c.sock.getsockname())
        finally:
            c.close()
        assert px.quiet()
    finally:
        with ipr_in(NODE) as ipr:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del-filter", "bpf", vp2, ":1", parent="ffff:fff3", prio=7)
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", vp2)
        bpf.cleanup()
        capture.install()  # restore the module's capture state
        capture.enroll(uid="uid-pod1", ip=POD1_IP, host_ifname="vp1")
        capture.observe(ip=POD2_IP, host_ifname="vp2")
