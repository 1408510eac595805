"""What a running node proxy has imported (issue 14, memory): a static-mode worker carries no
gRPC, protobuf or xDS/CA client, and no aioquic unless --http3 asks for HTTP/3; each of them
costs several MiB of RSS per worker (bench/README.md, Memory). Neither carries what only a
scrape or a build needs (`importlib.metadata` with `zipfile`/`csv`, not even after a scrape,
`importlib.abc` with `importlib.resources`), and a worker fed by the control plane has no
`yaml` (session 6, memory).
No worker, in either mode, imports `cryptography` (nor pyOpenSSL): its certificates (ready means
every local identity has one) were made and checked by `meshcore.certhelper`'s helper processes
(session 7). A worker fed by the control plane imports no grpcio either: its xDS stream and CA
calls go over our own gRPC client on the HTTP/2 core (`meshcore.grpcclient`, session 8). Nor,
even once /metrics was scraped, prometheus_client's `exposition` with the HTTP server and client
modules it imports (`http.server`, `http.client`, `urllib.request`, `wsgiref`, `email`...):
/metrics is `meshcore.telemetry.text_exposition` and the package `__init__` never runs
(`ztunnel.promlib`); nor `shutil`/`tempfile` (key files: `meshcore.tls`), nor the hand-over or
the extra workers' plumbing unless their flags ask (session 8).

The real `ztunnel.app.main` runs in a subprocess (a fresh interpreter: this test process has
imported everything); once it is ready (--ready-file) it prints its `sys.modules`, scrapes its
own /metrics (a raw socket: no HTTP client module in the probe), prints them again and stops.

Addresses: node 127.0.97.1, local workload 127.0.97.10; the control-plane test uses
tests/loopback/cpfixtures.py's (node B, control plane in this test's event loop).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_workload_mesh, run, static_args
from tests.loopback.cpfixtures import (
    base_manifests,
    cp_settings,
    node_b_args,
    running_controlplane,
    write_manifests,
)

NODE = "127.0.97.1"
POD = "127.0.97.10"

PROBE = """
import json, os, signal, socket, sys, threading, time
from pathlib import Path
import ztunnel.app

ready = Path(sys.argv[1])
node_ip = sys.argv[sys.argv.index("--node-ip") + 1]

def scrape() -> bytes:
    with socket.create_connection((node_ip, 15020), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        return b"".join(iter(lambda: s.recv(65536), b""))

def report() -> None:
    while not ready.exists():
        time.sleep(0.02)
    idle = sorted(sys.modules)
    answer = scrape()
    assert answer.startswith(b"HTTP/1.1 200") and b"# TYPE process_cpu_seconds_total" in answer
    print(json.dumps([idle, sorted(sys.modules)]), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report, daemon=True).start()
sys.exit(ztunnel.app.main(sys.argv[2:]))
"""

NOT_IN_STATIC_MODE = ("grpc", "google.protobuf", "meshcore.xds", "meshcore.caclient", "aioquic")
NOT_IN_STATIC_WORKER = ("shutil", "tempfile", "ztunnel.workers", "prometheus_client.multiprocess")
NOT_EVEN_SCRAPED = (
    "prometheus_client.exposition",
    "http.server",
    "http.client",
    "urllib.request",
    "wsgiref",
    "socketserver",
    "gzip",
    "html",
    "mimetypes",
    "email",
    "importlib.metadata",
    "zipfile",
    "csv",
)
"""prometheus_client's `exposition` and what it imports, `importlib.metadata` (istio_build's tag
is `meshcore.telemetry.VERSION`) with what it imports (session 8): not loaded by a scrape."""
NOT_IN_ANY_WORKER = (
    *NOT_EVEN_SCRAPED,
    "ztunnel.handover",
    "importlib.abc",
    "importlib.resources",
    "cryptography",
    "_cffi_backend",
    "OpenSSL",
)


def loaded_modules(tmp: Path, *extra: str) -> tuple[set[str], set[str]]:
    """The modules of a ready static-mode worker: idle, and after a scrape of /metrics."""
    mesh = one_workload_mesh(tmp / "mesh.yaml", POD, "node-m")
    ready = tmp / "ready"
    flags = [*static_args("node-m", NODE, mesh, drain=1), "--ready-file", str(ready), *extra]
    return probe([sys.executable, "-c", PROBE, str(ready), *flags])


def probe(argv: list[str]) -> tuple[set[str], set[str]]:
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    idle, scraped = json.loads(done.stdout.strip().splitlines()[-1])
    return set(idle), set(scraped)


def imported(modules: set[str], package: str) -> bool:
    return any(m == package or m.startswith(package + ".") for m in modules)


def test_static_node_proxy_imports_no_grpc_xds_or_aioquic(tmp_path: Path) -> None:
    modules, scraped = loaded_modules(tmp_path)
    assert imported(modules, "ztunnel.proxy.outbound")  # it did run the node proxy
    assert [p for p in NOT_IN_STATIC_MODE if imported(modules, p)] == []
    assert [p for p in NOT_IN_ANY_WORKER if imported(modules, p)] == []
    assert [p for p in NOT_IN_STATIC_WORKER if imported(modules, p)] == []
    assert imported(scraped, "ztunnel.proxy.outbound")  # the probe checked the scrape's 200
    assert [p for p in NOT_EVEN_SCRAPED if imported(scraped, p)] == []


def test_http3_flag_loads_aioquic(tmp_path: Path) -> None:
    """The probe sees what is loaded: with --http3 the QUIC stack is there, with the
    `cryptography` it needs (and still no gRPC)."""
    modules, _ = loaded_modules(tmp_path, "--http3")
    assert imported(modules, "aioquic")
    assert imported(modules, "cryptography")
    assert not imported(modules, "grpc")


NOT_IN_CONTROLPLANE_MODE = ("yaml", "grpc")


@pytest.mark.timeout(90)
def test_controlplane_node_proxy_imports_no_yaml_or_grpc(tmp_path: Path) -> None:
    """A worker fed by the control plane, ready (its first state applied over xDS, its
    certificates from the control plane's CA, listeners bound): no YAML parser, no grpcio
    (~13 MiB), none of the scrape-only modules."""
    ready = tmp_path / "ready"
    flags = [*node_b_args(tmp_path), "--drain-timeout", "1", "--ready-file", str(ready)]
    argv = [sys.executable, "-c", PROBE, str(ready), *flags]

    async def main() -> tuple[set[str], set[str]]:
        settings = cp_settings(tmp_path)
        write_manifests(tmp_path / "manifests", "base.yaml", base_manifests())
        async with running_controlplane(settings):
            return await asyncio.to_thread(probe, argv)

    modules, scraped = run(main(), timeout=80)
    assert imported(modules, "meshcore.xds")  # it was fed by the control plane
    assert imported(modules, "meshcore.caclient")
    assert imported(modules, "meshcore.grpcclient")
    assert imported(modules, "ztunnel.proxy.outbound")
    bad = [p for p in (*NOT_IN_CONTROLPLANE_MODE, *NOT_IN_ANY_WORKER) if imported(modules, p)]
    assert bad == []
    assert [p for p in NOT_EVEN_SCRAPED if imported(scraped, p)] == []
