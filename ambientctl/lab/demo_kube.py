"""`ambientctl lab demo --kube`: the user's flow on a real Kubernetes cluster of lab nodes.

Prints each command as a user would type it and what it did:
1. ``lab up --kube``: etcd, kube-apiserver, controller-manager, scheduler (built from source,
   docs/kube.md) and one lab kubelet per node;
2. ``helm install ambient charts/ambient -n istio-system --create-namespace``: the control
   plane and a node DaemonSet pod per node, run by the lab kubelets;
3. ``kubectl apply -f examples/kube/apps.yaml`` (apps in namespace ``demo``), then ``kubectl
   label namespace demo istio.io/dataplane-mode=ambient``: the running pods are captured; the
   client's call to ``echo`` crosses both node proxies with mTLS (both SPIFFE identities in
   their access logs);
4. ``ambientctl waypoint apply -n demo --for all --service-account reviews`` (+ the Service
   label): the control plane's waypoint controller creates the waypoint, a lab kubelet runs it;
   the seed's VirtualService and an L7 DENY apply to ``reviews`` traffic, ``echo`` (another
   service account) stays L4;
5. ``helm uninstall``: no pod, CNI entry or eBPF program left on the nodes.
Exit 0 only if every step showed what it should; the lab is torn down unless --keep.
"""

from __future__ import annotations

import json
from typing import Any

from ambientctl.errors import LabCommandError
from ambientctl.lab.kubeflow import WAYPOINT_PODS, KubeFlow, wait
from ambientctl.lab.kubelab import KubeLab

SLEEP = "spiffe://cluster.local/ns/demo/sa/sleep"
ECHO = "spiffe://cluster.local/ns/demo/sa/echo"


class _Demo(KubeFlow):
    def __init__(self, lab: KubeLab) -> None:
        super().__init__(lab)
        self.say = lab.log

    def load_or_errors(self, n: int, *headers: str, path: str = "/") -> dict[str, Any]:
        """`load`, a failed client counted as `n` errors."""
        failed = {"n": n, "versions": {}, "status": {}, "errors": n}
        return self.load(n, *headers, path=path) or failed

    def run(self) -> bool:
        lab, say = self.lab, self.say
        ok = True
        self.install()
        self.tool("kubectl", "get", "pods", "-n", "istio-system", "-o", "wide")
        self.deploy_apps()
        self.tool("kubectl", "get", "pods", "-n", "demo", "-o", "wide")
        wait("echo answers", lambda: self.call_echo("before"))
        self.enrol()

        def meshed() -> list[dict[str, Any]] | None:
            self.call_echo("hello mesh")
            lines = [
                a
                for a in lab.access_log()
                if a["src.identity"] == SLEEP and a["dst.identity"] == ECHO
            ]
            return lines if {a["node"] for a in lines} == {"node-1", "node-2"} else None

        lines = wait("mTLS between the running pods", meshed, 60)
        say("\n$ ambientctl lab exec demo/client -- python3 /apps/call.py echo 80 'hello mesh'")
        say("  " + (self.call_echo("hello mesh") or "FAILED").replace("\n", "\n  ").rstrip())
        say("\nnode proxies' access logs (the pods were running before the label):")
        for a in lines[-2:]:
            say(
                f"  {a['node']}: {a['src.identity']} -> {a['dst.identity']} "
                f"via {a['dst.hbone_addr']}"
            )

        self.waypoint_for_reviews()
        self.reviews_policies()

        def deny_enforced() -> dict[str, Any] | None:
            r = self.load_or_errors(1, path="/private")
            return r if r["status"] == {"403": 1} else None

        denied = wait("the waypoint's L7 policy", deny_enforced, 120)
        beta = self.load_or_errors(10, "user-type:beta-tester")
        mixed = self.load_or_errors(40)
        say("\nreviews through the waypoint (the seed's VirtualService, an L7 DENY):")
        say(f"  GET /private            -> {denied['status']}")
        say(f"  user-type: beta-tester  -> {beta['versions']}")
        say(f"  40 other requests       -> {mixed['versions']} (90/10 weights)")
        ok &= beta["versions"] == {"v2": 10} and mixed["versions"].get("v1", 0) >= 28
        wp = lab.pods("demo", WAYPOINT_PODS)[0]
        before = len(lab.access_log())
        ok &= self.call_echo("still L4") is not None
        echo = [a for a in lab.access_log()[before:] if a["dst.identity"] == ECHO]
        l4 = bool(echo) and all(wp["status"]["podIP"] not in json.dumps(a) for a in echo)
        say(
            f"  echo (service account echo, same namespace): "
            f"{'L4, no waypoint' if l4 else 'NOT L4'}"
        )
        ok &= l4

        self.tool("kubectl", "delete", "gateway", "waypoint", "-n", "demo")
        self.tool("helm", "uninstall", "ambient", "-n", "istio-system", "--wait")
        wait("istio-system empty", lambda: not lab.pods("istio-system"), 120)
        left = []
        for node in ("node-1", "node-2"):
            paths = lab.node_paths(node)
            conf = (paths["/etc/cni/net.d"] / "10-ambient-lab.conflist").read_text()
            left += [f"{node}: CNI entry"] if "ambient-cni" in conf else []
            left += [f"{node}: {p}" for p in paths["/sys/fs/bpf"].rglob("*")]
        say("\nafter helm uninstall: " + (", ".join(left) or "no pod, CNI entry or eBPF pin left"))
        return ok and not left


def run_kube_demo(lab: KubeLab, *, keep: bool = False) -> int:
    lab.log("$ ambientctl lab up --kube")
    lab.up()
    ok = False
    try:
        ok = _Demo(lab).run()
    except (TimeoutError, OSError, LabCommandError) as e:
        lab.log(f"demo FAILED: {e}")
    finally:
        lab.log("\ndemo " + ("OK" if ok else "FAILED"))
        if keep:
            lab.log("lab kept: `ambientctl lab kubectl -- get pods -A`, `ambientctl lab down`")
        else:
            lab.down()
    return 0 if ok else 1
