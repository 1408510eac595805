"""`ambientctl analyze` over manifest directories: each listed problem is found (with its code,
the object and the file), and a clean mesh gives no message at all. Runs the real CLI entry
point (`ambientctl.main.main`), so flags, output and exit status are covered too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ambientctl.main import main

NS_AMBIENT = """
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
"""
NS_LEGACY = """
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
"""
WAYPOINT = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: demo
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: istio-waypoint
  listeners:
    - {name: mesh, port: 15008, protocol: HBONE}
"""


def pod(name: str, ns: str = "demo", *, labels: str = "{app: %(name)s}", extra: str = "") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {labels % {"name": name}}
{extra}
spec:
  serviceAccountName: {name}
  nodeName: node-1
  containers:
    - name: c
      image: app
      ports: [{{containerPort: 8080}}]
"""


def service(name: str, ns: str = "demo", labels: str = "{}") -> str:
    return f"""
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
  labels: {labels}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: {name}}}
  ports:
    - {{name: http, port: 80, targetPort: 8080}}
"""


CLEAN = [
    NS_AMBIENT,
    WAYPOINT,
    pod("client"),
    pod("echo"),
    service("echo", labels="{istio.io/use-waypoint: waypoint}"),
    """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-l4, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
    - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
      to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-l7, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules:
    - to: [{operation: {methods: ["GET"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: demo}
spec:
  hosts: [echo]
  http: [{route: [{destination: {host: echo}}]}]
""",
]


def write(dir_: Path, docs: list[str]) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "mesh.yaml").write_text("\n---\n".join(d.strip() for d in docs) + "\n")
    return dir_


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, str]]]:
    code = main(["analyze", *argv, "-o", "json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def codes(msgs: list[dict[str, str]]) -> set[tuple[str, str]]:
    return {(m["code"], m["ref"]) for m in msgs}


def test_clean_mesh_is_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = write(tmp_path / "clean", CLEAN)
    code, msgs = run(capsys, "-d", str(d))
    assert (code, msgs) == (0, [])
    assert main(["analyze", str(d)]) == 0
    assert "No validation issues found" in capsys.readouterr().err


def test_namespace_labelled_but_not_captured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = "\nstatus:\n  phase: Running\n  podIP: 10.240.1.5"
    running = "  annotations: {ambient.istio.io/redirection: pending}" + status
    captured = "  annotations: {ambient.istio.io/redirection: enabled}" + status
    docs = [
        NS_AMBIENT,
        pod("stuck", extra=running),
        pod("fine", extra=captured),
        pod("host").replace("  serviceAccountName", "  hostNetwork: true\n  serviceAccountName"),
        pod("optout", labels="{app: optout, istio.io/dataplane-mode: none}", extra=running),
        pod("notyet"),  # no status: not running yet, nothing to say
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: typo\n"
        "  labels: {istio.io/dataplane-mode: Ambient}",
    ]
    code, msgs = run(capsys, "-d", str(write(tmp_path / "nc", docs)))
    assert code == 79  # istioctl ExitAnalyzerFoundIssues
    assert codes(msgs) == {
        ("AMB0101", "Pod demo/stuck"),
        ("AMB0101", "Pod demo/host"),
        ("AMB0101", "Namespace typo"),
    }
    stuck = next(m for m in msgs if m["ref"] == "Pod demo/stuck")
    assert "redirection=pending" in stuck["message"]
    assert "running on node-1" in stuck["message"]
    assert stuck["origin"].endswith("mesh.yaml[1]")
    assert stuck["level"] == "Warning"


def test_service_bound_to_missing_waypoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = [
        NS_AMBIENT,
        WAYPOINT,
        pod("echo"),
        service("echo", labels="{istio.io/use-waypoint: gone}"),
        service(
            "other",
            labels="{istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: elsewhere}",
        ),
        service("fine", labels="{istio.io/use-waypoint: waypoint}"),
        service("optout", labels="{istio.io/use-waypoint: none}"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        "metadata: {name: ingress, namespace: demo}\n"
        "spec: {gatewayClassName: nginx, listeners: [{name: http, port: 80, protocol: HTTP}]}",
        service("ingressed", labels="{istio.io/use-waypoint: ingress}"),
        pod("wl", labels="{app: wl, istio.io/use-waypoint: waypoint}"),
    ]
    code, msgs = run(capsys, "-d", str(write(tmp_path / "wp", docs)))
    assert code == 79  # istioctl ExitAnalyzerFoundIssues
    assert codes(msgs) == {
        ("AMB0102", "Service demo/echo"),
        ("AMB0102", "Service demo/other"),
        ("AMB0102", "Service demo/ingressed"),
        ("AMB0102", "Pod demo/wl"),  # a service waypoint does not serve workloads
        ("AMB0204", "Gateway demo/ingress"),  # ingress Gateways are not implemented
    }
    by_ref = {m["ref"]: m for m in msgs}
    assert by_ref["Service demo/echo"]["level"] == "Error"
    assert "no Gateway demo/gone" in by_ref["Service demo/echo"]["message"]
    assert "elsewhere/waypoint" in by_ref["Service demo/other"]["message"]
    assert "not a waypoint" in by_ref["Service demo/ingressed"]["message"]
    assert by_ref["Pod demo/wl"]["level"] == "Warning"


def test_policy_with_l7_rules_at_node_proxies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = [
        NS_AMBIENT,
        pod("echo"),
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
    - to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-jwt, namespace: demo}
spec:
  action: DENY
  rules:
    - from: [{source: {requestPrincipals: ["*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-waypoint, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules:
    - to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: demo}
spec:
  rules:
    - from: [{source: {principal: ["typo"]}}]
""",
    ]
    code, msgs = run(capsys, "-d", str(write(tmp_path / "l7", docs)))
    assert code == 79  # istioctl ExitAnalyzerFoundIssues
    assert codes(msgs) == {
        ("AMB0103", "AuthorizationPolicy demo/get-only"),
        ("AMB0103", "AuthorizationPolicy demo/deny-jwt"),
        ("AMB0106", "AuthorizationPolicy demo/broken"),
        ("AMB0201", "AuthorizationPolicy demo/broken"),  # the misspelt key, by its path
    }
    get_only = next(m for m in msgs if m["ref"].endswith("get-only"))
    assert "to.operation.methods" in get_only["message"]
    assert "allows nothing" in get_only["message"]
    assert "targetRefs" in get_only["message"]


def test_conflicting_virtual_services(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vs = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: %s, namespace: %s}
spec:
  hosts: [%s]
  http: [{route: [{destination: {host: echo}}]}]
"""
    docs = [
        vs % ("a", "demo", "echo"),
        vs % ("b", "shop", "echo.demo.svc.cluster.local"),  # the same host, written in full
        vs % ("c", "demo", "other"),
        vs.replace("  hosts", "  gateways: [ingress]\n  hosts")
        % ("d", "demo", "echo"),  # another gateway
    ]
    code, msgs = run(capsys, "-d", str(write(tmp_path / "vs", docs)))
    assert code == 79  # istioctl ExitAnalyzerFoundIssues
    assert codes(msgs) == {
        ("AMB0104", "VirtualService demo/a"),
        ("AMB0104", "VirtualService shop/b"),
        ("AMB0206", "VirtualService demo/d"),  # not applied by waypoints: said so
    }
    assert all(
        "echo.demo.svc.cluster.local" in m["message"] and m["level"] == "Error"
        for m in msgs
        if m["code"] == "AMB0104"
    )


def test_strict_with_non_mesh_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    strict_ns = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
"""
    docs = [NS_AMBIENT, NS_LEGACY, pod("echo"), pod("curl", ns="legacy"), strict_ns]
    code, msgs = run(capsys, "-d", str(write(tmp_path / "strict", docs)))
    assert code == 79  # istioctl ExitAnalyzerFoundIssues
    assert codes(msgs) == {("AMB0105", "PeerAuthentication demo/strict")}
    assert "legacy/curl" in msgs[0]["message"]
    assert "demo/echo" in msgs[0]["message"]
    # Same config with the client enrolled: quiet.
    docs[3] = pod("curl", ns="legacy", labels="{app: curl, istio.io/dataplane-mode: ambient}")
    code, msgs = run(capsys, "-d", str(write(tmp_path / "strict2", docs)))
    assert (code, msgs) == (0, [])
    # A workload-level PERMISSIVE override exempts the pod: quiet again.
    docs[3] = pod("curl", ns="legacy")
    docs.append(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: echo, namespace: demo}\n"
        "spec: {selector: {matchLabels: {app: echo}}, mtls: {mode: PERMISSIVE}}"
    )
    code, msgs = run(capsys, "-d", str(write(tmp_path / "strict3", docs)))
    assert (code, msgs) == (0, [])


def test_unreadable_objects_and_thresholds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = write(
        tmp_path / "bad",
        [
            NS_AMBIENT,
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 0}]}",
        ],
    )
    (d / "broken.yaml").write_text("kind: [unclosed\n")
    code, msgs = run(capsys, str(d))
    assert code == 79  # istioctl ExitAnalyzerFoundIssues
    assert {m["code"] for m in msgs} == {"AMB0001"}
    assert len(msgs) == 2
    # Threshold: warnings alone do not fail with --failure-threshold Error.
    strict = (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: s, namespace: demo}\nspec: {mtls: {mode: STRICT}}"
    )
    w = write(
        tmp_path / "warn", [NS_AMBIENT, NS_LEGACY, pod("echo"), pod("c", ns="legacy"), strict]
    )
    assert main(["analyze", str(w), "--failure-threshold", "Error"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Warning [AMB0105] (PeerAuthentication demo/s)")
    assert "1 message(s)" in out.err


def test_nothing_to_analyze_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["analyze"]) == 1
    assert "nothing to analyze" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
