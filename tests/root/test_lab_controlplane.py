"""The lab on the control plane: the only source of node-proxy config and certificates.

One lab (examples/lab + outsider-2 on node-2 with its own service account) serves the module.
Policies are applied the way an operator would: a manifest file written into (and removed
from) the lab's manifest directory, which the control plane watches; nothing is restarted.
The certificate tests call the control plane's CA from inside a node's netns with that node's
lab token, exactly as its node proxy does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambientctl.lab import system
from ambientctl.lab.lab import XDS_ADDRESS, Lab
from tests.root.labfixture import (
    SLEEP,
    HeldTraffic,
    build,
    call,
    log_size,
    wait_access,
    ztunnel_pids,
)

pytestmark = pytest.mark.timeout(300)

DENY_SLEEP = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/demo/sa/sleep"]}}]
"""
STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
"""
# Run with the venv's python in a node's netns: ask the control plane's CA for IDENTITY with
# the token in TOKEN_FILE, print {"signed": identity} or {"refused": "<gRPC status>: ..."}.
CSR_SCRIPT = """\
import asyncio, json, sys
from pathlib import Path
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from meshcore.xds import ControlPlaneEndpoint

address, roots, token, identity = sys.argv[1:5]

async def main() -> None:
    endpoint = ControlPlaneEndpoint(
        address=address, token=token or None, tls_roots=Path(roots).read_bytes()
    )
    provider = ControlPlaneCAProvider(endpoint)
    try:
        cert = await provider.fetch(SpiffeId.parse(identity))
        print(json.dumps({"signed": str(cert.identity)}))
    except CertificateError as err:
        print(json.dumps({"refused": str(err).split(": ", 1)[1]}))
    finally:
        await provider.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    yield from build(f"tc{os.getpid() % 10000}", tmp_path_factory.mktemp("lab"))


def _apply(lab: Lab, name: str, text: str) -> Path:
    """Write a manifest into the lab's directory atomically (as `kubectl apply` would)."""
    path = lab.paths.manifests / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _has_policy(name: str) -> Any:
    ns, _, policy = name.partition("/")
    return lambda dump: any(
        p["namespace"] == ns and p["name"] == policy for p in dump.get("policies", [])
    )


def _ca_request(lab: Lab, node: str, token: str, identity: str) -> dict[str, str]:
    argv = lab.node_argv(
        node,
        [sys.executable, "-c", CSR_SCRIPT, XDS_ADDRESS, str(lab.paths.roots), token, identity],
    )
    proc = subprocess.run(argv, capture_output=True, timeout=60, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, str] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def _token(lab: Lab, node: str) -> str:
    return lab.paths.node_token(node).read_text().strip()


def test_node_proxies_run_on_the_control_plane_only(lab: Lab) -> None:
    st = lab.load()
    for node in st.nodes:
        argv = Path(f"/proc/{node.ztunnel_pid}/cmdline").read_bytes().split(b"\0")
        args = [a.decode() for a in argv]
        assert "--xds-address" in args
        assert "--ca-address" in args
        assert "--node-credential-file" in args
        assert "--controlplane-roots" in args
        assert "--mesh-config" not in args
        assert "--ca-dir" not in args
    assert not list(lab.paths.root.glob("nodes/*/mesh.yaml"))
    # The control plane sees both node proxies, each with every type ACKed and no NACK.
    conns = lab.controlplane_debug("/debug/connections")
    assert sorted(c["node"] for c in conns) == ["node-1", "node-2"]
    for c in conns:
        assert c["peer"].startswith(f"ipv4:{lab.load().node(c['node']).plan.ip}:")
        for t in c["types"].values():
            assert t["last_ack_nonce"]
            assert t["nacks"] == 0
            assert t["pending_changes"] == 0
    # Every certificate a node proxy holds was signed by the control plane for that node, and
    # only mesh (ambient) workloads have one: the non-mesh `legacy` pods get none.
    log = (lab.paths.logs / "controlplane.log").read_text()
    for name, expected in (
        ("node-1", {SLEEP, "spiffe://cluster.local/ns/demo/sa/echo"}),
        ("node-2", {"spiffe://cluster.local/ns/demo/sa/echo"}),
    ):
        certs = lab.proxy_config(name)["certificates"]
        assert {c["identity"] for c in certs} == expected
        for c in certs:
            assert c["state"] == "available"
            assert f"signed {c['identity']} for node {name} " in log
    # The workloads' addresses are the IPs host-local assigned (written into the manifests).
    dump = lab.proxy_config("node-2")
    addrs = {w["uid"]: w["addresses"] for w in dump["workloads"]}
    for key, ps in lab.load().pods.items():
        assert addrs[f"Kubernetes//Pod/{key}"] == [ps.ip]


def test_deny_policy_applied_live_then_removed(lab: Lab) -> None:
    proxies = ztunnel_pids(lab)
    code, out = call(lab, "demo/client", "echo", 80, "before")
    assert code == 0, out
    path = _apply(lab, "deny-sleep.yaml", DENY_SLEEP)
    try:
        lab.wait_proxies(_has_policy("demo/deny-sleep"), what="DENY policy pushed")
        n2 = log_size(lab, "node-2")
        code, out = call(lab, "demo/client", "echo", 80, "denied")
        assert code == 1
        assert "call failed" in out
        denied = wait_access(lab, "node-2", n2, lambda a: a["direction"] == "inbound")
        assert denied
        assert denied[0]["src.identity"] == SLEEP
        assert "denied" in str(denied[0]["error"]).lower()
        # Same pod, another client (plaintext, no principal): not matched, still allowed.
        code, out = call(lab, "legacy/outsider", lab.pod("demo/echo").ip, 8080, "other")
        assert code == 0, out
    finally:
        path.unlink()
    lab.wait_proxies(lambda d: not _has_policy("demo/deny-sleep")(d), what="policy removed")
    code, out = call(lab, "demo/client", "echo", 80, "after")
    assert code == 0, out
    assert ztunnel_pids(lab) == proxies  # applied live, never restarted


def test_peer_authentication_strict_applied_live(lab: Lab) -> None:
    echo_ip = lab.pod("demo/echo").ip
    code, out = call(lab, "legacy/outsider", echo_ip, 8080, "plaintext")
    assert code == 0, out  # PERMISSIVE: plaintext from a non-mesh pod is accepted (15006)
    path = _apply(lab, "strict.yaml", STRICT)
    try:
        lab.wait_proxies(
            lambda d: any(
                "istio-system/istio_converted_static_strict" in w["authorizationPolicies"]
                for w in d["workloads"]
                if w["uid"] == "Kubernetes//Pod/demo/echo"
            ),
            what="STRICT pushed",
        )
        code, out = call(lab, "legacy/outsider", echo_ip, 8080, "plaintext")
        assert code == 1
        assert "call failed" in out
        code, out = call(lab, "demo/client", "echo", 80, "mtls")
        assert code == 0, out  # mTLS from the mesh still passes
    finally:
        path.unlink()
    lab.wait_proxies(
        lambda d: all(
            "istio-system/istio_converted_static_strict" not in w["authorizationPolicies"]
            for w in d["workloads"]
        ),
        what="STRICT removed",
    )
    code, out = call(lab, "legacy/outsider", echo_ip, 8080, "plaintext")
    assert code == 0, out


def test_ca_refuses_a_service_account_of_another_node(lab: Lab) -> None:
    outsider2 = "spiffe://cluster.local/ns/legacy/sa/outsider-2"  # only pod: on node-2
    node1 = _token(lab, "node-1")
    # node-1's token works for node-1's service accounts...
    assert _ca_request(lab, "node-1", node1, SLEEP) == {"signed": SLEEP}
    # ...but not for a service account whose only pod runs on node-2.
    refused = _ca_request(lab, "node-1", node1, outsider2)
    assert refused["refused"].startswith("PERMISSION_DENIED")
    assert "node 'node-1'" in refused["refused"]
    assert outsider2 in refused["refused"]
    # node-2's own token gets it; and node-2 cannot get node-1's sleep.
    assert _ca_request(lab, "node-2", _token(lab, "node-2"), outsider2) == {"signed": outsider2}
    refused = _ca_request(lab, "node-2", _token(lab, "node-2"), SLEEP)
    assert refused["refused"].startswith("PERMISSION_DENIED")
    # No token / a wrong token: not authenticated at all.
    assert _ca_request(lab, "node-1", "", SLEEP)["refused"].startswith("UNAUTHENTICATED")
    assert _ca_request(lab, "node-1", "x" * 32, SLEEP)["refused"].startswith("UNAUTHENTICATED")


def test_control_plane_restart_keeps_traffic_and_resyncs(lab: Lab) -> None:
    """The control plane stops and starts again under 300 held, hash-checked connections
    crossing both nodes and fresh ones opened every 50 ms: nothing lost; the proxies resync."""
    proxies = ztunnel_pids(lab)
    traffic = HeldTraffic(lab, "demo/client", "echo", 80, 300)
    try:
        lab.stop_controlplane()
        try:
            # The node proxies keep serving on the last good config.
            code, out = call(lab, "demo/client", "echo", 80, "cp-down")
            assert code == 0, out
        finally:
            lab.start_controlplane()
        system.wait_for(
            lambda: (
                sorted(c["node"] for c in lab.controlplane_debug("/debug/connections"))
                == ["node-1", "node-2"]
            ),
            timeout=30,
            what="node proxies reconnected",
        )
        traffic.check(fresh=10)  # through the stop, the start and the proxies' resync
    finally:
        traffic.close()
    # A change after the restart still reaches them.
    path = _apply(lab, "deny-sleep.yaml", DENY_SLEEP)
    try:
        lab.wait_proxies(_has_policy("demo/deny-sleep"), what="policy after restart")
    finally:
        path.unlink()
    lab.wait_proxies(lambda d: not _has_policy("demo/deny-sleep")(d), what="policy removed")
    code, out = call(lab, "demo/client", "echo", 80, "cp-up")
    assert code == 0, out
    assert ztunnel_pids(lab) == proxies
