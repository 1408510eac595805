"""The conflist installer: chained last, idempotent, exact inverse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cni.errors import InvalidNetworkConfig
from cni.install import MARKER, add_plugin, install, plugin_entry, remove_plugin, uninstall

CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "podman",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "firewall"},
    ],
}


def test_add_is_last_and_idempotent() -> None:
    entry = plugin_entry(agent_socket="/run/a.sock")
    once = add_plugin(CONFLIST, entry)
    assert [p["type"] for p in once["plugins"]] == ["bridge", "firewall", "ambient-cni"]
    assert add_plugin(once, entry) == once
    moved = add_plugin({**CONFLIST, "plugins": [entry, *CONFLIST["plugins"]]}, entry)
    assert moved == once
    assert remove_plugin(once) == CONFLIST
    assert remove_plugin(CONFLIST) == CONFLIST


def test_not_a_conflist() -> None:
    with pytest.raises(InvalidNetworkConfig):
        add_plugin({"type": "bridge"}, plugin_entry(agent_socket="/x"))
    with pytest.raises(InvalidNetworkConfig):
        add_plugin({"plugins": []}, plugin_entry(agent_socket="/x"))


def test_files_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "87-podman.conflist"
    original = json.dumps(CONFLIST, indent=2) + "\n"
    path.write_text(original)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install(path, agent_socket="/run/a.sock", timeout=3, bin_dir=bin_dir, python="/usr/bin/py")
    install(path, agent_socket="/run/a.sock", timeout=3, bin_dir=bin_dir, python="/usr/bin/py")
    data = json.loads(path.read_text())
    assert data["plugins"][-1] == {
        "type": "ambient-cni",
        "agentSocket": "/run/a.sock",
        "agentTimeout": 3,
    }
    launcher = bin_dir / "ambient-cni"
    assert MARKER in launcher.read_text()
    assert launcher.stat().st_mode & 0o111
    uninstall(path, bin_dir=bin_dir)
    uninstall(path, bin_dir=bin_dir)
    assert path.read_text() == original
    assert not launcher.exists()
    # a plugin binary that is not ours is left alone
    launcher.write_text("#!/bin/sh\nexit 0\n")
    uninstall(path, bin_dir=bin_dir)
    assert launcher.exists()
