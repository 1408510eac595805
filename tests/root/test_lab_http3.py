"""`ambientctl lab demo --http3` on the real kernel (issue 16): the eBPF lab with HBONE over
HTTP/3 between its node proxies. The control plane publishes each annotated pod's HTTP/3
endpoint (its node's address, 15008/udp) in our Workload extension; node-1's proxy dials node-2's
shared UDP socket naming the echo pod by SNI; node-2 presents the echo identity's certificate,
and the echo app still sees the client pod's own IP. Pods' capture stays TCP-only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ambientctl.lab.demo import run_demo
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
