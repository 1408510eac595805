"""The lab's processes: node agents, the control plane and the node proxies (start, stop, wait
until ready, read their admin/debug endpoints).

Invariant: the control plane is the only source of node-proxy config and certificates: node
proxies get no mesh config file and no CA directory, only the control plane's address, the CA
roots to verify it, and their node's token (which lets them obtain certificates only for service
accounts with a pod on their node).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import yaml

from ambientctl.errors import LabCommandError
from ambientctl.lab import system, topology
from ambientctl.lab.cluster import LabCluster
from ambientctl.lab.state import (
    CONTROLPLANE,
    CONTROLPLANE_DEBUG,
    PYTHON,
    XDS_ADDRESS,
    ZTUNNEL,
    NodeState,
    _answers,
    _atomic_write,
    _tail,
)
from meshcore.bootstrap import Bootstrap
from meshcore.ca import MeshCA


class LabProcesses(LabCluster):
    """Agents, control plane, node proxies."""

    def _start_agent(self, node: NodeState) -> None:
        p = node.plan
        sock = self.paths.agent_socket(p.name)
        self.paths.node_dir(p.name).mkdir(parents=True, exist_ok=True)
        self.paths.bpf_dir(p.name).mkdir(exist_ok=True)
        argv = system.nsenter(
            p.netns,
            [
                PYTHON,
                "-m",
                "cni.agent",
                "run",
                "--node",
                p.name,
                "--socket",
                str(sock),
                "--state-dir",
                str(self.paths.node_dir(p.name) / "agent"),
                "--uplink",
                topology.UPLINK,
                "--bpffs-dir",
                str(self.paths.bpf_dir(p.name)),
                "--manifests",
                str(self.paths.manifests),
            ],
        )
        node.agent_pid = system.spawn(argv, log=self.paths.logs / f"agent-{p.name}.log")
        self.save()
        pid = node.agent_pid
        system.wait_for(
            lambda: _answers(sock) or not system.alive(pid),
            timeout=60,
            what=f"node agent {p.name}",
        )
        if not system.alive(pid):
            tail = _tail(self.paths.logs / f"agent-{p.name}.log")
            raise LabCommandError(f"node agent {p.name} exited during start:\n{tail}")
        self.log(f"node agent {p.name} up (pid {pid})")

    def restart_agent(self, node_name: str) -> None:
        st = self.state or self.load()
        node = st.node(node_name)
        system.stop(node.agent_pid)
        self._start_agent(node)

    def _uninstall_capture(self, node: NodeState) -> None:
        p = node.plan
        if not system.netns_exists(p.netns):
            return
        argv = system.nsenter(
            p.netns,
            [
                PYTHON,
                "-m",
                "cni.agent",
                "uninstall",
                "--node",
                p.name,
                "--uplink",
                topology.UPLINK,
                "--bpffs-dir",
                str(self.paths.bpf_dir(p.name)),
            ],
        )
        try:
            system.run(argv)
        except LabCommandError as err:
            self.log(f"capture uninstall on {p.name} failed: {err}")

    def _write_credentials(self) -> None:
        """The mesh CA (created here, kept in <state>/ca for the control plane only), the roots
        node proxies verify the control plane with, and one random token per node."""
        st = self.state
        assert st is not None
        ca = MeshCA.load_or_create(self.paths.ca, trust_domain=topology.TRUST_DOMAIN)
        self.paths.controlplane.mkdir(parents=True, exist_ok=True)
        self.paths.roots.write_bytes(ca.roots_pem)
        tokens = {n.plan.name: secrets.token_urlsafe(32) for n in st.nodes}
        _atomic_write(self.paths.node_credentials, yaml.safe_dump(tokens), mode=0o600)
        for node, token in tokens.items():
            self.paths.node_dir(node).mkdir(parents=True, exist_ok=True)
            _atomic_write(self.paths.node_token(node), token + "\n", mode=0o600)

    def _start_controlplane(self) -> None:
        st = self.state
        assert st is not None
        under = topology.underlay_netns(self.name)
        log = self.paths.logs / "controlplane.log"
        argv = system.nsenter(
            under,
            [
                CONTROLPLANE,
                "--manifest-dir",
                str(self.paths.manifests),
                "--ca-dir",
                str(self.paths.ca),
                "--node-credentials",
                str(self.paths.node_credentials),
                "--listen",
                XDS_ADDRESS,
                "--debug-listen",
                f"127.0.0.1:{topology.CONTROLPLANE_DEBUG_PORT}",
                "--metrics-listen",
                f"{topology.CONTROLPLANE_IP}:{topology.CONTROLPLANE_DEBUG_PORT}",
                "--trust-domain",
                topology.TRUST_DOMAIN,
                "--poll-interval",
                "0.1",
            ],
        )
        st.controlplane_pid = system.spawn(argv, log=log)
        self.save()
        pid = st.controlplane_pid
        system.wait_for(
            lambda: system.http_ok(under, f"{CONTROLPLANE_DEBUG}/ready") or not system.alive(pid),
            timeout=60,
            what="control plane",
        )
        if not system.alive(pid):
            raise LabCommandError(f"control plane exited during start:\n{_tail(log)}")
        self.log(f"control plane up (pid {pid}) on {XDS_ADDRESS} (TLS), watching the manifests")

    def stop_controlplane(self) -> None:
        st = self.state or self.load()
        system.stop(st.controlplane_pid)

    def start_controlplane(self) -> None:
        self.state or self.load()
        self._start_controlplane()

    def controlplane_debug(self, path: str) -> Any:
        """GET a control-plane debug endpoint (JSON), e.g. ``/debug/connections``."""
        status, body = system.http_get(
            topology.underlay_netns(self.name), f"{CONTROLPLANE_DEBUG}{path}"
        )
        if status != 200:
            raise LabCommandError(f"control plane {path}: HTTP {status}: {body.strip()}")
        return body if path == "/metrics" else json.loads(body)

    def _start_ztunnel(self, node: NodeState) -> None:
        """Start the node's proxy. With one already running, the new process takes its
        listeners over (--handover-socket, docs/upgrade.md) and the old one serves what it has
        until each connection ends; ready is this process's --ready-file (port 15021 is
        shared with the predecessor until the hand-over is done)."""
        p = node.plan
        log = self.paths.logs / f"ztunnel-{p.name}.log"
        node_dir = self.paths.node_dir(p.name)
        ready_file = node_dir / "ztunnel.ready"
        previous = node.ztunnel_pid if node.ztunnel_pid and system.alive(node.ztunnel_pid) else 0
        argv = system.nsenter(
            p.netns,
            [
                ZTUNNEL,
                "--node",
                p.name,
                "--node-ip",
                p.ip,
                "--capture",
                "transparent",
                *Bootstrap(
                    xds_address=XDS_ADDRESS,
                    ca_address=XDS_ADDRESS,
                    token_file=self.paths.node_token(p.name),
                    roots_file=self.paths.roots,
                ).argv(),
                "--trust-domain",
                topology.TRUST_DOMAIN,
                "--drain-timeout",
                "1",
                "--handover-socket",
                str(node_dir / "ztunnel-handover.sock"),
                "--ready-file",
                str(ready_file),
                *(["--http3"] if self.state is not None and self.state.http3 else []),
            ],
        )
        node.ztunnel_pid = system.spawn(argv, log=log)
        self.save()
        pid = node.ztunnel_pid

        def ready() -> bool:
            try:
                return int(ready_file.read_text()) == pid
            except (OSError, ValueError):
                return False

        system.wait_for(
            lambda: ready() or not system.alive(pid), timeout=60, what=f"node proxy {p.name}"
        )
        if not system.alive(pid):
            raise LabCommandError(f"node proxy {p.name} exited during start:\n{_tail(log)}")
        took_over = f", took the listeners over from pid {previous}" if previous else ""
        self.log(
            f"node proxy {p.name} up (pid {pid}) on {p.ip}, fed by the control plane{took_over}"
        )

    def proxy_config(self, node_name: str) -> dict[str, Any]:
        """The node proxy's /config_dump (workloads, services, policies, certificates)."""
        st = self.state or self.load()
        p = st.node(node_name).plan
        status, body = system.http_get(p.netns, "http://127.0.0.1:15000/config_dump")
        if status != 200:
            raise LabCommandError(f"node proxy {node_name} /config_dump: HTTP {status}")
        data: dict[str, Any] = json.loads(body)
        return data

    def wait_proxies(
        self, predicate: Callable[[dict[str, Any]], bool], *, what: str, timeout: float = 15
    ) -> None:
        """Until every running node proxy's config_dump satisfies `predicate`."""
        st = self.state or self.load()
        running = [n for n in st.nodes if n.ztunnel_pid and system.alive(n.ztunnel_pid)]

        def check() -> bool:
            try:
                return all(predicate(self.proxy_config(n.plan.name)) for n in running)
            except (OSError, LabCommandError, ValueError):
                return False

        system.wait_for(check, timeout=timeout, what=what, interval=0.1)

    def stop_ztunnel(self, node_name: str) -> None:
        st = self.state or self.load()
        node = st.node(node_name)
        system.stop(node.ztunnel_pid)

    def start_ztunnel(self, node_name: str) -> None:
        st = self.state or self.load()
        self._start_ztunnel(st.node(node_name))

    def upgrade_ztunnel(self, node_name: str) -> int:
        """Replace the node's proxy by a new process through the listener hand-over; returns
        the old pid (it keeps serving its connections until they end, then exits)."""
        st = self.state or self.load()
        node = st.node(node_name)
        old = node.ztunnel_pid
        self._start_ztunnel(node)
        return old
