"""The operator CLI against a running lab (real kernel, control plane, node proxies):
`ztunnel-config --lab`, `proxy-status --lab` (every node proxy SYNCED with the control plane),
and `analyze --lab` finding a namespace that is labelled for ambient while its pod is not
captured (the node agent is down when the label is applied), quiet before that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ambientctl.lab import system
from ambientctl.lab.lab import Lab
from ambientctl.main import main
from tests.root.labfixture import SLEEP, manifests

NAME = "clitest"


def test_cli_against_a_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab = Lab(NAME, log=print)  # the CLI's --lab NAME finds labs under the default state root
    try:
        lab.up(manifests(tmp_path))
        capsys.readouterr()
        assert (
            main(["ztunnel-config", "certificate", "--lab", NAME, "--node", "node-1", "-o", "json"])
            == 0
        )
        certs = json.loads(capsys.readouterr().out)
        assert SLEEP in [c["identity"] for c in certs if c["state"] == "available"]
        assert main(["proxy-status", "--lab", NAME, "-o", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert sorted((r["node"], r["status"]) for r in rows) == [
            ("node-1", "SYNCED"),
            ("node-2", "SYNCED"),
        ]
        assert main(["analyze", "--lab", NAME]) == 0
        capsys.readouterr()

        # The node agent of node-1 is down while `legacy` is labelled: its pod stays un-captured.
        st = lab.load()
        system.stop(st.node("node-1").agent_pid)
        lab.label_namespace("legacy", {"istio.io/dataplane-mode": "ambient"})
        assert main(["analyze", "--lab", NAME, "-o", "json"]) == 79  # istioctl: found issues
        msgs = json.loads(capsys.readouterr().out)
        assert [(m["code"], m["ref"]) for m in msgs] == [("AMB0101", "Pod legacy/outsider")]
        assert "running on node-1" in msgs[0]["message"]
    finally:
        lab.down()
