"""The Kubernetes source against the API STAND-IN (tests/kubeapi_standin.py) over real HTTP on
loopback, for what a real API server cannot be made to do on demand: 410 Gone after a
compaction (re-list; a real server's watch cache serves old resourceVersions), a BOOKMARK within
a second (a real server sends them about once a minute), an outage answered 503, a malformed
object (a real server's validation refuses it) and missing CRDs per group. Everything a real
server can serve (list, watch, restarts, an API server restart, translation of real objects)
runs against one in tests/cluster/test_controlplane_source.py."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from kubernetes_asyncio import client

from controlplane.sources.kube import KubernetesSource
from controlplane.store import ConfigStore
from meshcore.kubeapi import KubeApi
from tests.helpers import loopback_block, run
from tests.kubeapi_standin import KubeApiStandIn
from tests.loopback.cpfixtures import eventually

pytestmark = pytest.mark.timeout(60)
BLOCK = loopback_block()
API_IP = BLOCK.ip(1)


def pod(name: str, ip: str, node: str = "node-a", sa: str = "default") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": sa},
        "status": {"podIP": ip, "phase": "Running"},
    }


@contextlib.asynccontextmanager
async def source(api: KubeApiStandIn, **kw: Any) -> Any:
    cfg = client.Configuration()
    cfg.host = f"http://{API_IP}:{api.port}"
    store = ConfigStore()
    src = KubernetesSource(store, kube=KubeApi(configuration=cfg), **kw)
    task = asyncio.get_running_loop().create_task(src.run())
    try:
        await asyncio.wait_for(src.synced.wait(), 10)
        yield store, src
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def pods(store: ConfigStore) -> list[str]:
    ns = store.snapshot.namespaces.get("default")
    return sorted(ns.pods) if ns else []


async def _list_watch_bookmark_restart_and_gone() -> None:
    api = KubeApiStandIn(bookmark_interval=0.05)
    await api.start(API_IP)
    try:
        await api.upsert(
            "namespaces",
            {"metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        )
        await api.upsert("pods", pod("a", "10.1.0.1"))
        async with source(api, watch_timeout=30) as (store, src):
            assert pods(store) == ["a"]
            assert src.lists["Pod"] == 1
            # watch: ADDED / MODIFIED / DELETED
            await api.upsert("pods", pod("b", "10.1.0.2"))
            await eventually(lambda: pods(store) == ["a", "b"], 5, "ADDED")
            await api.upsert("pods", pod("b", "10.1.0.3"))
            await eventually(
                lambda: store.snapshot.namespaces["default"].pods["b"].ips == ("10.1.0.3",), 5
            )
            await api.delete("pods", "default", "a")
            await eventually(lambda: pods(store) == ["b"], 5, "DELETED")
            # BOOKMARK: a change of another kind advances the pod watch's resourceVersion.
            rv = await api.upsert("services", {"metadata": {"name": "s", "namespace": "default"}})
            await eventually(lambda: src.resource_versions.get("Pod") == str(rv), 5, "bookmark")
            # Watch restart (stream closed): resumes from the resourceVersion, no re-list.
            watches = src.watches["Pod"]
            await api.close_watches()
            await eventually(lambda: src.watches["Pod"] > watches, 5, "watch restarted")
            await api.upsert("pods", pod("c", "10.1.0.4"))
            await eventually(lambda: pods(store) == ["b", "c"], 5)
            assert src.lists["Pod"] == 1
            assert any(
                f"resourceVersion={rv}" in r or "resourceVersion=" in r for r in api.requests
            )
            # Outage + compaction: the old resourceVersion is gone (410) -> re-list, and a
            # deletion that happened meanwhile is applied.
            api.available = False
            await api.close_watches()
            await asyncio.sleep(0.1)
            await api.delete("pods", "default", "b")
            await api.upsert("pods", pod("d", "10.1.0.5"))
            api.compact()
            await api.upsert("pods", pod("e", "10.1.0.6"))
            api.available = True
            await eventually(lambda: pods(store) == ["c", "d", "e"], 10, "re-list after 410")
            assert src.lists["Pod"] == 2
    finally:
        await api.stop()


async def _malformed_object_and_missing_crds_are_reported() -> None:
    api = KubeApiStandIn(groups={"discovery.k8s.io/v1"})  # no Istio / Gateway API CRDs
    await api.start(API_IP)
    try:
        await api.upsert("pods", pod("good", "10.2.0.1"))
        bad = pod("bad", "not-an-ip")
        await api.upsert("pods", bad)
        async with source(api) as (store, _src):
            assert pods(store) == ["good"]
            warnings = store.source_warnings()
            assert "status.podIP" in warnings["Pod default/bad"]
            assert "security.istio.io/v1 is not served" in warnings["AuthorizationPolicy"]
            # A later good version of the object is taken and clears the warning.
            await api.upsert("pods", pod("bad", "10.2.0.2"))
            await eventually(lambda: pods(store) == ["bad", "good"], 5)
            assert "Pod default/bad" not in store.source_warnings()
    finally:
        await api.stop()


def test_list_watch_bookmark_restart_and_gone() -> None:
    run(_list_watch_bookmark_restart_and_gone())


def test_malformed_object_and_missing_crds_are_reported() -> None:
    run(_malformed_object_and_missing_crds_are_reported())
