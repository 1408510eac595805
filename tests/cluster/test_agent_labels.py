"""The node agent's Kubernetes label source (cni.kubelabels) against the REAL API server, as
the chart's ``ztunnel`` service account (its label-watch RBAC). Capture is the in-memory
stand-in of tests/unit/test_cni_agent (the kernel side is tested in tests/root).

Asserted: pods that ran before the agent are adopted; the API server's field selector gives
the agent only its node's pods; ``kubectl label namespace ... istio.io/dataplane-mode=ambient``
enrolls live, the pod opt-out label keeps a pod out and, set later, releases it; a deleted pod
is dropped; an API server restart loses no label change.
Stays on the stand-in (tests/unit/test_agent_kube.py): re-list after 410 Gone (a real server's
watch cache cannot be compacted on demand) and bookmarks on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from ambientctl.lab.kube import KubeCluster
from cni.agent import Agent
from cni.kubelabels import KubeLabels
from tests.cluster import objects
from tests.cluster.fixtures import SYSTEM_NS, sa_kubeconfig
from tests.loopback.cpfixtures import eventually
from tests.unit.test_cni_agent import FakeCapture, enroll_req

pytestmark = pytest.mark.timeout(180)
NS = "lbl-mesh"
MODE = "istio.io/dataplane-mode"


def test_agent_follows_the_real_api(chart: KubeCluster, tmp_path: Path) -> None:
    kube = chart
    objects.namespace(kube, NS)
    objects.pod(kube, NS, "a1", objects.PodOptions(node_name="lbl-node-a", ip="10.0.0.2"))
    objects.pod(
        kube,
        NS,
        "a2",
        objects.PodOptions(node_name="lbl-node-a", ip="10.0.0.3", labels={MODE: "none"}),
    )
    objects.pod(kube, NS, "b1", objects.PodOptions(node_name="lbl-node-b", ip="10.0.1.2"))
    kc = sa_kubeconfig(kube, tmp_path / "agent.kubeconfig", SYSTEM_NS, "ztunnel")
    labels = KubeLabels("lbl-node-a", kubeconfig=kc, watch_timeout=30)
    veths = {"10.0.0.2": "veth-a1", "10.0.0.3": "veth-a2", "10.0.0.4": "veth-a3"}
    capture = FakeCapture()
    agent = Agent(
        node="lbl-node-a",
        capture=capture,
        labels=labels,
        inventory=labels,
        state_dir=tmp_path / "state",
        exists=lambda p: True,
        pick_veth=lambda candidates, guess: guess,
        find_veth=veths.get,
    )
    agent.load()
    uid = {}

    def kubectl(*args: str) -> None:
        kube.kubectl(*args)

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(labels.run())
        try:
            await eventually(lambda: labels.synced, 30, "first list")
            assert agent.labels_changed()
            changes = agent.reconcile()
            assert {f"adopted {NS}/a1 veth veth-a1", f"adopted {NS}/a2 veth veth-a2"} <= set(
                changes
            )
            # Only this node's pods (the API server applies the field selector).
            assert {p.name for p in labels.local_pods().values()} == {"a1", "a2"}
            uid.update({p.name: u for u, p in labels.local_pods().items()})
            assert capture.enrolled() == {}
            await asyncio.to_thread(kubectl, "label", "namespace", NS, f"{MODE}=ambient")
            await eventually(agent.labels_changed, 15, "namespace label")
            changes = agent.reconcile()
            assert set(capture.enrolled()) == {"10.0.0.2"}
            assert f"{NS}/a1 redirection disabled -> enabled" in changes
            # A new pod through the CNI plugin, then its opt-out label set later.
            pod = await asyncio.to_thread(
                objects.pod,
                kube,
                NS,
                "a3",
                objects.PodOptions(node_name="lbl-node-a", ip="10.0.0.4"),
            )
            a3 = pod["metadata"]["uid"]
            await eventually(lambda: a3 in labels.local_pods(), 15, "a3 watched")
            answer = agent.handle(enroll_req(a3, NS, "a3", "10.0.0.4", "veth-a3"))
            assert answer.get("result") == "enrolled", answer
            await asyncio.to_thread(kubectl, "label", "pod", "-n", NS, "a3", f"{MODE}=none")
            await eventually(lambda: labels.labels(NS, "a3")[1].get(MODE) == "none", 15)
            assert agent.labels_changed()
            agent.reconcile()
            assert set(capture.enrolled()) == {"10.0.0.2"}
            # API server restart while a pod is deleted and the namespace unlabelled.
            await asyncio.to_thread(kube.restart_apiserver, down=0.5)
            await asyncio.to_thread(
                kube.request, "DELETE", f"/api/v1/namespaces/{NS}/pods/a2?gracePeriodSeconds=0"
            )
            await asyncio.to_thread(kubectl, "label", "namespace", NS, f"{MODE}-")
            await eventually(lambda: uid["a2"] not in labels.local_pods(), 30, "a2 deleted")
            await eventually(
                lambda: MODE not in labels.labels(NS, "a1")[0], 30, "namespace unlabelled"
            )
            changes = agent.reconcile()
            assert f"deleted {NS}/a2" in changes
            assert capture.enrolled() == {}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(main(), 150))
