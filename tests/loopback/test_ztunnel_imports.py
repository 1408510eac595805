"""What a running node proxy has imported (issue 14, memory): a static-mode worker carries no
gRPC, protobuf or xDS/CA client, and no aioquic unless --http3 asks for HTTP/3; each of them
costs several MiB of RSS per worker (bench/README.md, Memory).

The real `ztunnel.app.main` runs in a subprocess (a fresh interpreter: this test process has
imported everything); once it is ready (--ready-file) it prints its `sys.modules` and stops.

Addresses: node 127.0.97.1, local workload 127.0.97.10.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

NODE = "127.0.97.1"
POD = "127.0.97.10"

PROBE = """
import json, os, signal, sys, threading, time
from pathlib import Path
import ztunnel.app

ready = Path(sys.argv[1])

def report() -> None:
    while not ready.exists():
        time.sleep(0.02)
    print(json.dumps(sorted(sys.modules)), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report, daemon=True).start()
sys.exit(ztunnel.app.main(sys.argv[2:]))
"""

NOT_IN_STATIC_MODE = ("grpc", "google.protobuf", "meshcore.xds", "meshcore.caclient", "aioquic")


def loaded_modules(tmp: Path, *extra: str) -> set[str]:
    mesh = tmp / "mesh.yaml"
    workload = {
        "uid": "w1",
        "name": "web",
        "namespace": "default",
        "serviceAccount": "web",
        "addresses": [POD],
        "node": "node-m",
        "tunnelProtocol": "HBONE",
    }
    mesh.write_text(yaml.safe_dump({"workloads": [workload], "services": [], "policies": []}))
    ready = tmp / "ready"
    argv = [
        sys.executable,
        "-c",
        PROBE,
        str(ready),
        "--node",
        "node-m",
        "--node-ip",
        NODE,
        "--mesh-config",
        str(mesh),
        "--ca-dir",
        str(tmp / "ca"),
        "--capture",
        "bind",
        "--drain-timeout",
        "1",
        "--ready-file",
        str(ready),
        *extra,
    ]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def imported(modules: set[str], package: str) -> bool:
    return any(m == package or m.startswith(package + ".") for m in modules)


def test_static_node_proxy_imports_no_grpc_xds_or_aioquic(tmp_path: Path) -> None:
    modules = loaded_modules(tmp_path)
    assert imported(modules, "ztunnel.proxy.outbound")  # it did run the node proxy
    assert [p for p in NOT_IN_STATIC_MODE if imported(modules, p)] == []


def test_http3_flag_loads_aioquic(tmp_path: Path) -> None:
    """The probe sees what is loaded: with --http3 the QUIC stack is there (and still no gRPC)."""
    modules = loaded_modules(tmp_path, "--http3")
    assert imported(modules, "aioquic")
    assert not imported(modules, "grpc")
