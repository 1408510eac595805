"""The lab's cluster: the manifest directory that plays the API server, and the underlay network
the nodes hang off.

The manifest directory (``<state>/manifests``) is the lab's API server: the control plane watches
it, the node agents read Namespace/Pod labels from it, pods run in it. The lab writes into it what
Kubernetes components write into API objects: Pod spec.nodeName, metadata.uid and status.podIP
(scheduler/kubelet, at `up`), Namespace labels (`lab label`).

Invariant: manifest files are replaced atomically (temp file + rename), so a reader (control
plane, agent) sees the old or the new file, never a partial one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ambientctl.lab import manifests, system, topology
from ambientctl.lab.state import LabCore, _atomic_write
from ambientctl.lab.topology import NodePlan

MANIFEST_HEADER = (
    "# Lab copy of {source}, written by `ambientctl lab`: Pod nodeName/uid/status (the\n"
    "# scheduler's and kubelet's part) and Namespace labels (`lab label`) are filled in.\n"
)


class LabCluster(LabCore):
    """The manifest directory and the underlay."""

    def _manifest_files(self) -> list[Path]:
        """The files the lab and the agents read (top level, like `manifests.load`)."""
        d = self.paths.manifests
        return sorted([*d.glob("*.yaml"), *d.glob("*.yml")])

    def _rewrite_objects(
        self, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> set[tuple[str, str, str]]:
        """Apply `change` to every Pod/Namespace document of the top-level manifest files
        (None = leave it); rewrite changed files atomically. Returns the refs it changed."""
        st = self.state
        done: set[tuple[str, str, str]] = set()
        for path in self._manifest_files():
            docs = list(yaml.safe_load_all(path.read_text()))
            changed = False
            for i, doc in enumerate(docs):
                ref = manifests.object_ref(doc) if isinstance(doc, dict) else None
                if ref is None:
                    continue
                new = change(doc)
                if new is not None and new != doc:
                    docs[i] = new
                    changed = True
                    done.add(ref)
            if changed:
                header = MANIFEST_HEADER.format(source=st.source if st else "the manifests")
                _atomic_write(path, header + yaml.safe_dump_all(docs, sort_keys=False))
        return done

    def _write_pod_facts(self, spec: manifests.LabSpec) -> None:
        st = self.state
        assert st is not None
        facts = {
            key: manifests.PodFacts(
                node=ps.node,
                ip=ps.ip,
                host_ip=st.node(ps.node).plan.ip,
                uid=ps.uid,
                http3=st.http3,
            )
            for key, ps in st.pods.items()
            if ps.ip
        }

        def change(doc: dict[str, Any]) -> dict[str, Any] | None:
            ref = manifests.object_ref(doc)
            if ref is None or ref[0] != "Pod":
                return None
            f = facts.get(f"{ref[1]}/{ref[2]}")
            return manifests.with_pod_facts(doc, f) if f is not None else None

        self._rewrite_objects(change)
        self.log(f"pod nodes and IPs written into {self.paths.manifests}")

    def _write_namespace_labels(self, namespace: str, changes: dict[str, str | None]) -> None:
        def change(doc: dict[str, Any]) -> dict[str, Any] | None:
            ref = manifests.object_ref(doc)
            if ref != ("Namespace", "", namespace):
                return None
            return manifests.with_labels(doc, changes)

        self._rewrite_objects(change)
        declared = {
            ref
            for path in self._manifest_files()
            for doc in yaml.safe_load_all(path.read_text())
            if isinstance(doc, dict) and (ref := manifests.object_ref(doc)) is not None
        }
        if ("Namespace", "", namespace) in declared:
            return
        # A namespace only implied by its pods: create its Namespace object.
        path = self.paths.lab_namespaces
        docs = list(yaml.safe_load_all(path.read_text())) if path.exists() else []
        labels = {k: v for k, v in changes.items() if v is not None}
        docs.append(manifests.namespace_doc(namespace, labels))
        header = "# Namespaces created by `ambientctl lab label`\n"
        _atomic_write(path, header + yaml.safe_dump_all(docs, sort_keys=False))

    def _underlay(self, plans: Sequence[NodePlan]) -> None:
        under = topology.underlay_netns(self.name)
        system.netns_add(under)
        if "br0" not in system.ip(under, "-br", "link", "show", check=False):
            system.ip(under, "link", "add", "br0", "type", "bridge")
        system.ip(under, "link", "set", "br0", "up")
        # The control plane listens on the bridge's own address in the underlay netns.
        system.ip(under, "addr", "replace", f"{topology.CONTROLPLANE_IP}/24", "dev", "br0")
        for p in plans:
            system.netns_add(p.netns)
            if topology.UPLINK not in system.ip(p.netns, "-br", "link", "show", check=False):
                system.ip(
                    p.netns,
                    "link",
                    "add",
                    topology.UPLINK,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    p.underlay_port,
                    "netns",
                    under,
                )
            system.ip(p.netns, "addr", "replace", f"{p.ip}/24", "dev", topology.UPLINK)
            system.ip(p.netns, "link", "set", topology.UPLINK, "up")
            system.ip(under, "link", "set", p.underlay_port, "master", "br0", "up")
            system.sysctl(p.netns, "net.ipv4.ip_forward", "1")
            # Replies to pod sources the proxy spoofs (IP_TRANSPARENT) must not be dropped by
            # reverse-path filtering on the node.
            system.sysctl(p.netns, "net.ipv4.conf.all.rp_filter", "0")
            for q in plans:
                if q.name != p.name:
                    system.ip(p.netns, "route", "replace", q.pod_subnet, "via", q.ip)
            # Pods that talk to the control plane themselves (waypoints) are answered via
            # their node.
            system.ip(under, "route", "replace", p.pod_subnet, "via", p.ip)
        self.log(f"underlay {under}: nodes {', '.join(f'{p.name}={p.ip}' for p in plans)}")
