"""`ambientctl lab demo --http3` on the real kernel (issue 16): the eBPF lab with HBONE over
HTTP/3 between its node proxies. The control plane publishes each annotated pod's HTTP/3
endpoint (its node's address, 15008/udp) in our Workload extension; node-1's proxy dials node-2's
shared UDP socket naming the echo pod by SNI; node-2 presents the echo identity's certificate,
and the echo app still sees the client pod's own IP. Pods' capture stays TCP-only.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from ambientctl.lab import system
from ambientctl.lab.demo import EXAMPLES, run_demo
from ambientctl.lab.lab import Lab

pytestmark = pytest.mark.timeout(300)


def test_lab_demo_runs_over_http3_between_nodes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lines: list[str] = []
    lab = Lab(f"h3{os.getpid() % 10000}", state_root=tmp_path / "state", log=lines.append)
    code = run_demo(lab, http3=True)
    text = "\n".join(lines)
    assert code == 0, text
    # Both node proxies' access lines name the HTTP/3 transport (run_demo checks it too).
    assert text.count("transport h3") >= 2, text
    assert not lab.paths.root.exists()  # torn down


def test_lab_udp_dropped_falls_back_to_http2_within_the_bound_and_remembers(
    tmp_path: Path,
) -> None:
    """nftables drops 15008/udp on node-2 (a firewall): node-1's proxy gives HTTP/3 one bounded
    attempt (2 s), falls back to HTTP/2 and remembers the peer, so the next call does not wait."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab = Lab(f"h3f{os.getpid() % 10000}", state_root=tmp_path / "state", log=print)
    try:
        lab.up(EXAMPLES, http3=True)
        assert call(lab, "h3")[1] == "h3"
        st = lab.state
        assert st is not None
        rules = b"table inet h3drop {\n chain in {\n type filter hook input priority 0;\n"
        rules += b" udp dport 15008 drop\n }\n}\n"
        system.run(system.nsenter(st.node("node-2").plan.netns, ["nft", "-f", "-"]), input=rules)
        lab.stop_ztunnel("node-1")  # a fresh node-1 proxy: nothing remembered, no pooled conn
        lab.start_ztunnel("node-1")
        took, transport = call(lab, "dropped")
        assert transport == "h2"
        assert 1.5 < took < 8, took  # the 2 s attempt, then HTTP/2
        took, transport = call(lab, "remembered")
        assert transport == "h2"
        assert took < 1.5, took  # straight to HTTP/2: the peer is remembered
        log = (lab.paths.logs / "ztunnel-node-1.log").read_text()
        assert log.count("HTTP/2 for 300s") == 1, log
    finally:
        lab.down()


def call(lab: Lab, msg: str) -> tuple[float, str]:
    """(seconds, transport on node-1's outbound access line) for one call client -> echo."""
    log = lab.paths.logs / "ztunnel-node-1.log"
    mark = log.stat().st_size
    start = time.monotonic()
    argv = lab.exec_argv("demo/client", ["python3", "call.py", "echo", "80", msg])
    proc = subprocess.run(argv, cwd=lab.paths.manifests, capture_output=True, timeout=30)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr.decode()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(mark)
            lines = [
                json.loads(x[x.index("{") :])
                for x in f.read().decode(errors="replace").splitlines()
                if "ztunnel.access" in x and '"outbound"' in x
            ]
        if lines:
            return took, str(lines[-1].get("transport"))
        time.sleep(0.1)
    raise AssertionError("no outbound access line on node-1")
