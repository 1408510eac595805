"""The lab kubelet's pure parts (ambientctl.lab.podspec, ambientctl.lab.probes): a container as
a host process (Kubernetes ``$(VAR)`` expansion with ``$$`` escapes, fieldRef env, refused env
sources, path mapping), the pod status it reports, its probes' thresholds and restarts."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from ambientctl.errors import LabCommandError
from ambientctl.lab import probes
from ambientctl.lab.podspec import PodRun, container_process, expand, field_values, pod_status

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
    "spec": {
        "nodeName": "n1",
        "serviceAccountName": "sa",
        "containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "i"}],
    },
}


def test_expand() -> None:
    env = {"A": "x", "B": "y"}
    assert expand("$(A)-$(B)-$(C)", env) == "x-y-$(C)"
    assert expand("$$(A) $$ $(A)", env) == "$(A) $ x"


def test_container_process() -> None:
    fields = field_values(POD, node_ip="172.30.0.11", pod_ip="10.240.1.5")
    c = {
        "name": "app",
        "command": ["ztunnel"],
        "args": ["--node=$(NODE)", "--token=/var/run/tok/token", "--ip", "$(IP)"],
        "env": [
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "DIR", "value": "/var/run/tok/$(NODE)"},
        ],
    }
    p = container_process(c, fields=fields, mounts={"/var/run/tok": Path("/h/v/tok")})
    assert p.argv == ("ztunnel", "--node=n1", "--token=/h/v/tok/token", "--ip", "10.240.1.5")
    assert p.env == {"NODE": "n1", "IP": "10.240.1.5", "DIR": "/h/v/tok/n1"}
    secret = {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    with pytest.raises(LabCommandError, match="unsupported source"):
        container_process({**c, "env": [secret]}, fields=fields, mounts={})
    with pytest.raises(LabCommandError, match="no command"):
        container_process({"name": "x", "image": "i"}, fields=fields, mounts={})


def run(pod_ip: str, node_ip: str, exited: dict[str, int]) -> PodRun:
    return PodRun(pod_ip=pod_ip, node_ip=node_ip, started=T0, exited=exited)


def test_pod_status() -> None:
    s = pod_status(POD, run("10.0.0.2", "1.1.1.1", {}), now=T0)
    assert s["phase"] == "Running"
    assert s["podIP"] == "10.0.0.2"
    assert {c["type"]: c["status"] for c in s["conditions"]}["Ready"] == "True"
    s = pod_status(POD, run("10.0.0.2", "1.1.1.1", {"a": 3}), now=T0)
    assert {c["type"]: c["status"] for c in s["conditions"]}["Ready"] == "False"
    states = {c["name"]: c["state"] for c in s["containerStatuses"]}
    assert states["a"]["terminated"]["exitCode"] == 3
    assert "running" in states["b"]
    never = {**POD, "spec": {**POD["spec"], "restartPolicy": "Never"}}  # type: ignore[dict-item]
    s = pod_status(never, run("", "", {"a": 0, "b": 0}), now=T0)
    assert s["phase"] == "Succeeded"
    s = pod_status(never, run("", "", {"a": 0, "b": 1}), now=T0)
    assert s["phase"] == "Failed"


def test_empty_env_value() -> None:
    """The API server omits an empty ``value`` (the chart's ``CNI_CONF_FILE: ""``): it is "",
    not an unsupported source."""
    fields = field_values(POD, node_ip="172.30.0.11", pod_ip="10.240.1.5")
    c = {"name": "c", "command": ["x"], "env": [{"name": "E"}]}
    assert container_process(c, fields=fields, mounts={}).env == {"E": ""}


def test_pod_status_ready_follows_the_readiness_probe() -> None:
    """A running container is ready only once its readiness probe passed; the pod is Ready
    when every container is. A container that exited in a pod that restarts stays Running
    (restarted by the kubelet), with its restart count."""

    def ready(s: dict[str, object]) -> str:
        conditions = s["conditions"]
        assert isinstance(conditions, list)
        return str({c["type"]: c["status"] for c in conditions}["Ready"])

    up = run("10.0.0.2", "1.1.1.1", {})
    s = pod_status(POD, dataclasses.replace(up, ready={"a": False}), now=T0)
    assert ready(s) == "False"
    assert [c["ready"] for c in s["containerStatuses"]] == [False, True]
    s = pod_status(POD, dataclasses.replace(up, ready={"a": True}), now=T0)
    assert ready(s) == "True"
    crashed = dataclasses.replace(up, exited={"a": 137, "b": 0}, restarts={"a": 2})
    s = pod_status(POD, crashed, now=T0)
    assert s["phase"] == "Running"  # restartPolicy Always (the default): restarted, not Failed
    assert ready(s) == "False"
    assert [c["restartCount"] for c in s["containerStatuses"]] == [2, 0]
    on_failure = {**POD, "spec": {**POD["spec"], "restartPolicy": "OnFailure"}}  # type: ignore[dict-item]
    s = pod_status(on_failure, run("", "", {"a": 0, "b": 0}), now=T0)
    assert s["phase"] == "Succeeded"


def test_probe_spec() -> None:
    c = {
        "name": "z",
        "ports": [{"name": "admin", "containerPort": 15020}],
        "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/r"]}, "periodSeconds": 2},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "admin"},
            "initialDelaySeconds": 60,
            "timeoutSeconds": 3,
            "failureThreshold": 6,
        },
    }
    r = probes.probe(c, "readiness")
    assert r is not None
    assert (r.kind, r.command, r.period, r.timeout, r.failure_threshold) == (
        "exec",
        ("test", "-f", "/tmp/r"),
        2.0,
        1.0,
        3,
    )
    live = probes.probe(c, "liveness")
    assert live is not None
    assert (live.kind, live.port, live.path, live.initial_delay, live.timeout) == (
        "httpGet",
        15020,
        "/healthz",
        60.0,
        3.0,
    )
    assert probes.probe({"name": "n"}, "readiness") is None
    tcp = probes.probe({"name": "t", "readinessProbe": {"tcpSocket": {"port": 15012}}}, "readiness")
    assert tcp is not None
    assert (tcp.kind, tcp.port, tcp.period) == ("tcpSocket", 15012, 10.0)
    # What the lab cannot run is refused, never taken as a success.
    refused: list[dict[str, object]] = [
        {"grpc": {"port": 1}},
        {"httpGet": {"port": 80, "scheme": "HTTPS"}},
        {"httpGet": {"port": "nope"}},
        {"exec": {}},
    ]
    for bad in refused:
        with pytest.raises(LabCommandError):
            probes.probe({"name": "x", "readinessProbe": bad}, "readiness")


def test_probe_thresholds() -> None:
    """Readiness starts False, turns True after successThreshold successes, False again after
    failureThreshold consecutive failures; liveness starts True; checks follow the period."""
    p = probes.Probe(
        which="readiness",
        kind="exec",
        command=("x",),
        initial_delay=5.0,
        period=2.0,
        success_threshold=2,
        failure_threshold=3,
    )
    s = probes.initial(p, 100.0)
    assert (s.ok, s.next_at) == (False, 105.0)
    s = probes.step(p, s, True, 105.0)
    assert (s.ok, s.next_at) == (False, 107.0)
    s = probes.step(p, s, True, 107.0)
    assert s.ok
    for t in (109.0, 111.0):
        s = probes.step(p, s, False, t)
        assert s.ok  # not yet failureThreshold failures
    s = probes.step(p, s, True, 113.0)  # a success resets the failure count
    for t in (115.0, 117.0):
        s = probes.step(p, s, False, t)
    assert s.ok
    s = probes.step(p, s, False, 119.0)
    assert not s.ok
    live = probes.Probe(which="liveness", kind="tcpSocket", port=1, failure_threshold=1)
    s = probes.initial(live, 0.0)
    assert s.ok
    assert not probes.step(live, s, False, 1.0).ok


def test_restart_backoff() -> None:
    assert probes.restarts("Always", 0)
    assert probes.restarts("OnFailure", 137)
    assert not probes.restarts("OnFailure", 0)
    assert not probes.restarts("Never", 1)
    assert probes.backoff(0, 1.0) == 0.0  # the first restart is immediate
    assert [probes.backoff(n, 1.0) for n in (1, 2, 3, 6, 9)] == [10.0, 20.0, 40.0, 300.0, 300.0]
    assert probes.backoff(5, 600.0) == 0.0  # ran 10 minutes: the back-off is reset
