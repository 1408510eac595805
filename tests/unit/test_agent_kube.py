"""The node agent with its Kubernetes label source against the API STAND-IN
(tests/kubeapi_standin.py) over real HTTP on loopback: list+watch of namespaces and of this
node's pods only (field selector), live enrolment/release on namespace label changes, the pod
opt-out label, adoption of pods that existed before the agent, re-list after 410 Gone, and
refusal (CNI code 11) before the first sync. Capture is the in-memory stand-in of
test_cni_agent (the kernel side is tested in tests/root)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from cni.agent import Agent
from cni.errors import TryAgainLater
from cni.kubelabels import KubeLabels
from tests.kubeapi_standin import KubeApiStandIn
from tests.unit.test_cni_agent import FakeCapture, enroll_req

pytestmark = pytest.mark.timeout(60)
API_IP = "127.0.57.1"
MODE = "istio.io/dataplane-mode"


def run(coro: Coroutine[Any, Any, None], timeout: float = 45) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}}


def pod(
    name: str, ip: str, node: str = "node-a", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "mesh",
            "uid": "uid-" + name,
            "labels": labels or {"app": name},
        },
        "spec": {"nodeName": node, "serviceAccountName": "default"},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"},
    }


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def _agent_follows_kubernetes(tmp: Path) -> None:
    api = KubeApiStandIn(bookmark_interval=0.05)
    await api.start(API_IP)
    await api.upsert("namespaces", namespace("mesh"))
    await api.upsert("pods", pod("a1", "10.0.0.2"))
    await api.upsert("pods", pod("a2", "10.0.0.3", labels={MODE: "none"}))
    await api.upsert("pods", pod("b1", "10.0.1.2", node="node-b"))
    cfg = client.Configuration()
    cfg.host = f"http://{API_IP}:{api.port}"
    kube = KubeLabels("node-a", configuration=cfg, watch_timeout=30)
    veths = {"10.0.0.2": "veth-a1", "10.0.0.3": "veth-a2", "10.0.0.4": "veth-a3"}
    capture = FakeCapture()
    agent = Agent(
        node="node-a",
        capture=capture,
        labels=kube,
        inventory=kube,
        state_dir=tmp / "state",
        exists=lambda p: True,
        pick_veth=lambda candidates, guess: guess,
        find_veth=veths.get,
    )
    agent.load()
    # Before the first list nothing is decided: an ADD is refused with "try again later" (11)
    # and there is no version, so the agent's watcher does not reconcile on an empty cache.
    with pytest.raises(TryAgainLater):
        kube.labels("mesh", "a1")
    assert agent.handle(enroll_req("x", "mesh", "x", "10.0.0.7", "veth-x"))["code"] == 11
    assert not agent.labels_changed()

    task = asyncio.get_running_loop().create_task(kube.run())
    try:
        await eventually(lambda: kube.synced)
        assert agent.labels_changed()
        changes = agent.reconcile()
        # Pods that ran before the agent are adopted with the API's IP and the kernel's veth;
        # node-b's pod never reaches this agent (the API server filters by spec.nodeName).
        assert {"adopted mesh/a1 veth veth-a1", "adopted mesh/a2 veth veth-a2"} <= set(changes)
        assert set(agent.pods) == {"uid-a1", "uid-a2"}
        assert capture.enrolled() == {}
        assert set(capture.observed()) == {"10.0.0.2", "10.0.0.3"}
        pod_requests = [r for r in api.requests if r.startswith("pods?")]
        assert pod_requests and all("fieldSelector=spec.nodeName" in r for r in pod_requests)
        assert all("node-a" in r for r in pod_requests)

        # kubectl label namespace mesh istio.io/dataplane-mode=ambient: enrolled live; the
        # opted-out pod stays out.
        await api.upsert("namespaces", namespace("mesh", {MODE: "ambient"}))
        await eventually(agent.labels_changed)
        changes = agent.reconcile()
        assert set(capture.enrolled()) == {"10.0.0.2"}
        assert capture.enrolled()["10.0.0.2"].uid == "uid-a1"
        assert set(capture.observed()) == {"10.0.0.3"}
        assert "mesh/a1 redirection disabled -> enabled" in changes

        # A new pod through the CNI plugin: decided by the watched labels.
        await api.upsert("pods", pod("a3", "10.0.0.4"))
        await eventually(lambda: "uid-a3" in kube.local_pods())
        answer = agent.handle(enroll_req("uid-a3", "mesh", "a3", "10.0.0.4", "veth-a3"))
        assert answer.get("result") == "enrolled", answer
        # Its pod label opt-out, set later, releases it live.
        await api.upsert("pods", pod("a3", "10.0.0.4", labels={MODE: "none"}))
        await eventually(lambda: kube.labels("mesh", "a3")[1].get(MODE) == "none")
        assert agent.labels_changed()
        agent.reconcile()
        assert set(capture.enrolled()) == {"10.0.0.2"}

        # History compacted while an adopted pod is deleted and the label removed: the watch
        # gets 410, the agent re-lists, and the missed deletion is applied.
        lists_before = kube.lists["namespaces"]
        api.compact()
        await api.close_watches()
        await api.delete("pods", "mesh", "a2")
        await api.upsert("namespaces", namespace("mesh"))
        api.compact()
        await eventually(lambda: kube.lists["namespaces"] > lists_before)
        await eventually(lambda: "uid-a2" not in kube.local_pods())
        await eventually(agent.labels_changed)
        changes = agent.reconcile()
        assert "deleted mesh/a2" in changes
        assert capture.enrolled() == {}
        assert "10.0.0.3" not in capture.entries
        assert set(agent.pods) == {"uid-a1", "uid-a3"}
        # Bookmarks keep the resume point current without touching the caches.
        version = kube.version()
        await api.upsert("pods", pod("b2", "10.0.1.3", node="node-b"))
        await eventually(lambda: kube.resource_versions.get("pods") == str(api.rv))
        assert kube.version() == version
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.stop()


def test_agent_follows_kubernetes(tmp_path: Path) -> None:
    run(_agent_follows_kubernetes(tmp_path))


def test_parse_args_labels_from() -> None:
    from cni.agent import parse_args

    args = parse_args(["--node", "n", "--labels-from", "kubernetes", "--kubeconfig", "/k"])
    assert args.labels_from == "kubernetes" and args.kubeconfig == Path("/k")
    with pytest.raises(SystemExit):
        parse_args(["--node", "n", "--labels-from", "bogus"])
