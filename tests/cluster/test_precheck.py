"""``ambientctl x precheck``'s Kubernetes API checks against the REAL API server (as istioctl x
precheck: version, RBAC to install, conflicting installs, CRDs), with the cluster picked by
``--kubeconfig`` and ``--context``: the admin passes RBAC; a service account with no rights
(another context of the same kubeconfig) is refused each kind the chart creates; an Istio
istiod and a Cilium DaemonSet are found; the chart fixture's CRDs (applied by kubectl, not
by a helm release) are reported as ones helm would not adopt; an API server that does not
answer is one line and exit 1. ``ambientctl install`` honours the same ``--context``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambientctl.lab.kube import KubeCluster, free_port
from ambientctl.main import main
from ambientctl.precheck import INSTALL_PERMISSIONS
from tests.cluster import objects
from tests.cluster.fixtures import sa_kubeconfig
from tests.loopback.test_chart import helm_binary

NS = "precheck"
NODE = ["--proc", "/proc", "--cni-conf-dir", "/nonexistent"]
"""Node checks are the unit tests' (tests/unit/test_cli_istioctl.py); here they fail alike."""

ISTIOD = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "istiod", "namespace": NS, "labels": {"app": "istiod"}},
    "spec": {
        "replicas": 0,
        "selector": {"matchLabels": {"app": "istiod"}},
        "template": {
            "metadata": {"labels": {"app": "istiod"}},
            "spec": {"containers": [{"name": "discovery", "image": "istio/pilot"}]},
        },
    },
}
CILIUM = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"name": "cilium", "namespace": NS, "labels": {"k8s-app": "cilium"}},
    "spec": {
        "selector": {"matchLabels": {"k8s-app": "cilium"}},
        "template": {
            "metadata": {"labels": {"k8s-app": "cilium"}},
            "spec": {
                "nodeSelector": {"precheck.invalid/none": "none"},  # runs nowhere
                "containers": [{"name": "agent", "image": "cilium/cilium"}],
            },
        },
    },
}


def precheck(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]]]:
    code = main(["x", "precheck", *NODE, "-o", "json", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, [f for f in json.loads(out) if f["check"] not in ("kernel", "eBPF", "CNI")]


def two_contexts(kube: KubeCluster, tmp_path: Path) -> Path:
    """The admin's kubeconfig plus a context ``viewer``: a service account with no rights."""
    objects.service_account(kube, NS, "viewer")
    viewer = json.loads(sa_kubeconfig(kube, tmp_path / "sa.kubeconfig", NS, "viewer").read_text())
    doc = yaml.safe_load(kube.admin_kubeconfig.read_text())
    doc["users"].append({"name": "viewer", "user": viewer["users"][0]["user"]})
    doc["contexts"].append(
        {"name": "viewer", "context": {"cluster": doc["clusters"][0]["name"], "user": "viewer"}}
    )
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


def test_precheck_against_the_real_api_server(
    chart: KubeCluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kube = chart
    objects.namespace(kube, NS)
    kubeconfig = two_contexts(kube, tmp_path)

    code, found = precheck(capsys, "--kubeconfig", str(kubeconfig))
    by = {f["check"]: f for f in found}
    assert by["Kubernetes"]["level"] == "OK"
    assert "v1.37.2" in by["Kubernetes"]["detail"]
    assert by["RBAC"] == {
        "check": "RBAC",
        "level": "OK",
        "detail": f"may create every kind the chart installs ({len(INSTALL_PERMISSIONS)})",
    }
    assert by["installs"]["level"] == "OK"
    # The chart fixture applied our CRDs with kubectl: no helm release owns them.
    crds = [f for f in found if f["check"] == "CRDs"]
    assert crds
    assert all(f["level"] == "Warning" for f in crds)
    want = "authorizationpolicies.security.istio.io exists, installed by something other than helm"
    assert any(f["detail"].startswith(want) for f in crds)
    assert code == 1  # the node checks (no CNI directory) fail; the cluster's are ok/warnings

    # --context: the same kubeconfig, a context whose user may create nothing.
    code, found = precheck(capsys, "--kubeconfig", str(kubeconfig), "--context", "viewer")
    assert code == 1
    denied = [f["detail"] for f in found if f["check"] == "RBAC"]
    assert len(denied) == len(INSTALL_PERMISSIONS)
    assert "cannot create customresourcedefinitions.apiextensions.k8s.io: " in denied[1]
    assert any(d.startswith("cannot create daemonsets.apps") for d in denied)
    assert any(f["check"] == "installs" and "cannot list" in f["detail"] for f in found)

    # Istio and Cilium installed: found wherever they run.
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([ISTIOD, CILIUM]))
    try:
        code, found = precheck(capsys, "--kubeconfig", str(kubeconfig))
        conflicts = {f["detail"]: f["level"] for f in found if f["check"] == "conflict"}
        assert conflicts == {
            f"Istio's istiod runs ({NS}/istiod): uninstall Istio first": "Error",
            f"Cilium runs ({NS}/cilium): its tc programs and socket load balancing must leave "
            "pod traffic to the mesh (bpf-lb-sock-hostns-only)": "Warning",
        }
        assert code == 1
    finally:
        kube.kubectl("delete", "-n", NS, "deployment/istiod", "daemonset/cilium")

    # An unknown context is one line.
    code = main(["x", "precheck", *NODE, "--kubeconfig", str(kubeconfig), "--context=nope"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err
    assert "\u2718 Kubernetes: cannot use the kubeconfig: " in out, out
    assert "nope" in out

    # `install` honours the same flags: as `viewer`, the real RBAC refuses helm (the admin,
    # the current context, would install); an unknown context is refused before helm runs.
    monkeypatch.setenv("PATH", f"{kube.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("AMBIENT_HELM", helm_binary())
    install = [
        "install",
        "--kubeconfig",
        str(kubeconfig),
        "-n",
        NS,
        "--no-wait",
        "--set",
        "crds.install=false",
    ]
    code = main([*install, "--context", "viewer"])
    _out, err = capsys.readouterr()
    assert code == 1
    assert "ambientctl: helm upgrade --install (context viewer) failed:\n" in err, err
    assert 'forbidden: User "system:serviceaccount:precheck:viewer"' in err
    code = main([*install, "--context=nope"])
    _out, err = capsys.readouterr()
    assert code == 5
    assert err == "ambientctl: no context 'nope' in the kubeconfig\n"


def test_precheck_unreachable_api_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"https://127.0.0.1:{free_port('127.0.0.1')}"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": dead}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(doc))
    code, found = precheck(capsys, "--kubeconfig", str(path))
    assert code == 1
    (kube,) = found
    assert kube["level"] == "Error"
    assert kube["detail"].startswith("cannot reach the API server: ")
