"""The unprivileged README demo (`scripts/demo --loopback`): two node proxies on loopback carry
a client's TCP connection over HBONE.

Owns nothing the mesh depends on; it starts real processes and prints what happens:
  node-a (127.0.41.1)  client pod 127.0.41.10, service account "sleep"
  node-b (127.0.42.1)  server pod 127.0.42.10, service account "echo", listening on :8080
  service echo.default.svc.cluster.local, VIP 127.0.43.10:80 -> 8080
The client connects to the VIP; node-a (bound on the VIP, which is what capture gives it) opens
HBONE (HTTP/2 CONNECT over mutual TLS) to node-b with the client's certificate; node-b verifies
it, authorizes it, connects to the server pod and relays. Everything is torn down at the end.
`--http3`: the node proxies carry HBONE as HTTP/3 CONNECT over QUIC (15008/udp) instead, and the
demo succeeds only if both access-log lines say transport h3.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

NODE_A, NODE_B = "127.0.41.1", "127.0.42.1"
CLIENT, SERVER, VIP = "127.0.41.10", "127.0.42.10", "127.0.43.10"

MESH = {
    "workloads": [
        {
            "uid": "Kubernetes//Pod/default/sleep",
            "name": "sleep",
            "namespace": "default",
            "serviceAccount": "sleep",
            "addresses": [CLIENT],
            "node": "node-a",
            "tunnelProtocol": "HBONE",
            "canonicalName": "sleep",
        },
        {
            "uid": "Kubernetes//Pod/default/echo",
            "name": "echo",
            "namespace": "default",
            "serviceAccount": "echo",
            "addresses": [SERVER],
            "node": "node-b",
            "tunnelProtocol": "HBONE",
            "canonicalName": "echo",
            "canonicalRevision": "v1",
            "services": {
                "default/echo.default.svc.cluster.local": {
                    "ports": [{"servicePort": 80, "targetPort": 8080}]
                }
            },
        },
    ],
    "services": [
        {
            "name": "echo",
            "namespace": "default",
            "hostname": "echo.default.svc.cluster.local",
            "addresses": [{"address": VIP}],
            "ports": [{"servicePort": 80, "targetPort": 8080}],
        },
    ],
    "policies": [
        {
            "name": "allow-sleep",
            "namespace": "default",
            "scope": "NAMESPACE",
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

ECHO_SERVER = f"""
import socket
srv = socket.create_server(("{SERVER}", 8080))
while True:
    conn, peer = srv.accept()
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.sendall(b"hello from echo, you are " + peer[0].encode() + b", you said: " + data)
    conn.close()
"""


def _wait_ready(ip: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"node proxy at {ip} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{ip}:15021/healthz/ready", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"node proxy at {ip} not ready after {timeout}s")


def _section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    unknown = [a for a in args if a != "--http3"]
    if unknown:
        raise SystemExit(
            f"usage: python -m ambientctl.lab.loopback_demo [--http3]  (unknown: {unknown})"
        )
    http3 = ["--http3", "--http3-peer", "*"] if "--http3" in args else []
    tmp = Path(tempfile.mkdtemp(prefix="ambient-demo-"))
    (tmp / "mesh.yaml").write_text(yaml.safe_dump(MESH, sort_keys=False))
    procs: list[subprocess.Popen[bytes]] = []
    logs = {name: tmp / f"{name}.log" for name in ("node-a", "node-b")}
    ztunnel = [sys.executable, "-m", "ztunnel.app"]
    try:
        _section("starting a backend pod and two node proxies (no control plane)")
        procs.append(subprocess.Popen([sys.executable, "-c", ECHO_SERVER]))
        for name, ip, extra in (
            ("node-a", NODE_A, ["--outbound-listen", f"{VIP}:80"]),
            ("node-b", NODE_B, []),
        ):
            log_file = logs[name].open("wb")
            procs.append(
                subprocess.Popen(
                    [
                        *ztunnel,
                        "--node",
                        name,
                        "--node-ip",
                        ip,
                        "--mesh-config",
                        str(tmp / "mesh.yaml"),
                        "--ca-dir",
                        str(tmp / "ca"),
                        *extra,
                        *http3,
                    ],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
            _wait_ready(ip, procs[-1])
            udp = ", HTTP/3 :15008/udp" if http3 else ""
            print(f"{name} ready at {ip} (HBONE :15008{udp}, metrics :15020, admin :15000)")

        _section("client pod 'sleep' -> echo.default.svc.cluster.local (VIP 127.0.43.10:80)")
        with socket.create_connection((VIP, 80), source_address=(CLIENT, 0), timeout=10) as s:
            s.sendall(b"ping over HBONE")
            s.shutdown(socket.SHUT_WR)  # half-close travels as END_STREAM
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        print(f"client received: {reply.decode()!r}")
        time.sleep(0.2)  # let both proxies write their access log lines

        _section("identities, as each node proxy saw them (access log)")
        transports = []
        for name in ("node-a", "node-b"):
            for line in logs[name].read_text().splitlines():
                if "ztunnel.access" in line:
                    entry = json.loads(line.split("ztunnel.access ", 1)[1])
                    transports.append(entry.get("transport"))
                    print(
                        f"{name} {entry['direction']:8} src.identity={entry['src.identity']}"
                        f"  dst.identity={entry['dst.identity']}  transport="
                        f"{entry.get('transport')}  bytes_sent="
                        f"{entry['bytes_sent']} bytes_recv={entry['bytes_recv']}"
                    )

        _section("node-b metrics (istio_tcp_connections_opened_total)")
        with urllib.request.urlopen(f"http://{NODE_B}:15020/stats/prometheus", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("istio_tcp_connections_opened_total{"):
                    labels = dict(
                        kv.split("=", 1)
                        for kv in line[line.index("{") + 1 : line.index("}")].split(",")
                    )
                    print(
                        f"reporter={labels['reporter']} source_principal="
                        f"{labels['source_principal']} destination_principal="
                        f"{labels['destination_principal']} connection_security_policy="
                        f"{labels['connection_security_policy']}"
                    )
        with urllib.request.urlopen(f"http://{NODE_A}:15000/config_dump", timeout=5) as r:
            dump = json.load(r)
        certs = [c.get("identity") for c in dump.get("certificates", [])]
        print(f"node-a holds certificates for: {certs}")
        ok = reply.startswith(b"hello from echo, you are " + CLIENT.encode())
        want = "h3" if http3 else "h2"
        ok = ok and transports == [want, want]
        _section(
            "result: "
            + (
                f"OK, mutual TLS between node proxies over {want}, original source IP kept"
                if ok
                else "UNEXPECTED reply"
            )
        )
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for path in sorted(tmp.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        tmp.rmdir()
        if os.environ.get("DEMO_VERBOSE"):
            print(f"(cleaned up {tmp})")


if __name__ == "__main__":
    sys.exit(main())
