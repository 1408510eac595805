"""The lab's commands: up, down, pods, exec, label.

Owns the order in which a lab is built and torn down. Its parts: the state file
/run/ambient-lab/<name>/state.json that every later command reads (`ambientctl.lab.state`), the
manifest directory and the underlay (`cluster`), the node agents, control plane and node proxies
(`processes`), and the pods (`pods`).

up:   manifests validated -> underlay + node netns (uplinks, routes, forwarding; br0 gets the
      control plane's address) -> bpffs mount -> node agents (nsenter into the node netns, so
      /sys keeps the real bpffs) -> per pod: netns, REAL CNI chain (ptp/bridge + host-local,
      then ambient-cni) run in the node netns, /etc/netns hosts file -> each Pod's node and
      status (pod IP) written into the manifests -> mesh CA + node tokens -> control plane
      (ambient-controlplane in the underlay netns, TLS) -> node proxies (ztunnel, transparent,
      config over xDS, certificates from the control plane's CA) -> pod processes
      (`ip netns exec`, so /etc/netns/<pod>/hosts is their /etc/hosts).
down: pods stopped -> CNI DEL chain per pod -> node proxies, control plane and agents stopped
      -> capture uninstalled per node -> netns and /etc/netns dirs deleted -> bpffs unmounted
      -> state dir (manifests, CA, tokens, logs) removed.

The manifest directory (``<state>/manifests``) is the lab's API server: the control plane
watches it (every kind it reads: Namespaces, Pods, Services, AuthorizationPolicies,
PeerAuthentications, ...), the node agents read Namespace/Pod labels from it, pods run in it.
The lab writes into it what Kubernetes components write into API objects: Pod spec.nodeName,
metadata.uid and status.podIP (scheduler/kubelet, at `up`), Namespace labels (`lab label`).
Anyone may drop or remove other manifests (e.g. an AuthorizationPolicy) there at any time.

Invariants:
- The state file is written before each resource is created, and every name is recomputable
  from (lab, manifests) (ambientctl.lab.topology), so `down` cleans up after any partial `up`.
- A failing `up` tears down what it built before raising.
- The control plane is the only source of node-proxy config and certificates: node proxies get
  no mesh config file and no CA directory, only the control plane's address, the CA roots to
  verify it, and their node's token (which lets them obtain certificates only for service
  accounts with a pod on their node).
- Manifest files are replaced atomically (temp file + rename), so a reader (control plane,
  agent) sees the old or the new file, never a partial one.
- Label changes never restart a node proxy: the new labels are written, agents are told to
  sync (capture changes at once), and `label_namespace` returns once every running node proxy
  has applied the control plane's push.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

from ambientctl.errors import LabStateError
from ambientctl.lab import manifests, system, topology
from ambientctl.lab.pods import LabPods
from ambientctl.lab.state import (
    CONTROLPLANE_DEBUG,
    PYTHON,
    XDS_ADDRESS,
    LabState,
    NodeState,
    PodState,
)
from cni.install import write_launcher

__all__ = ["CONTROLPLANE_DEBUG", "XDS_ADDRESS", "Lab", "LabState", "NodeState", "PodState"]


class Lab(LabPods):
    """One lab, addressed by name; all commands go through here. Its parts, one module each:
    state (`LabCore`), cluster (`LabCluster`: manifests and underlay), processes
    (`LabProcesses`), pods (`LabPods`); this module owns the order of `up` and `down`."""

    def up(
        self,
        source: Path,
        *,
        capture: str = "ebpf",
        nodes: Sequence[str] = (),
        primary: str = topology.DEFAULT_PRIMARY_PLUGIN,
        http3: bool = False,
    ) -> None:
        if self.paths.root.exists():
            raise LabStateError(
                f"lab {self.name!r} exists ({self.paths.root}); run `ambientctl lab down` first"
            )
        spec = manifests.load(source, tuple(nodes))  # validate before creating anything
        self.paths.root.mkdir(parents=True)
        self.state = LabState(
            name=self.name,
            capture=capture,
            source=str(source.resolve()),
            primary=primary,
            http3=http3,
        )
        try:
            shutil.copytree(source, self.paths.manifests)
            self.paths.logs.mkdir()
            self.save()
            self._up(spec)
        except BaseException:
            kept = Path(f"/tmp/ambient-lab-{self.name}-failed-logs")
            shutil.rmtree(kept, ignore_errors=True)
            if self.paths.logs.exists():
                shutil.copytree(self.paths.logs, kept)
            self.log(f"up failed; logs kept in {kept}; tearing down what was built")
            self.down()
            raise

    def _up(self, spec: manifests.LabSpec) -> None:
        st = self.state
        assert st is not None
        plans = topology.nodes_plan(self.name, spec.nodes)
        st.nodes = [NodeState(plan=p) for p in plans]
        self.save()
        self._underlay(plans)
        meshed = st.capture == "ebpf"
        if meshed:
            system.mount_bpffs(self.paths.bpffs)
            st.bpffs = True
            self.save()
            self.paths.bin.mkdir(exist_ok=True)
            write_launcher(self.paths.bin, PYTHON)
            for node in st.nodes:
                self._start_agent(node)
        for pod in spec.pods:
            self._add_pod(spec, pod)
        self._write_pod_facts(spec)
        if meshed:
            self._write_credentials()
            self._start_controlplane()
            for node in st.nodes:
                self._start_ztunnel(node)
        for pod in spec.pods:
            self._start_pod(pod)
        if meshed:
            self.sync_waypoints()
        self.log(f"lab {self.name} is up: {len(st.nodes)} nodes, {len(spec.pods)} pods")

    def down(self) -> None:
        if self.state is None:
            try:
                self.load()
            except LabStateError:
                if not self.paths.root.exists():
                    raise
                self.state = None
        if self.state is not None:
            self._down_state(self.state)
        system.netns_del(topology.underlay_netns(self.name))
        system.umount(self.paths.bpffs)
        shutil.rmtree(self.paths.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.paths.root.parent.rmdir()  # only if no other lab lives there
        self.log(f"lab {self.name} is down")

    def _down_state(self, st: LabState) -> None:
        """Everything the state file records, in reverse order of `up`."""
        for ps in st.pods.values():
            if ps.pid:
                system.stop(ps.pid, timeout=3)
        for ps in st.pods.values():
            self._del_pod(st, ps)
        for node in st.nodes:
            if node.ztunnel_pid:
                system.stop(node.ztunnel_pid)
        if st.controlplane_pid:
            system.stop(st.controlplane_pid)
        for node in st.nodes:
            if node.agent_pid:
                system.stop(node.agent_pid)
        if st.capture == "ebpf" and st.bpffs:
            for node in st.nodes:
                self._uninstall_capture(node)
        for ps in st.pods.values():
            system.netns_del(ps.netns)
            shutil.rmtree(Path("/etc/netns") / ps.netns, ignore_errors=True)
        for node in st.nodes:
            system.netns_del(node.plan.netns)
