"""The pure Kubernetes checks of ``ambientctl x precheck`` (the real API server runs them in
tests/cluster/test_precheck.py): version, denied permissions, installs, CRD versions/owners;
and the two lists that must follow the chart (its kubeVersion, the kinds it renders)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from ambientctl import precheck
from ambientctl.precheck import INSTALL_PERMISSIONS, Permission

CHART = Path(__file__).resolve().parents[2] / "charts" / "ambient"


def test_kubernetes_version() -> None:
    assert precheck.kubernetes_version({"gitVersion": "v1.37.2"}).ok
    old = precheck.kubernetes_version({"gitVersion": "v1.24.9-gke.1"})
    assert old.render() == "\u2718 Kubernetes: API server v1.24.9-gke.1 is older than 1.25"
    assert not precheck.kubernetes_version({}).ok


def test_min_kubernetes_is_the_charts() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    m = re.fullmatch(r">=(\d+)\.(\d+)\.0-0", chart["kubeVersion"])
    assert m is not None
    assert (int(m.group(1)), int(m.group(2))) == precheck.MIN_KUBERNETES


def test_install_permissions_cover_every_kind_the_chart_renders() -> None:
    from tests.loopback.test_chart import helm_binary

    rendered = subprocess.run(
        [helm_binary(), "template", "ambient", str(CHART), "-n", "istio-system", "--include-crds"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    plural = {"Secret": "secrets", "Service": "services", "ServiceAccount": "serviceaccounts"}
    kinds = set()
    for doc in yaml.safe_load_all(rendered):
        if doc:
            group = doc["apiVersion"].rpartition("/")[0]
            name = plural.get(doc["kind"]) or doc["kind"].lower() + "s"
            kinds.add((group, name, "namespace" in doc["metadata"]))
    want = {(p.group, p.resource, p.namespaced) for p in INSTALL_PERMISSIONS}
    assert kinds <= want, kinds - want
    assert want - kinds == {("", "namespaces", False)}  # helm --create-namespace


def test_denied_permissions_each_named() -> None:
    crd = Permission("apiextensions.k8s.io", "customresourcedefinitions", False)
    sa = Permission("", "serviceaccounts", True)
    out = precheck.permissions([(crd, {"allowed": False, "reason": "no RBAC"}), (sa, {})])
    assert [f.render() for f in out] == [
        "\u2718 RBAC: cannot create customresourcedefinitions.apiextensions.k8s.io: no RBAC",
        "\u2718 RBAC: cannot create serviceaccounts: denied",
    ]
    assert precheck.access_review(sa, "istio-system")["spec"]["resourceAttributes"] == {
        "verb": "create",
        "group": "",
        "resource": "serviceaccounts",
        "namespace": "istio-system",
    }
    assert "namespace" not in precheck.access_review(crd, "x")["spec"]["resourceAttributes"]


def obj(kind: str, name: str, **labels: str) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": "istio-system", "labels": labels}}


def test_installs() -> None:
    ours = obj(
        "DaemonSet", "ztunnel", app="ztunnel", **{"app.kubernetes.io/part-of": "ambient-mesh"}
    )
    assert precheck.installs([], [ours])[0].ok
    out = precheck.installs(
        [obj("Deployment", "istiod", app="istiod")],
        [
            obj("DaemonSet", "ztunnel", app="ztunnel"),
            obj("DaemonSet", "cni", **{"k8s-app": "istio-cni-node"}),
        ],
    )
    assert [(f.level, f.detail.split(":")[0]) for f in out] == [
        ("Error", "Istio's istiod runs (istio-system/istiod)"),
        ("Error", "Istio's ambient data plane runs (istio-system/ztunnel)"),
        ("Error", "Istio's ambient data plane runs (istio-system/cni)"),
    ]
    assert precheck.failed(out)


def crd(name: str, versions: list[str], release: str | None = None) -> dict[str, Any]:
    ann = {"meta.helm.sh/release-name": release} if release else {}
    return {
        "metadata": {"name": name, "annotations": ann},
        "spec": {"versions": [{"name": v, "served": True} for v in versions]},
    }


def test_crds() -> None:
    wanted = [
        ("networking.istio.io", "virtualservices", "v1"),
        ("gateway.networking.k8s.io", "gateways", "v1"),
    ]
    assert precheck.crds([], wanted, "ambient")[0].ok  # the chart installs them
    ours = [crd("virtualservices.networking.istio.io", ["v1", "v1beta1"], "ambient")]
    assert precheck.crds(ours, wanted, "ambient")[0].ok
    old = [
        crd("virtualservices.networking.istio.io", ["v1alpha3", "v1beta1"], "istio-base"),
        crd("gateways.gateway.networking.k8s.io", ["v1"], "istio-base"),
    ]
    out = precheck.crds(old, wanted, "ambient")
    assert [f.render() for f in out] == [
        "\u2718 CRDs: virtualservices.networking.istio.io serves ['v1alpha3', 'v1beta1']; "
        "the control plane reads v1",
        "! CRDs: gateways.gateway.networking.k8s.io exists, installed by helm release "
        "'istio-base': install with --set crds.install=false to use it (helm will not adopt it)",
    ]
    assert precheck.failed(out)
