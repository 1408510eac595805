"""The node agent's logic and the plugin<->agent protocol over a real unix socket.

Capture is an in-memory stand-in (the kernel side is tested in tests/root); labels come from real
manifest files; the plugin is run through `cni.plugin.run` with real env/stdin/stdout.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cni import plugin
from cni.agent import Agent, AgentServer, PodRecord
from cni.labels import ManifestLabels, wants_ambient
from controlplane.objects import Pod
from controlplane.translate import is_ambient


@dataclass(frozen=True)
class Entry:
    uid: str
    ip: str
    host_ifname: str
    enrolled: bool = True


@dataclass
class FakeCapture:
    entries: dict[str, Entry] = field(default_factory=dict)
    fail_enroll: bool = False

    def install(self) -> None:
        pass

    def uninstall(self) -> None:
        self.entries.clear()

    def enroll(self, *, uid: str, ip: str, host_ifname: str) -> Entry:
        if self.fail_enroll:
            raise OSError("bpf map full")
        self.entries[ip] = Entry(uid, ip, host_ifname)
        return self.entries[ip]

    def unenroll(self, *, ip: str) -> None:
        self.entries.pop(ip, None)

    def enrolled(self) -> dict[str, Entry]:
        return {ip: e for ip, e in self.entries.items() if e.enrolled}

    def observed(self) -> dict[str, Entry]:
        return {ip: e for ip, e in self.entries.items() if not e.enrolled}

    def observe(self, *, ip: str, host_ifname: str) -> None:
        self.entries[ip] = Entry("", ip, host_ifname, enrolled=False)


MANIFESTS = """
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: optout, namespace: mesh, labels: {istio.io/dataplane-mode: none}}
"""


@pytest.mark.parametrize(
    ("ns", "pod", "want"),
    [
        ({}, {}, False),
        ({"istio.io/dataplane-mode": "ambient"}, {}, True),
        ({"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "none"}, False),
        ({}, {"istio.io/dataplane-mode": "ambient"}, True),
        ({"istio.io/dataplane-mode": "other"}, {}, False),
        # Istio: an explicit pod label other than "ambient" opts out, whatever the namespace
        # says (the control plane never made such a pod an HBONE workload).
        ({"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "Ambient"}, False),
        ({"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "sidecar"}, False),
    ],
)
def test_wants_ambient(ns: dict[str, str], pod: dict[str, str], want: bool) -> None:
    assert wants_ambient(ns, pod) is want
    # One owner: the control plane enrolls exactly the same pods.
    pod_rec = Pod(namespace="mesh", name="p", labels=tuple(sorted(pod.items())))
    assert is_ambient(pod_rec, tuple(sorted(ns.items()))) is want


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Agent, FakeCapture, Path, set[str]]:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "ns.yaml").write_text(MANIFESTS)
    capture = FakeCapture()
    alive: set[str] = set()
    agent = Agent(
        node="n1",
        capture=capture,
        labels=ManifestLabels(tmp_path / "m", tmp_path / "overrides.json"),
        state_dir=tmp_path / "state",
        exists=lambda pod: pod.uid in alive,
        pick_veth=lambda candidates, guess: guess,
    )
    agent.load()
    return agent, capture, tmp_path, alive


def enroll_req(uid: str, ns: str, name: str, ip: str, veth: str) -> dict[str, Any]:
    return {
        "op": "enroll",
        "uid": uid,
        "namespace": ns,
        "name": name,
        "containerId": "c-" + uid,
        "netns": "/run/netns/x",
        "ifname": "eth0",
        "ips": [ip],
        "hostIfname": veth,
        "hostInterfaces": ["cni0", veth],
    }


def test_enroll_decides_by_labels(setup: tuple[Agent, FakeCapture, Path, set[str]]) -> None:
    agent, capture, _, _ = setup
    assert agent.handle(enroll_req("a", "mesh", "client", "10.0.0.2", "veth1"))["result"] == (
        "enrolled"
    )
    assert agent.handle(enroll_req("b", "plain", "other", "10.0.0.3", "veth2"))["result"] == (
        "not-ambient"
    )
    assert agent.handle(enroll_req("c", "mesh", "optout", "10.0.0.4", "veth3"))["result"] == (
        "not-ambient"
    )
    assert set(capture.enrolled()) == {"10.0.0.2"}
    assert {(e.ip, e.host_ifname) for e in capture.observed().values()} == {
        ("10.0.0.3", "veth2"),
        ("10.0.0.4", "veth3"),
    }
    pods = {p["name"]: p["redirection"] for p in agent.handle({"op": "status"})["pods"]}
    assert pods == {"client": "enabled", "other": "", "optout": ""}
    # idempotent ADD, and the registry is on disk
    agent.handle(enroll_req("a", "mesh", "client", "10.0.0.2", "veth1"))
    saved = json.loads(agent.registry_path.read_text())["pods"]
    assert set(saved) == {"a", "b", "c"}


def test_enroll_failure_is_101_and_pending(
    setup: tuple[Agent, FakeCapture, Path, set[str]],
) -> None:
    agent, capture, _, _ = setup
    capture.fail_enroll = True
    answer = agent.handle(enroll_req("a", "mesh", "client", "10.0.0.2", "veth1"))
    assert answer["ok"] is False
    assert answer["code"] == 101
    assert "bpf map full" in answer["details"]
    assert agent.pods["a"].redirection == "pending"


def test_unenroll_and_check(setup: tuple[Agent, FakeCapture, Path, set[str]]) -> None:
    agent, capture, _, _ = setup
    agent.handle(enroll_req("a", "mesh", "client", "10.0.0.2", "veth1"))
    assert agent.handle({"op": "check", "uid": "a"})["result"] == "enrolled"
    capture.entries.clear()  # someone removed the map entry behind our back
    bad = agent.handle({"op": "check", "uid": "a"})
    assert bad["ok"] is False
    assert bad["code"] == 102
    assert agent.handle({"op": "unenroll", "uid": "a"})["result"] == "unenrolled"
    assert agent.handle({"op": "unenroll", "uid": "a"})["result"] == "unenrolled"  # idempotent
    assert agent.handle({"op": "check", "uid": "a"})["code"] == 102
    assert agent.handle({"op": "bogus"})["code"] == 103


def test_label_change_enrolls_and_releases_live(
    setup: tuple[Agent, FakeCapture, Path, set[str]],
) -> None:
    agent, capture, tmp, alive = setup
    alive.update({"a", "b"})
    agent.handle(enroll_req("a", "mesh", "client", "10.0.0.2", "veth1"))
    agent.handle(enroll_req("b", "plain", "other", "10.0.0.3", "veth2"))
    agent.reconcile()
    assert not agent.labels_changed()
    overrides = {
        "namespaces": {
            "plain": {"istio.io/dataplane-mode": "ambient"},
            "mesh": {"istio.io/dataplane-mode": None},
        }
    }
    (tmp / "overrides.json").write_text(json.dumps(overrides))
    assert agent.labels_changed()
    changes = agent.reconcile()
    assert set(capture.enrolled()) == {"10.0.0.3"}
    assert set(capture.observed()) == {"10.0.0.2"}
    assert any("plain/other redirection disabled -> enabled" in c for c in changes)


def test_restart_reconciles_registry_and_leftovers(
    setup: tuple[Agent, FakeCapture, Path, set[str]],
) -> None:
    agent, capture, tmp, alive = setup
    alive.update({"a", "b"})
    agent.handle(enroll_req("a", "mesh", "client", "10.0.0.2", "veth1"))
    agent.handle(enroll_req("b", "mesh", "server", "10.0.0.3", "veth2"))
    # The agent dies; meanwhile pod b disappears and its map entry stays; a stranger's entry
    # (no pod in the registry) is left in the pinned map; pod a's entry was lost.
    alive.discard("b")
    capture.entries.pop("10.0.0.2")
    capture.entries["10.0.0.99"] = Entry("ghost", "10.0.0.99", "vethZ")
    capture.entries["10.0.0.98"] = Entry("", "10.0.0.98", "vethY", enrolled=False)
    again = Agent(
        node="n1",
        capture=capture,
        labels=ManifestLabels(tmp / "m", tmp / "overrides.json"),
        state_dir=tmp / "state",
        exists=lambda pod: pod.uid in alive,
        pick_veth=lambda c, g: g,
    )
    again.load()
    assert set(again.pods) == {"a", "b"}
    again.reconcile()
    assert set(capture.entries) == {"10.0.0.2"}
    assert set(again.pods) == {"a"}


def test_two_agents_of_one_node_share_the_registry(
    setup: tuple[Agent, FakeCapture, Path, set[str]],
) -> None:
    """A DaemonSet surge runs the old and the new agent side by side, on one state dir and one
    pinned map. A pod ADDed through the new agent is not a leftover to the old one: its
    reconcile (a label change, or its poll) reads the registry as on disk. Before, the old
    agent reconciled from its in-memory registry and unenrolled the new pod."""
    old, capture, tmp, alive = setup
    alive.update({"a", "b"})
    old.handle(enroll_req("a", "mesh", "client", "10.0.0.2", "veth1"))
    new = Agent(
        node="n1",
        capture=capture,
        labels=ManifestLabels(tmp / "m", tmp / "overrides.json"),
        state_dir=tmp / "state",
        exists=lambda pod: pod.uid in alive,
        pick_veth=lambda c, g: g,
    )
    new.load()
    new.handle(enroll_req("b", "mesh", "server", "10.0.0.3", "veth2"))
    assert old.reconcile() == []
    assert set(capture.entries) == {"10.0.0.2", "10.0.0.3"}
    # And the other way round: a DEL through the old agent is seen by the new one.
    old.handle({"op": "unenroll", "uid": "a"})
    alive.discard("a")
    assert new.reconcile() == []
    assert set(new.pods) == {"b"}
    assert set(capture.entries) == {"10.0.0.3"}


def test_record_roundtrip() -> None:
    rec = PodRecord(
        uid="u",
        namespace="n",
        name="p",
        container_id="c",
        netns="/x",
        ips=("1.2.3.4",),
        host_ifname="v",
        ambient=True,
        redirection="enabled",
    )
    assert PodRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


# -- the plugin against a real agent socket -----------------------------------------------------


@pytest.fixture
def served(
    setup: tuple[Agent, FakeCapture, Path, set[str]],
) -> Iterator[tuple[Agent, FakeCapture, Path]]:
    agent, capture, tmp, alive = setup
    # The plugin's pod (K8S_POD_UID=a) exists for the agent: its periodic reconcile (every 50 ms
    # here) must not forget it between ADD and CHECK on a busy machine.
    alive.add("a")
    sock = tmp / "agent.sock"
    server = AgentServer(agent, sock, poll=0.05)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def main() -> None:
        task = asyncio.ensure_future(server.run())
        while not sock.exists():
            await asyncio.sleep(0.01)
        ready.set()
        await task

    def target() -> None:
        # signal handlers can only be installed in the main thread: stub them
        loop.add_signal_handler = lambda *a, **k: None  # type: ignore[method-assign]
        loop.run_until_complete(main())

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield agent, capture, sock
    finally:
        loop.call_soon_threadsafe(server._stop.set)
        thread.join(5)
        loop.close()


def run_plugin(command: str, sock: Path, version: str = "1.0.0", **kw: Any) -> tuple[int, Any]:
    environ = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c-a",
        "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=client;K8S_POD_UID=a",
    }
    environ.update(kw.pop("env", {}))
    prev = {
        "cniVersion": version,
        "interfaces": [
            {"name": "cni0", "mac": "aa:00:00:00:00:01"},
            {"name": "veth1", "mac": "aa:00:00:00:00:02"},
            {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/run/netns/x"},
        ],
        "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 2}],
    }
    if version != "1.0.0":
        prev["ips"][0]["version"] = "4"  # type: ignore[index]
    config: dict[str, Any] = {"cniVersion": version, "name": "lab", "type": "ambient-cni"}
    config.update({"agentSocket": str(sock), "agentTimeout": 2, "prevResult": prev})
    config.update(kw)
    out = io.StringIO()
    code = plugin.run(environ, io.BytesIO(json.dumps(config).encode()), out)
    text = out.getvalue()
    return code, json.loads(text) if text else None


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_plugin_add_check_del(served: tuple[Agent, FakeCapture, Path], version: str) -> None:
    _, capture, sock = served
    code, result = run_plugin("ADD", sock, version)
    assert code == 0, result
    assert result["cniVersion"] == version
    assert result["ips"][0]["address"] == "10.0.0.2/24"
    assert ("version" in result["ips"][0]) is (version != "1.0.0")
    assert capture.entries["10.0.0.2"].host_ifname == "veth1"
    code, result = run_plugin("CHECK", sock, version)
    if version == "0.3.1":
        assert (code, result["code"]) == (1, 1)
    else:
        assert (code, result) == (0, None)
    assert run_plugin("DEL", sock, version) == (0, None)
    assert capture.entries == {}
    assert run_plugin("DEL", sock, version) == (0, None)


def test_plugin_add_fails_when_enroll_fails(served: tuple[Agent, FakeCapture, Path]) -> None:
    _, capture, sock = served
    capture.fail_enroll = True
    code, err = run_plugin("ADD", sock)
    assert code == 1
    assert err["code"] == 101
    assert err["cniVersion"] == "1.0.0"
    assert "msg" in err


def test_plugin_add_without_agent_fails_but_del_succeeds(tmp_path: Path) -> None:
    gone = tmp_path / "nobody.sock"
    code, err = run_plugin("ADD", gone)
    assert (code, err["code"]) == (1, 100)
    assert run_plugin("DEL", gone) == (0, None)
    code, err = run_plugin("CHECK", gone, "0.4.0")
    assert (code, err["code"]) == (1, 100)


def test_plugin_add_needs_prev_result(tmp_path: Path) -> None:
    code, err = run_plugin("ADD", tmp_path / "x.sock", prevResult=None)
    assert (code, err["code"]) == (1, 7)


def test_plugin_bad_input_codes(tmp_path: Path) -> None:
    out = io.StringIO()
    assert plugin.run({"CNI_COMMAND": "ADD"}, io.BytesIO(b"{oops"), out) == 1
    assert json.loads(out.getvalue())["code"] == 4  # env is checked first (names variables)
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "e"}
    out = io.StringIO()
    assert plugin.run(env, io.BytesIO(b"{oops"), out) == 1
    assert json.loads(out.getvalue())["code"] == 6
    code, err = run_plugin("ADD", tmp_path / "x.sock", "0.4.0", cniVersion="9.0.0")
    assert (code, err["code"]) == (1, 1)
    code, err = run_plugin("ADD", tmp_path / "x.sock", env={"CNI_NETNS": ""})
    assert (code, err["code"]) == (1, 4)
    assert "CNI_NETNS" in err["msg"]


def test_plugin_version() -> None:
    out = io.StringIO()
    assert plugin.run({"CNI_COMMAND": "VERSION"}, io.BytesIO(b'{"cniVersion":"0.4.0"}'), out) == 0
    assert json.loads(out.getvalue())["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]


def test_stopping_agent_leaves_a_successors_socket(
    setup: tuple[Agent, FakeCapture, Path, set[str]],
) -> None:
    """Surge update: the new pod's agent binds the socket path while the old agent still runs;
    the old agent stopping must not unlink the new one's socket (the plugin talks to it)."""
    agent, _capture, tmp, _alive = setup
    sock = tmp / "agent.sock"

    async def main() -> None:
        server = AgentServer(agent, sock, poll=0.05)
        task = asyncio.ensure_future(server.run())
        while not sock.exists():
            await asyncio.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as successor:
            sock.unlink()
            successor.bind(str(sock))
            server._stop.set()
            await task
            assert sock.exists()

    asyncio.run(main())
