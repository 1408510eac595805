"""The control plane's Kubernetes source (controlplane.sources.kube) against the REAL API
server, as the chart's ``ambient-controlplane`` service account (its read RBAC must cover every
kind the source lists), with the chart's CRDs installed for real.

Asserted: discovery finds every kind (no "not served" warning); list, then watch ADDED /
MODIFIED / DELETED; watches that the server ends (timeoutSeconds) resume from the last
resourceVersion without a re-list and lose no event; an API server restart (every watch cut,
the server down for a moment) loses no event either; a real Service (ClusterIP allocated by the
API server) and a PeerAuthentication translate into workload records; an
HTTPLocalRateLimitPolicy (the chart's CRD) is validated by the server, watched and served to
waypoints; a Node's topology labels give its pods their locality.
Stays on the stand-in (tests/loopback/test_controlplane_kube.py), because a real API server
cannot be made to do it on demand: 410 Gone after a compaction (its watch cache serves old
resourceVersions), immediate bookmarks (a real server sends them about once a minute), and
malformed objects (the real server's validation refuses them).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ambientctl.lab.kube import KubeCluster
from controlplane.l7 import l7_resources
from controlplane.sources.kube import KINDS, KubernetesSource
from controlplane.store import ConfigStore
from controlplane.translate import TranslateOptions
from controlplane.translator import Translator
from meshcore.kubeapi import KubeApi
from meshcore.model import Workload
from tests.cluster import objects
from tests.cluster.fixtures import SYSTEM_NS, sa_kubeconfig
from tests.loopback.cpfixtures import eventually

pytestmark = pytest.mark.timeout(180)
NS = "src-mesh"


@contextlib.asynccontextmanager
async def source(kubeconfig: Path, **kw: Any) -> AsyncIterator[tuple[ConfigStore, Any]]:
    store = ConfigStore()
    src = KubernetesSource(store, kube=KubeApi(kubeconfig=kubeconfig), **kw)
    task = asyncio.get_running_loop().create_task(src.run())
    try:
        await asyncio.wait_for(src.synced.wait(), 30)
        yield store, src
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def pods(store: ConfigStore) -> list[str]:
    ns = store.snapshot.namespaces.get(NS)
    return sorted(ns.pods) if ns else []


def test_source_lists_watches_and_survives_restarts(chart: KubeCluster, tmp_path: Path) -> None:
    kube = chart
    objects.namespace(kube, NS, **{"istio.io/dataplane-mode": "ambient"})
    objects.pod(kube, NS, "a", objects.PodOptions(node_name="src-node", ip="10.1.0.1"))
    kc = sa_kubeconfig(kube, tmp_path / "cp.kubeconfig", SYSTEM_NS, "ambient-controlplane")

    async def main() -> None:
        async with source(kc, watch_timeout=2) as (store, src):
            # Every kind is served (CRDs installed) and readable with the chart's RBAC.
            warnings = store.source_warnings()
            assert not [k for k in warnings if "not served" in warnings[k]], warnings
            assert all(src.lists.get(k.kind) == 1 for k in KINDS), src.lists
            assert pods(store) == ["a"]
            await asyncio.to_thread(
                objects.pod, kube, NS, "b", objects.PodOptions(node_name="src-node", ip="10.1.0.2")
            )
            await eventually(lambda: pods(store) == ["a", "b"], 10, "ADDED")
            await asyncio.to_thread(objects.set_pod_ip, kube, NS, "b", "10.1.0.3")
            await eventually(
                lambda: store.snapshot.namespaces[NS].pods["b"].ips == ("10.1.0.3",),
                10,
                "MODIFIED",
            )
            await asyncio.to_thread(
                kube.request, "DELETE", f"/api/v1/namespaces/{NS}/pods/a?gracePeriodSeconds=0"
            )
            await eventually(lambda: pods(store) == ["b"], 10, "DELETED")
            # The server ends each watch after timeoutSeconds=2: resumed without a re-list.
            watches = src.watches["Pod"]
            await eventually(lambda: src.watches["Pod"] >= watches + 2, 15, "watch restarts")
            await asyncio.to_thread(
                objects.pod, kube, NS, "c", objects.PodOptions(node_name="src-node", ip="10.1.0.4")
            )
            await eventually(lambda: pods(store) == ["b", "c"], 10, "event after restart")
            assert src.lists["Pod"] == 1
            # API server restart: watches are cut and fail while it is down; nothing is lost.
            await asyncio.to_thread(kube.restart_apiserver, down=1.0)
            await asyncio.to_thread(
                objects.pod, kube, NS, "d", objects.PodOptions(node_name="src-node", ip="10.1.0.5")
            )
            await eventually(lambda: pods(store) == ["b", "c", "d"], 30, "event after restart")

    asyncio.run(asyncio.wait_for(main(), 150))


def test_translation_from_real_objects(chart: KubeCluster, tmp_path: Path) -> None:
    kube = chart
    ns = "src-translate"
    objects.namespace(kube, ns, **{"istio.io/dataplane-mode": "ambient"})
    objects.service_account(kube, ns, "web")
    # The pod's locality comes from its Node's topology labels (read with the chart's RBAC).
    objects.node(kube, "zoned-node")
    topology = {"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1"}
    patch = {"metadata": {"labels": topology}}
    objects.ok(kube.request("PATCH", "/api/v1/nodes/zoned-node", patch, content_type=objects.MERGE))
    objects.pod(
        kube, ns, "web", objects.PodOptions(node_name="zoned-node", sa="web", ip="10.3.0.1")
    )
    svc = objects.ok(
        kube.request(
            "POST",
            f"/api/v1/namespaces/{ns}/services",
            {
                "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
            },
        ),
        201,
    )
    vip = svc["spec"]["clusterIP"]
    assert vip.startswith("10.96.")  # allocated by the API server
    objects.ok(
        kube.request(
            "POST",
            f"/apis/security.istio.io/v1/namespaces/{ns}/peerauthentications",
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": "default"},
                "spec": {"mtls": {"mode": "STRICT"}},
            },
        ),
        201,
    )
    # A local rate limit in the shape of the chart's CRD (Linkerd's HTTPLocalRateLimitPolicy).
    objects.ok(
        kube.request(
            "POST",
            f"/apis/policy.linkerd.io/v1alpha1/namespaces/{ns}/httplocalratelimitpolicies",
            {
                "apiVersion": "policy.linkerd.io/v1alpha1",
                "kind": "HTTPLocalRateLimitPolicy",
                "metadata": {"name": "web-rl"},
                "spec": {
                    "targetRef": {"kind": "Service", "name": "web"},
                    "total": {"requestsPerSecond": 5},
                },
            },
        ),
        201,
    )
    # The CRD's schema refuses a rate that is not a positive integer (server-side validation).
    code, _body = kube.request(
        "POST",
        f"/apis/policy.linkerd.io/v1alpha1/namespaces/{ns}/httplocalratelimitpolicies",
        {
            "apiVersion": "policy.linkerd.io/v1alpha1",
            "kind": "HTTPLocalRateLimitPolicy",
            "metadata": {"name": "bad"},
            "spec": {
                "targetRef": {"kind": "Service", "name": "web"},
                "total": {"requestsPerSecond": 0},
            },
        },
    )
    assert code == 422
    kc = sa_kubeconfig(kube, tmp_path / "cp.kubeconfig", SYSTEM_NS, "ambient-controlplane")

    async def main() -> None:
        async with source(kc) as (store, _src):
            # Watched with the chart's RBAC and served to waypoints as an L7 resource.
            await eventually(
                lambda: (
                    f"HTTPLocalRateLimitPolicy/{ns}/web-rl"
                    in l7_resources(store.snapshot, TranslateOptions())
                ),
                10,
                "rate limit",
            )
            res = l7_resources(store.snapshot, TranslateOptions())
            assert '"requestsPerSecond":5' in res[f"HTTPLocalRateLimitPolicy/{ns}/web-rl"].json
            t = Translator(TranslateOptions())
            t.update(store.snapshot)
            w = next(
                r
                for r in t.records()
                if isinstance(r, Workload) and r.uid == f"Kubernetes//Pod/{ns}/web"
            )
            assert w.locality is not None
            assert (w.locality.region, w.locality.zone) == ("r1", "z1")
            port = w.services_map[f"{ns}/web.{ns}.svc.cluster.local"][0]
            assert port.target_port == 8080
            assert "istio-system/istio_converted_static_strict" in w.authorization_policies

    asyncio.run(asyncio.wait_for(main(), 60))
