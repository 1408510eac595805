"""ambient-cni run by REAL CNI clients: podman (libcni, CNI backend) and a direct chain exec.

Node: a netns ``<p>-node`` with uplink ``up0`` (192.168.77.1) to a peer netns ``<p>-peer``
(192.168.77.2) running examples/lab/echo.py. In the node netns: a bpffs-backed node agent (real
eBPF capture), a node proxy in transparent mode, and podman itself (so the CNI plugins, hence the
host-side veths, live in the node netns). The podman network chains ptp + host-local (one
address: 10.99.0.5) + ambient-cni with defaultNamespace "pm" (a Namespace labelled ambient).
A busybox container (busybox-static rootfs) calls the peer; the node proxy's access log shows
the captured connection, the peer sees the container's real IP, and podman's DEL unenrolls.
Also: bad CNI input through the real executable gets the spec's error codes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ambientctl.lab import system
from cni import protocol
from cni.install import write_launcher

pytestmark = pytest.mark.timeout(300)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lab"
POD_IP = "10.99.0.5"
NODE_IP, PEER_IP = "192.168.77.1", "192.168.77.2"
ZTUNNEL = str(Path(sys.executable).with_name("ztunnel"))


def _env(**kw: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], **kw}


def plugin(env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, object] | None]:
    proc = subprocess.run(
        [sys.executable, "-m", "cni.plugin"], input=stdin, env=env, capture_output=True, timeout=30
    )
    out = proc.stdout.decode().strip()
    return proc.returncode, json.loads(out) if out else None


def test_bad_input_gets_spec_error_codes(tmp_path: Path) -> None:
    full = _env(CNI_COMMAND="ADD", CNI_CONTAINERID="c", CNI_NETNS="/run/netns/x", CNI_IFNAME="e")
    code, err = plugin(full, b"{not json")
    assert code != 0
    assert err is not None
    assert err["code"] == 6
    assert "msg" in err
    conf = {"cniVersion": "9.9.9", "name": "n", "type": "ambient-cni"}
    code, err = plugin(full, json.dumps(conf).encode())
    assert code != 0
    assert err is not None
    assert err["code"] == 1
    no_netns = {k: v for k, v in full.items() if k != "CNI_NETNS"}
    conf["cniVersion"] = "1.0.0"
    code, err = plugin(no_netns, json.dumps(conf).encode())
    assert code != 0
    assert err is not None
    assert err["code"] == 4
    assert "CNI_NETNS" in str(err["msg"])
    code, out = plugin(_env(CNI_COMMAND="VERSION"), b'{"cniVersion":"0.4.0"}')
    assert code == 0
    assert out is not None
    assert "1.0.0" in out["supportedVersions"]  # type: ignore[operator]


@dataclass
class Node:
    tmp: Path
    prefix: str
    agent_pid: int = 0
    ztunnel_pid: int = 0
    peer_pid: int = 0

    @property
    def netns(self) -> str:
        return f"{self.prefix}-node"

    @property
    def peer(self) -> str:
        return f"{self.prefix}-peer"

    @property
    def sock(self) -> Path:
        return self.tmp / "agent.sock"

    @property
    def bpf(self) -> Path:
        return self.tmp / "bpf"

    runroot: Path = Path("/nonexistent")
    """Short path: podman refuses a runroot longer than 50 characters."""

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        argv = system.nsenter(
            self.netns,
            [
                "podman",
                "--root",
                str(self.tmp / "root"),
                "--runroot",
                str(self.runroot),
                "--storage-driver",
                "vfs",
                *args,
            ],
        )
        env = {**os.environ, "CONTAINERS_CONF": str(self.tmp / "containers.conf")}
        return subprocess.run(argv, env=env, capture_output=True, timeout=timeout)


def _setup(n: Node) -> None:
    t = n.tmp
    system.netns_add(n.netns)
    system.netns_add(n.peer)
    system.ip(
        n.netns, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", n.peer
    )
    system.ip(n.netns, "addr", "add", f"{NODE_IP}/24", "dev", "up0")
    system.ip(n.netns, "link", "set", "up0", "up")
    system.ip(n.peer, "addr", "add", f"{PEER_IP}/24", "dev", "eth0")
    system.ip(n.peer, "link", "set", "eth0", "up")
    system.ip(n.peer, "route", "add", "10.99.0.0/24", "via", NODE_IP)
    system.sysctl(n.netns, "net.ipv4.ip_forward", "1")
    n.peer_pid = system.spawn(
        ["ip", "netns", "exec", n.peer, "python3", str(EXAMPLES / "echo.py"), "8080"],
        log=t / "peer.log",
        env={"PATH": os.environ["PATH"], "POD_NAME": "peer", "POD_NAMESPACE": "outside"},
    )
    # node agent with real capture
    system.mount_bpffs(n.bpf)
    (t / "manifests").mkdir()
    (t / "manifests" / "ns.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: pm, labels: {istio.io/dataplane-mode: ambient}}\n"
    )
    n.agent_pid = system.spawn(
        system.nsenter(
            n.netns,
            [
                sys.executable,
                "-m",
                "cni.agent",
                "run",
                "--node",
                "pm-node",
                "--socket",
                str(n.sock),
                "--state-dir",
                str(t / "agent"),
                "--uplink",
                "up0",
                "--bpffs-dir",
                str(n.bpf / "pins"),
                "--manifests",
                str(t / "manifests"),
            ],
        ),
        log=t / "agent.log",
    )
    system.wait_for(lambda: n.sock.exists(), timeout=60, what="node agent")
    # node proxy: the container is workload bb (ns pm, sa default) on this node
    mesh = {
        "workloads": [
            {
                "uid": "Kubernetes//Pod/pm/bb",
                "name": "bb",
                "namespace": "pm",
                "serviceAccount": "default",
                "addresses": [POD_IP],
                "node": "pm-node",
                "tunnelProtocol": "HBONE",
            },
        ],
        "services": [],
        "policies": [],
    }
    (t / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    n.ztunnel_pid = system.spawn(
        system.nsenter(
            n.netns,
            [
                ZTUNNEL,
                "--node",
                "pm-node",
                "--node-ip",
                NODE_IP,
                "--capture",
                "transparent",
                "--mesh-config",
                str(t / "mesh.yaml"),
                "--ca-dir",
                str(t / "ca"),
            ],
        ),
        log=t / "ztunnel.log",
    )
    system.wait_for(
        lambda: system.http_ok(n.netns, f"http://{NODE_IP}:15021/healthz/ready"),
        timeout=60,
        what="node proxy",
    )
    # podman with the CNI backend and our chained plugin
    (t / "bin").mkdir()
    write_launcher(t / "bin", sys.executable)
    (t / "cni").mkdir()
    conflist = {
        "cniVersion": "1.0.0",
        "name": "pmtest",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(t / "ipam"),
                    "ranges": [
                        [{"subnet": "10.99.0.0/24", "rangeStart": POD_IP, "rangeEnd": POD_IP}]
                    ],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "ambient-cni", "agentSocket": str(n.sock), "defaultNamespace": "pm"},
        ],
    }
    (t / "cni" / "pmtest.conflist").write_text(json.dumps(conflist))
    (t / "containers.conf").write_text(
        '[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\nevents_logger = "none"\n'
        '[network]\nnetwork_backend = "cni"\n'
        f'cni_plugin_dirs = ["{t / "bin"}", "/usr/lib/cni"]\n'
        f'network_config_dir = "{t / "cni"}"\n'
    )
    rootfs = t / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for tool in ("sh", "nc", "cat", "echo", "sleep", "ip"):
        (rootfs / "bin" / tool).symlink_to("busybox")


def _teardown(n: Node) -> None:
    n.podman("rm", "-f", "-a", timeout=60)
    for pid in (n.ztunnel_pid, n.agent_pid, n.peer_pid):
        if pid:
            system.stop(pid)
    if system.netns_exists(n.netns):
        system.run(
            system.nsenter(
                n.netns,
                [
                    sys.executable,
                    "-m",
                    "cni.agent",
                    "uninstall",
                    "--node",
                    "pm-node",
                    "--uplink",
                    "up0",
                    "--bpffs-dir",
                    str(n.bpf / "pins"),
                ],
            ),
            check=False,
        )
    system.netns_del(n.netns)
    system.netns_del(n.peer)
    system.umount(n.bpf)
    shutil.rmtree(n.runroot, ignore_errors=True)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    if shutil.which("podman") is None or not Path("/bin/busybox").exists():
        pytest.fail("podman and busybox-static are required (apt: podman runc busybox-static)")
    n = Node(tmp=tmp_path, prefix=f"pm{os.getpid() % 10000}")
    n.runroot = Path(tempfile.mkdtemp(prefix="ambient-pm-", dir="/run"))
    try:
        _setup(n)
        yield n
    finally:
        _teardown(n)


def test_podman_container_is_enrolled_and_captured(node: Node) -> None:
    proc = node.podman(
        "run",
        "--rm",
        "--name",
        "bb",
        "--network",
        "pmtest",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--rootfs",
        str(node.tmp / "rootfs"),
        "sh",
        "-c",
        f"ip -4 addr show eth0; echo captured | nc -w 3 {PEER_IP} 8080",
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert f"inet {POD_IP}/24" in out
    # Passthrough to a non-mesh peer: the node proxy connects from the node IP today (Istio's
    # in-pod ztunnel would use the pod IP); uncaptured traffic would come from POD_IP with no
    # access-log line, which the assertions below rule out.
    assert f"you are {NODE_IP}:" in out or f"you are {POD_IP}:" in out
    assert "echo: captured" in out
    log = (node.tmp / "ztunnel.log").read_text()
    lines = [json.loads(x[x.index("{") :]) for x in log.splitlines() if "ztunnel.access" in x]
    outbound = [a for a in lines if a["direction"] == "outbound"]
    assert outbound, log[-2000:]
    assert outbound[0]["src.workload"] == "bb"
    assert str(outbound[0]["src.addr"]).startswith(f"{POD_IP}:")
    assert outbound[0]["dst.addr"] == f"{PEER_IP}:8080"
    agent_log = (node.tmp / "agent.log").read_text()
    assert f"ADD pm/bb {POD_IP}" in agent_log
    assert "enabled" in agent_log
    assert "DEL pm/bb" in agent_log  # podman's DEL on --rm reached the agent
    status = protocol.call(str(node.sock), {"op": "status"}, timeout=5)
    assert status["pods"] == []


def test_direct_chain_add_check_del(node: Node) -> None:
    """The chain exec'd as libcni does (no cnitool exists): ADD, CHECK, DEL, CHECK again."""
    conflist = json.loads((node.tmp / "cni" / "pmtest.conflist").read_text())
    netns = f"{node.prefix}-c1"
    system.netns_add(netns)
    try:
        att = system.CniAttachment(
            container_id="c1",
            netns_path=f"/run/netns/{netns}",
            cni_args="IgnoreUnknown=1;K8S_POD_NAMESPACE=pm;K8S_POD_NAME=bb;K8S_POD_UID=uid-1",
            cni_path=[node.tmp / "bin", Path("/usr/lib/cni")],
            run_in=node.netns,
        )
        result = system.cni_chain("ADD", conflist, att)
        assert result is not None
        assert result["ips"][0]["address"] == f"{POD_IP}/24"
        status = protocol.call(str(node.sock), {"op": "status"}, timeout=5)
        assert [p["redirection"] for p in status["pods"]] == ["enabled"]
        system.cni_chain("CHECK", conflist, att, prev_result=result)
        system.cni_chain("DEL", conflist, att, prev_result=result)
        system.cni_chain("DEL", conflist, att, prev_result=result)
        with pytest.raises(system.CniFailure) as info:
            system.cni_chain("CHECK", conflist, att, prev_result=result)
        assert info.value.plugin in ("ptp", "ambient-cni")
    finally:
        system.netns_del(netns)
