"""`ambientctl lab demo`: the README demo on real kernels (network namespaces, eBPF capture).

Builds the lab from examples/lab (2 nodes; client on node-1 in the ambient namespace ``demo``;
the ``echo`` service's pod on node-2), calls the service from the client pod, and prints what
each piece saw: the app's view (the client's real pod IP), both node proxies' access-log lines
(SPIFFE identities of source and destination, mTLS), the destination proxy's metrics, and where
config and certificates came from: the control plane's view of both node proxies (connected,
last ACK per type) and the certificates its CA signed for each node, matched against the
certificates each node proxy holds (the node proxies have no CA and no config file).
Then tears the lab down (unless --keep). Exit 0 only if every step showed what it should.

`--http3`: the node proxies also serve HBONE over HTTP/3 (QUIC on 15008/udp of the node's
address; eBPF capture stays TCP-only for pods) and every pod is annotated for it, so node-1
reaches node-2 over HTTP/3; the demo then also requires both access-log lines to say h3.
"""

from __future__ import annotations

import json
import re
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


def run_demo(lab: Lab, *, keep: bool = False, source: Path = EXAMPLES, http3: bool = False) -> int:
    say = lab.log
    lab.up(source, http3=http3)
    want_transport = "h3" if http3 else "h2"
    ok = True
    try:
        for row in lab.pods():
            key = f"{row['namespace']}/{row['name']}"
            say(f"  pod {key:<18} {row['node']} {row['ip']:<11} redirection={row['redirection']}")
        marks = {
            n: (lab.paths.logs / f"ztunnel-{n}.log").stat().st_size for n in ("node-1", "node-2")
        }
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
                say(
                    f"  {a['src.addr']} {a['src.identity']} -> {a['dst.addr']} "
                    f"{a['dst.identity']} via {a['dst.hbone_addr']} "
                    f"transport {a.get('transport')}"
                )
            ok &= any(
                a["src.identity"] == "spiffe://cluster.local/ns/demo/sa/sleep"
                and a.get("transport") == want_transport
                for a in lines
            )
        node2 = lab.state.node("node-2").plan if lab.state else None
        if node2 is not None:
            _, body = system.http_get(node2.netns, f"http://{node2.ip}:15020/metrics")
            say("\nnode-2 metrics (mutual_tls connections opened):")
            for line in body.splitlines():
                if line.startswith("istio_tcp_connections_opened_total") and "mutual_tls" in line:
                    say("  " + line)
        ok &= _show_controlplane(lab)
        say(
            "\ndemo "
            + (
                "OK: the client's connection crossed both node proxies over mTLS"
                if ok
                else "FAILED"
            )
        )
    finally:
        if not keep:
            lab.down()
        else:
            say("lab kept: `ambientctl lab pods`, `ambientctl lab down` when done")
    return 0 if ok else 1


SIGNED = re.compile(r"signed (spiffe://\S+) for node (\S+)")


def _show_controlplane(lab: Lab) -> bool:
    """Print the control plane's view of the node proxies and the certificates it signed;
    True if both node proxies are connected with every type ACKed and hold exactly
    certificates the control plane signed for their node."""
    say = lab.log
    ok = True
    say("\ncontrol plane /debug/connections (config pushed over delta xDS, ACKed):")
    conns = lab.controlplane_debug("/debug/connections")
    for c in sorted(conns, key=lambda c: str(c["node"])):
        acks = ", ".join(
            f"{t.rsplit('.', 1)[-1]}: {v['resources']} resources, last ACK "
            f"{v['last_ack_s_ago']:.1f}s ago, {v['nacks']} NACKs"
            for t, v in sorted(c["types"].items())
            if v["last_ack_s_ago"] is not None
        )
        say(f"  {c['node']} from {c['peer']}: {acks}")
        ok &= all(v["last_ack_nonce"] and not v["nacks"] for v in c["types"].values())
    ok &= sorted(str(c["node"]) for c in conns) == ["node-1", "node-2"]
    log = (lab.paths.logs / "controlplane.log").read_text(errors="replace")
    signed = {(node, ident) for ident, node in SIGNED.findall(log)}
    say("\ncertificates held by the node proxies (signed by the control plane's CA):")
    for node in ("node-1", "node-2"):
        for cert in lab.proxy_config(node).get("certificates", []):
            from_cp = (node, cert["identity"]) in signed
            seen = f"signed for {node}" if from_cp else "NOT FOUND"
            say(
                f"  {node} {cert['identity']} serial {str(cert['serial'])[:12]}.. "
                f"{cert['state']}; control plane log: {seen}"
            )
            ok &= from_cp
    return ok


if __name__ == "__main__":
    sys.exit(run_demo(Lab("demo", log=print)))
