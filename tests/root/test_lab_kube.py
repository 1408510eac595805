"""The user's flow on a REAL Kubernetes cluster whose nodes are lab nodes (`lab up --kube`).

One lab for the module (ambientctl.lab.kubelab: etcd, kube-apiserver, controller-manager and
scheduler built from source, on the lab underlay; one lab kubelet process per node), then, in
order, what a user does:
1. ``helm install ambient charts/ambient -n istio-system --create-namespace`` with the chart's
   defaults (TokenReview, labels from the API): the real DaemonSet controller and scheduler put
   a ztunnel pod on each node and the control plane on one; the lab kubelets run the rendered
   commands with their volumes (hostPath, projected tokens, Secret, ConfigMap) mounted at the
   rendered paths; the node proxies authenticate with their projected tokens (real
   TokenReview) and get config from the control plane through the Service's ClusterIP.
2. ``kubectl apply`` of the apps (examples/kube/apps.yaml), then ``kubectl label namespace demo
   istio.io/dataplane-mode=ambient`` captures the RUNNING pods: mTLS with both SPIFFE
   identities in the node proxies' access logs.
3. a waypoint bound to ONE service account (examples/kube/waypoint.yaml: the Gateway and the
   ``istio.io/use-waypoint`` label on ServiceAccount ``reviews``): created by the control
   plane's waypoint controller, run by a lab kubelet; the seed's VirtualService and an L7 DENY
   apply to traffic to ``reviews`` pods, while ``echo`` (another service account, same
   namespace) stays L4.
4. a node proxy's projected token cannot obtain an identity that has no pod on its node.
5. the control plane's and the agents' watches survive an API server restart.
6. ``helm upgrade`` keeps traffic flowing; ``helm uninstall`` leaves no pod, no CNI entry or
   plugin, no tc program, no pinned map, no nft table on any node.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambientctl.lab import system
from ambientctl.lab.kubeflow import KubeFlow, wait
from ambientctl.lab.kubelab import KubeLab

pytestmark = pytest.mark.timeout(900)
REPO = Path(__file__).resolve().parents[2]
LAB = "kflow"
SLEEP = "spiffe://cluster.local/ns/demo/sa/sleep"
ECHO = "spiffe://cluster.local/ns/demo/sa/echo"
REVIEWS = "spiffe://cluster.local/ns/demo/sa/reviews"


def client(lab: KubeLab) -> str:
    """The demo client pod's name."""
    return str(lab.pods("demo", "app=client")[0]["metadata"]["name"])


def call_echo(lab: KubeLab, message: str) -> str:
    out = KubeFlow(lab).call_echo(message)
    assert out is not None, "the client's call to echo failed"
    return out


def load(lab: KubeLab, n: int, *headers: str, path: str = "/") -> dict[str, Any]:
    result = KubeFlow(lab).load(n, *headers, path=path)
    assert result is not None, "the client's load to reviews failed"
    return result


@pytest.fixture(scope="module")
def lab() -> Iterator[KubeLab]:
    k = KubeLab(LAB, log=print)
    if k.root.exists():  # a previous run was killed
        k.down()
    t0 = time.monotonic()
    k.up()
    print(f"kube lab up in {time.monotonic() - t0:.1f}s")
    try:
        yield k
    finally:
        _keep_logs(k)
        k.down()
        assert not k.root.exists()
        left = [n for n in system.run(["ip", "netns", "list"]).split() if n.startswith(LAB)]
        assert not left, left
        assert not Path("/var/run/secrets/kubernetes.io").exists()


def _keep_logs(lab: KubeLab) -> None:
    """Every component's log in /tmp/ambient-lab-kflow-logs (kept after `down`)."""
    import shutil

    keep = Path(f"/tmp/ambient-lab-{LAB}-logs")
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir()
    for log in [
        *lab.root.glob("logs/*.log"),
        *lab.root.glob("kube/logs/*.log"),
        *lab.root.glob("kubelet/*/pods/*/*.log"),
    ]:
        shutil.copy(log, keep / "_".join(log.relative_to(lab.root).parts))
    with contextlib.suppress(Exception):
        (keep / "pods.txt").write_text(lab.run_tool("kubectl", "get", "pods", "-A", "-o", "wide"))


def test_1_helm_install_runs_the_chart_on_lab_nodes(lab: KubeLab) -> None:
    t0 = time.monotonic()
    zt, cp = KubeFlow(lab).install()
    assert sorted(p["spec"]["nodeName"] for p in zt) == ["node-1", "node-2"]
    for p in zt:  # hostNetwork: the node's address
        assert p["status"]["podIP"] == lab.node_plan(p["spec"]["nodeName"]).ip
    assert cp["status"]["podIP"].startswith("10.240.")
    # Both node proxies authenticated with their projected tokens through the real TokenReview
    # (node taken from the bound pod) and hold the control plane's config.
    wait(
        "both node proxies authenticated by TokenReview",
        lambda: all(
            f"authenticated: node {n}" in lab.container_log(cp, "controlplane")
            for n in ("node-1", "node-2")
        ),
    )
    for node in ("node-1", "node-2"):
        plan = lab.node_plan(node)
        ready = functools.partial(
            system.http_ok, plan.netns, f"http://{plan.ip}:15021/healthz/ready"
        )
        wait(f"{node}'s node proxy ready", ready)
        # install-cni chained our plugin into the node's own conflist.
        conf = lab.node_paths(node)["/etc/cni/net.d"] / "10-ambient-lab.conflist"
        wait(f"ambient-cni chained on {node}", functools.partial(_chained, conf))
    print(f"helm install -> mesh ready in {time.monotonic() - t0:.1f}s")


def test_2_label_captures_running_pods(lab: KubeLab) -> None:
    flow = KubeFlow(lab)
    flow.deploy_apps()
    client_ip = lab.pods("demo", "app=client")[0]["status"]["podIP"]
    # Before the label: plain TCP through the lab kube-proxy, no node proxy involved.
    assert f"you are {client_ip}:" in wait("echo answers", lambda: _try_echo(lab, "before"))
    assert not [a for a in lab.access_log() if a.get("dst.service", "").startswith("echo.")]

    flow.enrol()

    def meshed() -> list[dict[str, Any]]:
        out = _try_echo(lab, "after")
        assert out is None or f"you are {client_ip}:" in out  # the app still sees the client
        return [
            a for a in lab.access_log() if a["src.identity"] == SLEEP and a["dst.identity"] == ECHO
        ]

    lines = wait("mTLS with both identities in the access logs", meshed, 60)
    nodes = {
        a["node"]
        for a in wait(
            "both node proxies logged it",
            lambda: meshed() if len({a["node"] for a in meshed()}) == 2 else None,
            30,
        )
    }
    assert nodes == {"node-1", "node-2"}, lines
    # The pods were running before the label: captured live, not restarted.
    assert lab.running("demo", "app=echo", 1)
    assert all(p["status"]["containerStatuses"][0]["restartCount"] == 0 for p in lab.pods("demo"))


def _chained(conf: Path) -> bool:
    return "ambient-cni" in conf.read_text()


def _captured(lab: KubeLab, pod: dict[str, Any]) -> bool:
    """The pod's node agent (over its socket on the node) has it enrolled."""
    from cni import protocol

    sock = lab.node_paths(pod["spec"]["nodeName"])["/var/run/ambient"] / "cni.sock"
    status = protocol.call(str(sock), {"op": "status"}, timeout=10)
    states = {p["name"]: p["redirection"] for p in status["pods"]}
    return states.get(pod["metadata"]["name"]) == "enabled"


def _try_echo(lab: KubeLab, message: str) -> str | None:
    return KubeFlow(lab).call_echo(message)


def test_3_waypoint_for_one_service_account(lab: KubeLab) -> None:
    t0 = time.monotonic()
    # The CLI through the API (server-side apply), then the equivalent YAML changes nothing.
    flow = KubeFlow(lab)
    out = flow.waypoint_for_reviews()
    assert "waypoint demo/waypoint programmed" in out, out
    gw_path = "/apis/gateway.networking.k8s.io/v1/namespaces/demo/gateways/waypoint"
    by_cli = lab.cluster.request("GET", gw_path)[1]
    lab.run_tool("kubectl", "apply", "-f", str(REPO / "examples/kube/waypoint.yaml"))
    by_yaml = lab.cluster.request("GET", gw_path)[1]
    assert by_yaml["spec"] == by_cli["spec"]
    assert by_yaml["metadata"]["generation"] == by_cli["metadata"]["generation"]
    _, sa = lab.cluster.request("GET", "/api/v1/namespaces/demo/serviceaccounts/reviews")
    assert sa["metadata"]["labels"] == {"istio.io/use-waypoint": "waypoint"}
    wp = flow.waypoint_pod()
    assert wp["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    flow.reviews_policies()

    # The L7 DENY (targetRefs: the waypoint) answers 403 before the app sees the request.
    wait(
        "GET /private denied by the waypoint",
        lambda: load(lab, 1, path="/private-x")["status"] == {"403": 1},
        120,
    )
    print(f"waypoint applied -> L7 policy enforced in {time.monotonic() - t0:.1f}s")
    # The seed's VirtualService: beta-tester -> v2 only; others 90/10 v1/v2.
    beta = load(lab, 10, "user-type:beta-tester")
    assert beta["versions"] == {"v2": 10}, beta
    mixed = load(lab, 40)
    assert mixed["errors"] == 0, mixed
    assert mixed["versions"].get("v1", 0) >= 28, mixed
    # The service account binding: a call to a reviews POD's address (workload-addressed, no
    # service) goes through the waypoint too, so the policy applies to it.
    pod_ip = lab.pods("demo", "app=reviews")[0]["status"]["podIP"]
    direct = flow.client("python3", "/apps/load.py", f"http://{pod_ip}:9080/private-direct", "1")
    assert json.loads(direct.stdout.decode().splitlines()[-1])["status"] == {"403": 1}, direct
    for p in lab.pods("demo", "app=reviews"):
        assert "/private" not in lab.container_log(p, "reviews")
    # The waypoint's own log has the requests; `echo` (service account echo, same namespace)
    # stays L4: its connections go node proxy to node proxy, no waypoint in the path.
    assert "reviews" in lab.container_log(wp, "waypoint")
    before = len(lab.access_log())
    call_echo(lab, "still L4")
    echo_lines = wait(
        "echo access lines",
        lambda: [a for a in lab.access_log()[before:] if a["dst.identity"] == ECHO] or None,
    )
    wp_ip = wp["status"]["podIP"]
    assert all(wp_ip not in str(a.get("dst.hbone_addr")) for a in echo_lines), echo_lines
    # The waypoint's access log: the client's identity in, reviews' identity out (mTLS on both
    # legs), the direct pod call denied there.
    records = [
        json.loads(line[line.index("{") :])
        for line in lab.container_log(wp, "waypoint").splitlines()
        if "waypoint.access" in line and "{" in line
    ]
    assert any(
        r["src.identity"] == SLEEP and r["dst.identity"] == REVIEWS and r["response_code"] == 200
        for r in records
    ), records[-3:]
    assert any(r["path"] == "/private-direct" and r["response_code"] == 403 for r in records), (
        records[-3:]
    )
    assert not any(ECHO in json.dumps(r) for r in records)


# Run with the venv's python in node-1's netns: ask the control plane's CA (address, roots file,
# token file) for IDENTITY; prints "granted <id>" or "refused <error>". A subprocess, not a thread
# that entered the netns: gRPC connects from its own thread pool, which stays in whichever netns
# its first gRPC call made it in (the host's, when the whole suite runs in one process).
CSR_SCRIPT = """\
import asyncio, sys
from datetime import timedelta
from pathlib import Path
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from meshcore.xds import ControlPlaneEndpoint

address, roots, token_file, identity = sys.argv[1:5]

async def main() -> str:
    endpoint = ControlPlaneEndpoint(
        address=address, token=None, tls_roots=Path(roots).read_bytes(),
        server_name="ambient-controlplane.istio-system.svc", token_file=Path(token_file),
    )
    provider = ControlPlaneCAProvider(endpoint, ttl=timedelta(hours=1))
    try:
        cert = await provider.fetch(SpiffeId.parse(identity))
        return f"granted {cert.identity}"
    except CertificateError as e:
        return f"refused {e}"
    finally:
        await provider.close()

print(asyncio.run(main()))
"""


def test_4_node_proxy_cannot_obtain_another_nodes_identity(lab: KubeLab) -> None:
    """node-1's node proxy token (projected, bound to its pod) asks the control plane's CA for
    the identity of a workload that runs only on node-2 (echo): refused; for its own
    node's workload (sleep): granted. The real TokenReview names the pod, hence the node."""
    zt = next(
        p for p in lab.pods("istio-system", "app=ztunnel") if p["spec"]["nodeName"] == "node-1"
    )
    vols = lab.pod_dir("node-1") / "pods" / zt["metadata"]["uid"] / "volumes"
    _, svc = lab.cluster.request(
        "GET", "/api/v1/namespaces/istio-system/services/ambient-controlplane"
    )

    def in_node(identity: str) -> str:
        argv = [
            sys.executable,
            "-c",
            CSR_SCRIPT,
            f"{svc['spec']['clusterIP']}:15012",
            str(vols / "controlplane-roots" / "root-cert.pem"),
            str(vols / "controlplane-token" / "token"),
            identity,
        ]
        out = system.run(system.nsenter(lab.node_plan("node-1").netns, argv))
        return out.strip().splitlines()[-1]

    own = in_node(SLEEP)
    other = in_node(ECHO)
    assert own.startswith("granted"), own
    assert other.startswith("refused"), other
    assert "PERMISSION_DENIED" in other, other


def test_5_watches_survive_an_apiserver_restart(lab: KubeLab) -> None:
    lab.cluster.restart_apiserver(down=2)
    lab.save()
    # A Service created after the restart reaches the node proxies (control plane watch), and
    # a namespace label reaches the agents (their watch): a new pod in a new ambient namespace
    # is captured.
    lab.run_tool("kubectl", "create", "service", "clusterip", "late", "-n", "demo", "--tcp=81:8080")

    def has_late() -> bool:
        plan = lab.node_plan("node-1")
        _, body = system.http_get(plan.netns, "http://127.0.0.1:15000/config_dump")
        return "late.demo.svc" in body

    wait("the new Service in node-1's node proxy", has_late, 60)
    lab.run_tool("kubectl", "label", "namespace", "demo", "restart-check=1")
    lab.run_tool("kubectl", "scale", "-n", "demo", "deployment", "echo", "--replicas=2")
    wait("a new echo pod", lambda: lab.running("demo", "app=echo", 2))
    # Both echo pods (one created after the restart) are enrolled by their node's agent.
    for p in lab.pods("demo", "app=echo"):
        wait(f"{p['metadata']['name']} captured", functools.partial(_captured, lab, p), 60)


def test_6_helm_upgrade_and_uninstall_leave_nothing(lab: KubeLab) -> None:
    t0 = time.monotonic()
    old = {p["metadata"]["uid"] for p in lab.pods("istio-system", "app=ztunnel")}
    lab.run_tool(
        "helm",
        "upgrade",
        "ambient",
        str(REPO / "charts/ambient"),
        "-n",
        "istio-system",
        "--set",
        "node.ztunnel.logLevel=debug",
    )
    wait(
        "new ztunnel pods on both nodes",
        lambda: (
            (zt := lab.running("istio-system", "app=ztunnel", 2)) is not None
            and not ({p["metadata"]["uid"] for p in zt} & old)
        ),
        180,
    )
    assert "echo: after upgrade" in wait(
        "traffic after the upgrade", lambda: _try_echo(lab, "after upgrade"), 60
    )
    print(f"helm upgrade (node proxies replaced) in {time.monotonic() - t0:.1f}s")

    # The waypoint is the user's (its Gateway); remove it, then the mesh.
    lab.run_tool("kubectl", "delete", "-f", str(REPO / "examples/kube/waypoint.yaml"))
    t0 = time.monotonic()
    lab.run_tool("helm", "uninstall", "ambient", "-n", "istio-system", "--wait", "--timeout=3m")
    wait("no pod left in istio-system", lambda: not lab.pods("istio-system"), 120)
    wait(
        "no waypoint pod left",
        lambda: not lab.pods("demo", "gateway.networking.k8s.io/gateway-name=waypoint"),
        60,
    )
    print(f"helm uninstall -> nothing left in {time.monotonic() - t0:.1f}s")
    for node in ("node-1", "node-2"):
        plan, paths = lab.node_plan(node), lab.node_paths(node)
        conf = json.loads((paths["/etc/cni/net.d"] / "10-ambient-lab.conflist").read_text())
        assert [p["type"] for p in conf["plugins"]] == ["bridge"], conf
        assert not (paths["/opt/cni/bin"] / "ambient-cni").exists()
        pins = paths["/sys/fs/bpf"]
        assert not list(pins.rglob("*")), list(pins.rglob("*"))  # no pinned maps or programs
        links = json.loads(system.ip(plan.netns, "-j", "link", "show"))
        for dev in [str(link["ifname"]) for link in links]:
            for hook in ("ingress", "egress"):
                argv = ["tc", "filter", "show", "dev", dev, hook]
                tc = system.run(system.nsenter(plan.netns, argv), check=False)
                assert "bpf" not in tc, (node, dev, hook, tc)
        nft = system.run(system.nsenter(plan.netns, ["nft", "list", "tables"]))
        assert "ambient_mesh" not in nft, nft
    # The apps still run, uncaptured, and still talk (through the lab kube-proxy).
    assert "echo: unmeshed" in wait(
        "traffic without the mesh", lambda: _try_echo(lab, "unmeshed"), 60
    )
