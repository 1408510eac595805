"""`ambientctl ztunnel-config` and `proxy-status` against real running processes on loopback.

Addresses (disjoint from every other test):
  static node proxies: node-a 127.0.91.1 (pod sleep 127.0.91.10), node-b 127.0.92.1 (pod echo
  127.0.92.10, backend :8080), service echo VIP 127.0.93.10:80
  control plane 127.0.94.1:15012 (debug 127.0.94.1:15014), its node proxy node-c 127.0.95.1
  (pod web 127.0.95.10)
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambientctl.main import main
from tests.helpers import BIN, spawn, spawn_ztunnel, stop_processes

NODE_A, SLEEP = "127.0.91.1", "127.0.91.10"
NODE_B, ECHO = "127.0.92.1", "127.0.92.10"
VIP = "127.0.93.10"
CP = "127.0.94.1"
NODE_C, WEB = "127.0.95.1", "127.0.95.10"
SLEEP_ID = "spiffe://cluster.local/ns/default/sa/sleep"
ECHO_ID = "spiffe://cluster.local/ns/default/sa/echo"


def static_config() -> dict[str, Any]:
    port = {"servicePort": 80, "targetPort": 8080}
    return {
        "workloads": [
            {
                "uid": "Kubernetes//Pod/default/sleep",
                "name": "sleep",
                "namespace": "default",
                "serviceAccount": "sleep",
                "addresses": [SLEEP],
                "node": "node-a",
                "tunnelProtocol": "HBONE",
            },
            {
                "uid": "Kubernetes//Pod/default/echo",
                "name": "echo",
                "namespace": "default",
                "serviceAccount": "echo",
                "addresses": [ECHO],
                "node": "node-b",
                "tunnelProtocol": "HBONE",
                "authorizationPolicies": ["default/echo-allow"],
                "services": {"default/echo.default.svc.cluster.local": {"ports": [port]}},
            },
        ],
        "services": [
            {
                "name": "echo",
                "namespace": "default",
                "hostname": "echo.default.svc.cluster.local",
                "addresses": [{"address": VIP}],
                "ports": [port],
            },
        ],
        "policies": [
            {
                "name": "echo-allow",
                "namespace": "default",
                "scope": "WORKLOAD_SELECTOR",
                "action": "ALLOW",
                "rules": [
                    {
                        "clauses": [
                            {
                                "matches": [
                                    {"principals": [{"exact": "cluster.local/ns/default/sa/sleep"}]}
                                ]
                            }
                        ]
                    }
                ],
            },
        ],
    }


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return int(r.status) == 200
    except OSError:
        return False


def wait(
    pred: Any, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"{what} exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} not ready:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@contextlib.contextmanager
def stopped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        stop_processes(proc)


def echo_backend(host: str, port: int) -> socket.socket:
    srv = socket.create_server((host, port))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def static_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("zc")
    cfg = d / "mesh.yaml"
    cfg.write_text(yaml.safe_dump(static_config()))
    backend = echo_backend(ECHO, 8080)

    with (
        stopped(
            spawn_ztunnel(
                "node-a", NODE_A, "--outbound-listen", f"{VIP}:80", mesh_config=cfg, drain=1
            )
        ) as a,
        stopped(spawn_ztunnel("node-b", NODE_B, mesh_config=cfg, drain=1)) as b,
    ):
        wait(lambda: http_ok(f"http://{NODE_A}:15021/healthz/ready"), "node-a", a, d / "node-a.log")
        wait(lambda: http_ok(f"http://{NODE_B}:15021/healthz/ready"), "node-b", b, d / "node-b.log")
        # One connection through the mesh, so node-a's pool holds an HBONE connection.
        with socket.create_connection((VIP, 80), timeout=5, source_address=(SLEEP, 0)) as c:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        yield d
    backend.close()


def zc(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["ztunnel-config", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_workloads(static_mesh: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = zc(capsys, "workload", "--address", f"{NODE_A}:15000", "-o", "json")
    assert code == 0
    by_name = {w["name"]: w for w in json.loads(out)}
    assert set(by_name) == {"sleep", "echo"}
    assert by_name["echo"]["authorizationPolicies"] == ["default/echo-allow"]
    code, out, _ = zc(capsys, "workload", "--address", f"{NODE_A}:15000")
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAMESPACE",
        "POD",
        "NAME",
        "ADDRESS",
        "NODE",
        "WAYPOINT",
        "PROTOCOL",
        "IDENTITY",
        "POLICIES",
        "STATUS",
    ]
    echo_line = next(line for line in lines if " echo " in line)
    assert ECHO in echo_line
    assert ECHO_ID in echo_line
    assert "HBONE" in echo_line


def test_services_policies_certificates(
    static_mesh: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = zc(capsys, "service", "--address", f"{NODE_A}:15000")
    assert code == 0
    row = out.splitlines()[1].split()
    assert row[:3] == ["default", "echo", VIP]
    assert "80->8080" in row
    assert row[-1] == "1"
    code, out, _ = zc(capsys, "policy", "--address", f"{NODE_B}:15000", "-o", "yaml")
    policies = yaml.safe_load(out)
    assert [(p["name"], p["action"], p["scope"]) for p in policies] == [
        ("echo-allow", "ALLOW", "WORKLOAD_SELECTOR")
    ]
    # Each node proxy holds certificates for its own workloads only.
    code, out, _ = zc(capsys, "certificate", "--address", f"{NODE_A}:15000", "-o", "json")
    certs = json.loads(out)
    assert [(c["identity"], c["state"]) for c in certs] == [(SLEEP_ID, "available")]
    code, out, _ = zc(capsys, "certificate", "--address", f"{NODE_B}:15000")
    assert ECHO_ID in out
    assert SLEEP_ID not in out


def test_connections_and_all(static_mesh: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = zc(capsys, "connections", "--address", f"{NODE_A}:15000", "-o", "json")
    conns = json.loads(out)
    assert conns
    assert conns[0]["source"] == SLEEP_ID
    assert conns[0]["peer"] == ECHO_ID
    assert conns[0]["destination"] == f"{ECHO}:15008"
    code, out, _ = zc(capsys, "all", "--address", f"{NODE_A}:15000", "--address", f"{NODE_B}:15000")
    assert code == 0
    assert "# node proxy node-a" in out
    assert "# node proxy node-b" in out
    assert out.count("## certificates") == 2
    code, out, _ = zc(
        capsys, "all", "--address", f"{NODE_A}:15000", "--address", f"{NODE_B}:15000", "-o", "json"
    )
    both = json.loads(out)
    assert set(both) == {"node-a", "node-b"}
    assert set(both["node-b"]) == {
        "workloads",
        "services",
        "policies",
        "certificates",
        "connections",
    }


def test_saved_dump_and_errors(
    static_mesh: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://{NODE_B}:15000/config_dump", timeout=5) as r:
        (tmp_path / "dump.json").write_bytes(r.read())
    code, out, _ = zc(capsys, "workload", "--file", str(tmp_path / "dump.json"), "-o", "json")
    assert code == 0
    assert {w["name"] for w in json.loads(out)} == {"sleep", "echo"}
    # Nothing listens there: a clear error naming the address and what to do.
    code, out, err = zc(capsys, "workload", "--address", "127.0.91.99:15000")
    assert code == 1
    assert out == ""
    assert "cannot reach node proxy 127.0.91.99:15000" in err
    assert "port-forward" in err
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    code, _, err = zc(capsys, "service", "--file", str(tmp_path / "junk.json"))
    assert code == 1
    assert "not a node proxy config dump" in err


# ----------------------------------------------------------------------------- proxy-status


def cp_manifests(extra_pod: bool = False) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "web", "nodeName": "node-c"},
            "status": {"podIP": WEB},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "clusterIP": "127.0.95.20",
                "selector": {"app": "web"},
                "ports": [{"port": 80, "targetPort": 8080}],
            },
        },
    ]
    if extra_pod:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web-2", "namespace": "shop", "labels": {"app": "web"}},
                "spec": {"serviceAccountName": "web", "nodeName": "node-c"},
                "status": {"podIP": "127.0.95.11"},
            }
        )
    return docs


def test_proxy_status_against_a_real_control_plane(
    static_mesh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "shop.yaml").write_text(yaml.safe_dump_all(cp_manifests()))
    (tmp_path / "creds.yaml").write_text(yaml.safe_dump({"node-c": "node-c-token-0123456789"}))
    (tmp_path / "node-c.token").write_text("node-c-token-0123456789\n")
    cp_argv = [
        str(BIN / "ambient-controlplane"),
        "--listen",
        f"{CP}:15012",
        "--debug-listen",
        f"{CP}:15014",
        "--plaintext",
        "--manifest-dir",
        str(manifests),
        "--ca-dir",
        str(tmp_path / "ca"),
        "--node-credentials",
        str(tmp_path / "creds.yaml"),
    ]
    zt_argv = [
        str(BIN / "ztunnel"),
        "--node",
        "node-c",
        "--node-ip",
        NODE_C,
        "--xds-address",
        f"{CP}:15012",
        "--node-credential-file",
        str(tmp_path / "node-c.token"),
        "--capture",
        "bind",
        "--drain-timeout",
        "1",
    ]
    with stopped(spawn(cp_argv, tmp_path / "cp.log")) as cp:
        wait(lambda: http_ok(f"http://{CP}:15014/ready"), "control plane", cp, tmp_path / "cp.log")
        with stopped(spawn(zt_argv, tmp_path / "zt.log")) as zt:
            wait(
                lambda: http_ok(f"http://{NODE_C}:15021/healthz/ready"),
                "node-c",
                zt,
                tmp_path / "zt.log",
            )

            def status(*extra: str) -> tuple[int, list[dict[str, Any]]]:
                code = main(["proxy-status", "--controlplane", f"{CP}:15014", "-o", "json", *extra])
                return code, json.loads(capsys.readouterr().out)

            # Connected, contents not compared (no address given).
            code, rows = status()
            assert code == 0
            assert [(r["node"], r["status"]) for r in rows] == [("node-c", "CONNECTED")]
            # Compared field for field: the proxy has exactly the control plane's records.
            code, rows = status("--address", f"{NODE_C}:15000")
            assert code == 0
            assert [(r["node"], r["status"], r["workloads"]) for r in rows] == [
                ("node-c", "SYNCED", "1/1")
            ]
            # A static proxy that never talked to the control plane, and differs from it.
            code, rows = status("--address", f"{NODE_C}:15000", "--address", f"{NODE_A}:15000")
            assert code == 1
            by_node = {r["node"]: r for r in rows}
            assert by_node["node-a"]["status"] == "NOT CONNECTED"
            assert "2 extra workloads" in by_node["node-a"]["details"]
            # A manifest edit: the proxy follows, and proxy-status says so.
            (manifests / "shop.yaml").write_text(yaml.safe_dump_all(cp_manifests(extra_pod=True)))
            deadline = time.monotonic() + 15
            while True:
                code, rows = status("--address", f"{NODE_C}:15000")
                if rows[0]["workloads"] == "2/2" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert (code, rows[0]["status"], rows[0]["workloads"]) == (0, "SYNCED", "2/2")
            assert (
                main(["ps", "--controlplane", f"{CP}:15014", "--address", f"{NODE_C}:15000"]) == 0
            )
            table = capsys.readouterr().out.splitlines()
            assert table[0].split()[:3] == ["NODE", "ADDRESS", "STATUS"]
            assert "SYNCED" in table[1]
    # Control plane gone: a clear error.
    assert main(["proxy-status", "--controlplane", f"{CP}:15014"]) == 1
    assert "cannot reach the control plane" in capsys.readouterr().err
