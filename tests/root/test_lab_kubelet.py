"""A lab node as a node of the REAL cluster (ambientctl.lab.kubelet): the lab kubelet registers
the Node with its own ``system:node:<name>`` credential, the real scheduler binds a
Deployment's pods to it, the kubelet gives each pod a network namespace through the real CNI
chain (bridge + host-local: the lab's conflist; capture off here, so our plugin is not in this
chain: the node agent is not part of this test), runs the container's command in it with the
downward-API env and a projected service-account token volume, and reports status (a pod is
Ready only once its readiness probe, an httpGet to the pod IP, passes); the real
endpointslice controller then publishes the pod IPs; scaling to zero runs CNI DEL, stops the
processes and removes the netns, and the kubelet's final delete removes the pod objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ambientctl.lab import system, topology
from ambientctl.lab.kube import KubeCluster
from ambientctl.lab.kubelet import KubeletSettings, LabKubelet
from meshcore.kubeapi import KubeApi

pytestmark = pytest.mark.timeout(240)
LAB = "k8lab"
NODE = "k8lab-n1"
NS = "kl-demo"
APP = """
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        mark = os.path.join(os.environ["READY_DIR"], os.environ["POD_NAME"])
        if self.path == "/ready":  # ready once the test wrote READY_DIR/<pod name>
            ok = os.path.exists(mark)
            self.send_response(200 if ok else 503); self.end_headers(); return
        if self.path == "/alive":  # alive unless the test wrote READY_DIR/<pod name>.sick
            ok = not os.path.exists(mark + ".sick")
            self.send_response(200 if ok else 500); self.end_headers(); return
        body = (os.environ["POD_NAME"] + " " + os.environ["NODE_NAME"] + " "
                + str(len(open(sys.argv[1]).read()))).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def deployment(replicas: int, ready_dir: Path) -> dict[str, Any]:
    container = {
        "name": "echo",
        "image": "lab.invalid/python",
        "command": [sys.executable, "-c", APP, "/var/run/secrets/tokens/token"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "READY_DIR", "value": str(ready_dir)},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1},
        "livenessProbe": {
            "httpGet": {"path": "/alive", "port": "http"},
            "initialDelaySeconds": 3,
            "periodSeconds": 1,
            "failureThreshold": 2,
        },
        "ports": [{"name": "http", "containerPort": 8080}],
        "volumeMounts": [{"name": "tok", "mountPath": "/var/run/secrets/tokens"}],
    }
    token = {"serviceAccountToken": {"path": "token", "audience": "demo", "expirationSeconds": 600}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "echo", "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "echo"}},
            "template": {
                "metadata": {"labels": {"app": "echo"}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": NODE},
                    "containers": [container],
                    "volumes": [{"name": "tok", "projected": {"sources": [token]}}],
                },
            },
        },
    }


def wait(what: str, check: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition, and every container's ready flag, are True."""
    status = pod.get("status") or {}
    cond = {c["type"]: c["status"] for c in status.get("conditions") or []}
    containers = [c["ready"] for c in status.get("containerStatuses") or []]
    return cond.get("Ready") == "True" and bool(containers) and all(containers)


def _get(netns: str, ip: str) -> tuple[int, str] | None:
    try:
        return system.http_get(netns, f"http://{ip}:8080/")
    except OSError:
        return None


def test_lab_node_runs_a_deployment(kube: KubeCluster, tmp_path: Path) -> None:
    plan = topology.node_plan(LAB, NODE, 1)
    system.netns_add(plan.netns)
    api = KubeApi(
        kubeconfig=kube.credential(
            f"node-{NODE}", user=f"system:node:{NODE}", groups=("system:nodes",)
        )
    )
    conflist = topology.conflist(plan, ipam_dir=tmp_path / "ipam", agent_socket=None)
    settings = KubeletSettings(
        lab=LAB,
        conflist=conflist,
        cni_path=[Path("/usr/lib/cni")],
        root=tmp_path / "kubelet",
        path_env="/usr/sbin:/usr/bin:/sbin:/bin",
    )
    kubelet = LabKubelet(api=api, node=plan, settings=settings)
    netns_before = set(Path("/run/netns").iterdir()) if Path("/run/netns").exists() else set()

    def scenario() -> None:
        kube.kubectl("create", "namespace", NS)
        ready_dir = tmp_path / "ready"
        ready_dir.mkdir()
        kube.kubectl("apply", "-f", "-", input=json.dumps(deployment(2, ready_dir)))
        kube.kubectl("expose", "-n", NS, "deployment", "echo", "--port=80", "--target-port=8080")

        def running(ready: bool = True) -> list[dict[str, Any]]:
            _, pods = kube.request("GET", f"/api/v1/namespaces/{NS}/pods")
            items = [p for p in pods["items"] if p["status"].get("phase") == "Running"]
            chosen = [p for p in items if _ready(p) == ready]
            return chosen if len(chosen) == 2 else []

        # The readiness probe (httpGet on the pod IP, every second) fails until the app finds
        # its file: Running but not Ready, for many probe periods.
        pods = wait("two pods Running, not Ready", lambda: running(ready=False))
        first = pods[0]["metadata"]["name"]
        time.sleep(4)
        assert running(ready=False)
        (ready_dir / first).touch()

        def first_ready() -> bool:
            _, listed = kube.request("GET", f"/api/v1/namespaces/{NS}/pods")
            return any(_ready(p) and p["metadata"]["name"] == first for p in listed["items"])

        wait(f"{first} Ready once its probe passes", first_ready, 20)
        _, listed = kube.request("GET", f"/api/v1/namespaces/{NS}/pods")
        assert {p["metadata"]["name"]: _ready(p) for p in listed["items"]} == {
            p["metadata"]["name"]: p["metadata"]["name"] == first for p in pods
        }
        for p in pods:
            (ready_dir / p["metadata"]["name"]).touch()
        pods = wait("two pods Running and Ready on the lab node", running)
        # A failing liveness probe: the kubelet kills the container and starts it again in
        # the same pod (restartCount 1; Ready again once its readiness probe passes).
        (ready_dir / f"{first}.sick").touch()

        def restarts() -> dict[str, int]:
            _, listed = kube.request("GET", f"/api/v1/namespaces/{NS}/pods")
            return {
                p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
                for p in listed["items"]
            }

        wait(f"{first} restarted by its liveness probe", lambda: restarts()[first] == 1, 30)
        (ready_dir / f"{first}.sick").unlink()
        pods = wait("both Ready again", running, 30)
        assert restarts() == {
            p["metadata"]["name"]: int(p["metadata"]["name"] == first) for p in pods
        }
        ips = sorted(p["status"]["podIP"] for p in pods)
        for p in pods:
            assert p["spec"]["nodeName"] == NODE  # bound by the real scheduler
            ip = p["status"]["podIP"]
            assert ip.startswith("10.240.1.")  # from the node's CNI chain (host-local)
            code, body = _get(plan.netns, ip) or (0, "")  # Ready: its probe got answers
            name = p["metadata"]["name"]
            assert code == 200, body
            assert body.startswith(f"{name} {NODE} "), body
            assert int(body.split()[2]) > 100  # the projected token was written

        # The real endpointslice controller publishes the Ready pods.
        def slice_ips() -> list[str]:
            _, slices = kube.request(
                "GET", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
            )
            return sorted(
                a for s in slices["items"] for e in s.get("endpoints") or [] for a in e["addresses"]
            )

        wait("EndpointSlice with both pods", lambda: slice_ips() == ips)
        # Scale to zero: graceful deletes; the kubelet stops, CNI-DELs and finally deletes.
        kube.kubectl("scale", "-n", NS, "deployment", "echo", "--replicas=0")
        wait(
            "pods gone",
            lambda: not kube.request("GET", f"/api/v1/namespaces/{NS}/pods")[1]["items"],
        )
        assert kubelet.pods == {}
        left = set(Path("/run/netns").iterdir()) - netns_before - {Path("/run/netns", plan.netns)}
        assert not left, left

    async def main() -> None:
        task = asyncio.create_task(kubelet.run())
        try:
            await asyncio.to_thread(scenario)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(kubelet.stop)
            await api.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 200))
        _, node = kube.request("GET", f"/api/v1/nodes/{NODE}")
        assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": plan.ip}
    finally:
        kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        system.netns_del(plan.netns)
