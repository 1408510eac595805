"""``helm install`` / ``helm upgrade`` / ``helm uninstall`` of charts/ambient with the real helm
against the REAL API server: every rendered object passes the server's validation, defaulting
and admission; the real DaemonSet controller creates a node pod (with the chart's rendered
containers) for a Ready node and the deployment controller the control plane's pod; an upgrade
keeps the generated CA; an uninstall removes everything but what the chart keeps on purpose
(the CA Secret, ``helm.sh/resource-policy: keep``).
The pods do not run here (no kubelet): running the chart's pods on lab nodes is the lab
kubelet's part (docs/kube.md). CRDs are installed by the ``chart`` fixture already, so this
release renders none (``crds.install=false``).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from ambientctl.lab.container import REPO
from ambientctl.lab.kube import KubeCluster
from tests.cluster import objects
from tests.loopback.test_chart import helm_binary

pytestmark = pytest.mark.timeout(240)
NS = "helm-mesh"


def helm(kube: KubeCluster, *args: str) -> str:
    proc = subprocess.run(
        [helm_binary(), f"--kubeconfig={kube.admin_kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def items(kube: KubeCluster, path: str) -> list[dict[str, Any]]:
    status, body = kube.request("GET", path)
    assert status == 200, body
    return list(body["items"])


def wait(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_helm_install_upgrade_uninstall(chart: KubeCluster) -> None:
    kube = chart
    objects.ready_node(kube, "helm-node")
    release = ["ambient", str(REPO / "charts/ambient"), "-n", NS, "--set", "crds.install=false"]
    helm(kube, "install", *release, "--create-namespace")

    def node_pod() -> Any:
        pods = items(kube, f"/api/v1/namespaces/{NS}/pods?labelSelector=app%3Dztunnel")
        return next((p for p in pods if p["spec"].get("nodeName") == "helm-node"), None)

    try:
        pod = wait("the DaemonSet controller's pod for helm-node", node_pod)
    except AssertionError:
        raise AssertionError(kube.kubectl("get", "events", "-n", NS)) from None
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert containers["ztunnel"]["command"] == ["ztunnel"]
    assert pod["spec"]["hostNetwork"] is True
    assert pod["spec"]["serviceAccountName"] == "ztunnel"
    cp_pods = f"/api/v1/namespaces/{NS}/pods?labelSelector=app%3Dambient-controlplane"
    wait("the control plane's pod", lambda: items(kube, cp_pods))
    ca = items(
        kube,
        f"/api/v1/namespaces/{NS}/secrets?labelSelector=app.kubernetes.io%2Fpart-of%3Dambient-mesh",
    )
    root = {s["metadata"]["name"]: s["data"] for s in ca}["cacerts"]["root-cert.pem"]
    # Upgrade: the generated root is kept (lookup on the real server).
    helm(kube, "upgrade", *release)
    ca = items(kube, f"/api/v1/namespaces/{NS}/secrets/")
    kept = {s["metadata"]["name"]: s.get("data") or {} for s in ca}
    assert kept["cacerts"]["root-cert.pem"] == root
    # Uninstall: nothing of the release is left but the kept CA Secret.
    helm(kube, "uninstall", "ambient", "-n", NS, "--wait", "--timeout=120s")
    for path in (
        f"/apis/apps/v1/namespaces/{NS}/daemonsets",
        f"/apis/apps/v1/namespaces/{NS}/deployments",
        f"/api/v1/namespaces/{NS}/services",
    ):
        assert items(kube, path) == [], path
    # Every pod is being deleted (without a kubelet here, nothing confirms the graceful
    # deletion: tests/root/test_lab_kubelet.py shows the lab kubelet finishing it).
    wait(
        "the release's pods terminating",
        lambda: all(
            p["metadata"].get("deletionTimestamp")
            for p in items(kube, f"/api/v1/namespaces/{NS}/pods")
        ),
    )
    accounts = {
        s["metadata"]["name"] for s in items(kube, f"/api/v1/namespaces/{NS}/serviceaccounts")
    }
    assert accounts == {"default"}
    roles = [
        r["metadata"]["name"]
        for r in items(kube, "/apis/rbac.authorization.k8s.io/v1/clusterroles")
    ]
    assert not [r for r in roles if r.endswith(f"-{NS}")], roles
    left = {s["metadata"]["name"] for s in items(kube, f"/api/v1/namespaces/{NS}/secrets")}
    assert left == {"cacerts"}
