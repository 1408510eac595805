"""`ambientctl lab demo`: the README demo on real kernels (network namespaces, eBPF capture).

Builds the lab from examples/lab (2 nodes; client on node-1 in the ambient namespace ``demo``;
the ``echo`` service's pod on node-2), calls the service from the client pod, and prints what
each piece saw: the app's view (the client's real pod IP), both node proxies' access-log lines
(SPIFFE identities of source and destination, mTLS), and the destination proxy's metrics.
Then tears the lab down (unless --keep). Exit 0 only if every step showed what it should.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ambientctl.lab import system
from ambientctl.lab.lab import Lab

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lab"


def _access(lab: Lab, node: str, since: int) -> list[dict[str, object]]:
    path = lab.paths.logs / f"ztunnel-{node}.log"
    out = []
    with open(path, "rb") as f:
        f.seek(since)
        for line in f.read().decode(errors="replace").splitlines():
            if "ztunnel.access" in line and "{" in line:
                out.append(json.loads(line[line.index("{") :]))
    return out


def run_demo(lab: Lab, *, keep: bool = False, source: Path = EXAMPLES) -> int:
    say = lab.log
    lab.up(source)
    ok = True
    try:
        for row in lab.pods():
            say(f"  pod {row['namespace']}/{row['name']:<11} {row['node']} {row['ip']:<11} "
                f"redirection={row['redirection']}")  # fmt: skip
        marks = {n: (lab.paths.logs / f"ztunnel-{n}.log").stat().st_size
                 for n in ("node-1", "node-2")}  # fmt: skip
        argv = lab.exec_argv("demo/client", ["python3", "call.py", "echo", "80", "hello mesh"])
        say("\n$ ambientctl lab exec client -- python3 call.py echo 80 'hello mesh'")
        proc = subprocess.run(argv, cwd=lab.paths.manifests, capture_output=True, timeout=30)
        say(proc.stdout.decode().rstrip() or proc.stderr.decode().rstrip())
        client_ip = lab.pod("demo/client").ip
        ok &= proc.returncode == 0 and f"you are {client_ip}:" in proc.stdout.decode()
        time.sleep(0.5)  # access lines are written when the connection closes
        for node, direction in (("node-1", "outbound"), ("node-2", "inbound")):
            lines = [a for a in _access(lab, node, marks[node]) if a["direction"] == direction]
            say(f"\nnode proxy {node} ({direction}) access log:")
            for a in lines:
                say(f"  {a['src.addr']} {a['src.identity']} -> {a['dst.addr']} "
                    f"{a['dst.identity']} via {a['dst.hbone_addr']}")  # fmt: skip
            ok &= any(a["src.identity"] == "spiffe://cluster.local/ns/demo/sa/sleep"
                      for a in lines)  # fmt: skip
        node2 = lab.state.node("node-2").plan if lab.state else None
        if node2 is not None:
            _, body = system.http_get(node2.netns, f"http://{node2.ip}:15020/metrics")
            say("\nnode-2 metrics (mutual_tls connections opened):")
            for line in body.splitlines():
                if line.startswith("istio_tcp_connections_opened_total") and "mutual_tls" in line:
                    say("  " + line)
        say("\ndemo " + ("OK: the client's connection crossed both node proxies over mTLS"
                         if ok else "FAILED"))  # fmt: skip
    finally:
        if not keep:
            lab.down()
        else:
            say("lab kept: `ambientctl lab pods`, `ambientctl lab down` when done")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_demo(Lab("demo", log=print)))
