"""The lab kubelet's pure parts (ambientctl.lab.kubelet): a container as a host process
(Kubernetes ``$(VAR)`` expansion with ``$$`` escapes, fieldRef env, refused env sources, path
mapping) and the pod status it reports."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ambientctl.errors import LabCommandError
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
