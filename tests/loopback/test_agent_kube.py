"""The node agent with its Kubernetes label source against the API STAND-IN
(tests/kubeapi_standin.py) over real HTTP on loopback: list+watch of namespaces and of this
node's pods only (field selector), live enrolment/release on namespace label changes, the pod
opt-out label, adoption of pods that existed before the agent, re-list after 410 Gone, and
refusal (CNI code 11) before the first sync. Capture is the in-memory stand-in of
test_cni_agent (the kernel side is tested in tests/root).
Why the stand-in here: 410 Gone after a compaction and bookmarks on demand, which a real API
server cannot be made to produce; the rest runs against a real one in
tests/cluster/test_agent_labels.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from cni.agent import Agent, AgentServer
from cni.errors import TryAgainLater
from cni.kubelabels import KubeLabels
from tests.helpers import eventually, loopback_block, run
from tests.kubeapi_standin import KubeApiStandIn
from tests.unit.test_cni_agent import FakeCapture, enroll_req

pytestmark = pytest.mark.timeout(60)
BLOCK = loopback_block()
API_IP = BLOCK.ip(1)
MODE = "istio.io/dataplane-mode"


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
        assert pod_requests
        assert all("fieldSelector=spec.nodeName" in r for r in pod_requests)
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
    assert args.labels_from == "kubernetes"
    assert args.kubeconfig == Path("/k")
    with pytest.raises(SystemExit):
        parse_args(["--node", "n", "--labels-from", "bogus"])


def test_served_agent_with_kubernetes_labels(tmp_path: Path) -> None:
    """The agent process's wiring (AgentServer + the watch as a background task, reconcile by
    the poll): the CNI plugin over the real socket gets "try again later" (11) while the API is
    unreachable, then decisions follow the API live; a pod that ran before is adopted and
    enrolled without any CNI call."""
    from tests.unit.test_cni_agent import run_plugin

    loop = asyncio.new_event_loop()
    api = KubeApiStandIn(bookmark_interval=0.05)
    capture = FakeCapture()
    sock = tmp_path / "agent.sock"

    def call(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    def wait(check: Callable[[], bool]) -> None:
        call(eventually(check))

    async def setup() -> None:
        await api.start(API_IP)
        await api.upsert("namespaces", namespace("mesh", {MODE: "ambient"}))
        await api.upsert("pods", pod("old", "10.0.0.9", node="n1"))
        client_pod = pod("client", "10.0.0.2", node="n1")
        client_pod["metadata"]["uid"] = "a"  # run_plugin's K8S_POD_UID
        await api.upsert("pods", client_pod)
        api.available = False

    ready = threading.Event()
    holder: dict[str, Any] = {}

    def target() -> None:
        asyncio.set_event_loop(loop)
        loop.add_signal_handler = lambda *a, **k: None  # type: ignore[method-assign]
        loop.run_until_complete(setup())
        cfg = client.Configuration()
        cfg.host = f"http://{API_IP}:{api.port}"
        kube = KubeLabels("n1", configuration=cfg, watch_timeout=30)
        agent = Agent(
            node="n1",
            capture=capture,
            labels=kube,
            inventory=kube,
            state_dir=tmp_path / "state",
            exists=lambda p: True,
            pick_veth=lambda candidates, guess: guess,
            find_veth={"10.0.0.9": "veth9"}.get,
        )
        agent.load()
        server = AgentServer(agent, sock, poll=0.05, background=[kube.run])
        holder.update(server=server, kube=kube)
        ready.set()
        loop.run_until_complete(server.run())
        loop.run_until_complete(api.stop())

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        wait(sock.exists)
        code, err = run_plugin("ADD", sock)
        assert (code, err["code"]) == (1, 11), err  # not synced: the runtime retries
        assert capture.entries == {}
        api.available = True
        wait(lambda: holder["kube"].synced)
        wait(lambda: "10.0.0.9" in capture.enrolled())  # adopted by the poll's reconcile
        assert capture.enrolled()["10.0.0.9"].host_ifname == "veth9"
        code, result = run_plugin("ADD", sock)
        assert code == 0, result
        assert set(capture.enrolled()) == {"10.0.0.2", "10.0.0.9"}
        call(api.upsert("namespaces", namespace("mesh")))  # kubectl label ns mesh mode-
        wait(lambda: capture.enrolled() == {})
        assert set(capture.observed()) == {"10.0.0.2", "10.0.0.9"}
        assert run_plugin("DEL", sock) == (0, None)
        assert "10.0.0.2" not in capture.entries
    finally:
        loop.call_soon_threadsafe(holder["server"]._stop.set)
        thread.join(10)
        loop.close()


FIND_VETH_SCRIPT = """
import subprocess, sys
from cni.agent import _default_find_veth as find
def sh(c): subprocess.run(c, shell=True, check=True)
sh("ip link set lo up")
sh("ip link add vh1 type veth peer name vp1 && ip link set vh1 up && ip link set vp1 up")
sh("ip route add 10.1.0.5/32 dev vh1")
sh("ip link add br0 type bridge && ip link set br0 up && ip addr add 10.2.0.1/24 dev br0")
for n in (2, 3):
    sh(f"ip link add vh{n} type veth peer name vp{n} && ip link set vh{n} master br0")
    sh(f"ip link set vh{n} up && ip link set vp{n} up")
sh("ip neigh replace 10.2.0.7 lladdr 02:00:00:00:00:07 dev br0")
sh("bridge fdb replace 02:00:00:00:00:07 dev vh3 master")
print(find("10.1.0.5"), find("10.2.0.7"), find("10.9.9.9"))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root (a private netns)"
)
def test_default_find_veth_in_a_private_netns() -> None:
    """The kernel lookup adoption relies on, in a throw-away network namespace (unshare -n):
    a point-to-point route names the veth; behind a bridge, neighbour MAC -> forwarding entry
    names the bridge port; no route -> None."""
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", FIND_VETH_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["vh1", "vh3", "None"]
