"""Fixtures for tests against a REAL Kubernetes API server (ambientctl.lab.kube: etcd,
kube-apiserver, kube-controller-manager, kube-scheduler built from source by scripts/kube-build).

One cluster per test session (start ~10-20 s on 2 cores). The binaries must be built: when they
are missing the tests FAIL with the build command (scripts/test builds them first, so CI always
runs these tests; a developer runs ./scripts/kube-build once, ~N min cold, instant after).
Tests use their own namespaces (and node names) so they do not see each other's objects.
Registered for the whole suite by tests/conftest.py (tests/root uses them too).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ambientctl.errors import LabCommandError
from ambientctl.lab import system
from ambientctl.lab.container import REPO
from ambientctl.lab.kube import SA_ISSUER, KubeCluster, bin_dir, require_binaries
from tests.cluster import objects
from tests.loopback.test_chart import helm_binary

SYSTEM_NS = "istio-system"


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    try:
        require_binaries()
    except LabCommandError as e:
        pytest.fail(str(e))
    cluster = KubeCluster(root=tmp_path_factory.mktemp("kube"), bin=bin_dir())
    cluster.start(timeout=180)
    try:
        yield cluster
    finally:
        pids = list(cluster.pids.values())
        cluster.stop()
        # Nothing left behind: every process gone, the directory removed.
        assert not any(system.alive(p) for p in pids)
        assert not cluster.root.exists()


RBAC_KINDS = {
    "CustomResourceDefinition",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
}


@pytest.fixture(scope="session")
def chart(kube: KubeCluster) -> KubeCluster:
    """The chart's CRDs, ServiceAccounts and RBAC (rendered by the real helm, applied with the
    real kubectl: server-side validation, CRDs Established), in istio-system. The workloads are
    not applied here: these tests run the components as processes with a token of the chart's
    service account, so the chart's RBAC is exactly what they get."""
    rendered = subprocess.run(
        [helm_binary(), "template", "ambient", str(REPO / "charts/ambient"), "-n", SYSTEM_NS],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    docs = [d for d in yaml.safe_load_all(rendered) if d and d.get("kind") in RBAC_KINDS]
    kube.kubectl("create", "namespace", SYSTEM_NS)
    kube.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    return kube


def sa_kubeconfig(kube: KubeCluster, path: Path, ns: str, sa: str) -> Path:
    """A kubeconfig that authenticates as ``ns/sa`` with a TokenRequest token (API audience)."""
    tok = objects.token(kube, ns, sa, audiences=[SA_ISSUER], pod=None)
    assert kube.pki is not None
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": kube.server, "certificate-authority": str(kube.pki.ca.cert)},
            }
        ],
        "users": [{"name": "u", "user": {"token": tok}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path.write_text(json.dumps(doc))
    return path
