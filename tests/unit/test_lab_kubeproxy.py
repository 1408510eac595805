"""The lab kube-proxy's rules (ambientctl.lab.kubeproxy.ruleset) and the container launcher's
mount order (ambientctl.lab.container): pure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from ambientctl.lab.container import Bind, launcher_argv, ordered, parse_bind
from ambientctl.lab.kubeproxy import TABLE, ruleset


def svc(name: str, cip: str, *ports: tuple[str, int, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "clusterIP": cip,
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
        },
    }


def eps(name: str, port: tuple[str, int], *endpoints: tuple[str, bool]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": port[0], "port": port[1]}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": r}} for a, r in endpoints],
    }


def test_ruleset() -> None:
    services = [
        svc("one", "10.96.0.5", ("grpc", 15012, "TCP")),
        svc("two", "10.96.0.6", ("http", 80, "TCP"), ("dns", 53, "UDP")),
        svc("headless", "None", ("http", 80, "TCP")),
        svc("empty", "10.96.0.7", ("http", 80, "TCP")),
    ]
    slices = [
        eps("one", ("grpc", 15012), ("10.240.1.2", True)),
        eps(
            "two", ("http", 8080), ("10.240.1.3", True), ("10.240.2.3", True), ("10.240.2.9", False)
        ),
        eps("two", ("dns", 5353), ("10.240.1.3", True)),
        eps("headless", ("http", 80), ("10.240.1.4", True)),
    ]
    text = ruleset(services, slices)
    assert text.startswith(f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")  # atomic
    assert "ip daddr 10.96.0.5 tcp dport 15012 dnat to 10.240.1.2:15012" in text
    two = "ip daddr 10.96.0.6 tcp dport 80 dnat to numgen random mod 2 map "
    assert two + "{ 0 : 10.240.1.3, 1 : 10.240.2.3 }:8080" in text  # not-ready left out
    assert "10.240.2.9" not in text
    assert "dport 53" not in text  # UDP: not proxied
    assert "10.240.1.4" not in text  # headless: no ClusterIP
    assert "10.96.0.7" not in text  # no ready endpoint: no rule (connection refused upstream)


def test_bind_order_and_parse() -> None:
    a = Bind(source=Path("/n/run"), target=Path("/var/run/ambient"))
    b = Bind(source=Path("/n/run/z"), target=Path("/var/run/ambient/ztunnel"))
    same = Bind(source=Path("/lib/modules"), target=Path("/lib/modules"))
    assert ordered([b, same, a]) == [a, b]  # parents first; identity binds dropped
    assert parse_bind("/s=/t:ro") == Bind(source=Path("/s"), target=Path("/t"), read_only=True)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bind("relative=/t")
    argv = launcher_argv("/py", [b, a], ["ztunnel", "--x"], created=Path("/c"))
    assert argv[:5] == ["unshare", "--mount", "--propagation", "slave", "--"]
    assert argv[-3:] == ["--", "ztunnel", "--x"]
    assert argv.index("/n/run=/var/run/ambient") < argv.index("/n/run/z=/var/run/ambient/ztunnel")
