"""Installer: chain `ambient-cni` last in an existing CNI conflist, and remove it again.

Owns the pure edits `add_plugin` / `remove_plugin` of a conflist (CNI spec 1.0.0 "Network
configuration lists": ``plugins`` run in order on ADD, reverse order on DEL, so last = after the
primary plugin has assigned the IPs) and the file edges: atomic rewrite of the conflist
(temp file + rename, so a runtime never reads half a file) and an optional launcher script in a
CNI bin dir (the runtime finds a plugin by its ``type`` in CNI_PATH).

Invariants:
- `add_plugin` is idempotent: our entry (matched by ``type``) appears once, last, with the given
  settings; every other entry and top-level key is untouched.
- ``remove_plugin(add_plugin(x)) == x`` for any conflist x without our entry; removing when
  absent is a no-op. The launcher is removed only if it is ours (marker line).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cni.errors import InvalidNetworkConfig

PLUGIN_TYPE = "ambient-cni"
MARKER = "# ambient-mesh: ambient-cni launcher"


def plugin_entry(*, agent_socket: str, timeout: float | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": PLUGIN_TYPE, "agentSocket": agent_socket}
    if timeout is not None:
        entry["agentTimeout"] = timeout
    return entry


def _plugins(conflist: Mapping[str, Any]) -> list[dict[str, Any]]:
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
        raise InvalidNetworkConfig("not a conflist: 'plugins' must be a list of objects")
    return plugins


def add_plugin(conflist: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(conflist))
    plugins = [p for p in _plugins(out) if p.get("type") != entry["type"]]
    if not plugins:
        raise InvalidNetworkConfig("conflist has no primary plugin to chain after")
    plugins.append(dict(entry))
    out["plugins"] = plugins
    return out


def remove_plugin(conflist: Mapping[str, Any], plugin_type: str = PLUGIN_TYPE) -> dict[str, Any]:
    out = copy.deepcopy(dict(conflist))
    out["plugins"] = [p for p in _plugins(out) if p.get("type") != plugin_type]
    return out


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _dump(conflist: Mapping[str, Any]) -> str:
    return json.dumps(conflist, indent=2) + "\n"


def install(
    conflist_path: Path,
    *,
    agent_socket: str,
    timeout: float | None = None,
    bin_dir: Path | None = None,
    python: str = sys.executable,
) -> None:
    conflist = json.loads(conflist_path.read_text())
    updated = add_plugin(conflist, plugin_entry(agent_socket=agent_socket, timeout=timeout))
    if updated != conflist:
        _write_atomic(conflist_path, _dump(updated))
    if bin_dir is not None:
        write_launcher(bin_dir, python)


def write_launcher(bin_dir: Path, python: str = sys.executable) -> Path:
    """`bin_dir/ambient-cni`: a launcher running this package's plugin with `python`."""
    launcher = f'#!/bin/sh\n{MARKER}\nexec {python} -m cni.plugin "$@"\n'
    target = bin_dir / PLUGIN_TYPE
    if not target.exists() or target.read_text() != launcher:
        _write_atomic(target, launcher, 0o755)
    return target


def uninstall(conflist_path: Path, *, bin_dir: Path | None = None) -> None:
    if conflist_path.exists():
        conflist = json.loads(conflist_path.read_text())
        updated = remove_plugin(conflist)
        if updated != conflist:
            _write_atomic(conflist_path, _dump(updated))
    if bin_dir is not None:
        target = bin_dir / PLUGIN_TYPE
        if target.exists() and MARKER in target.read_text():
            target.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cni.install", description=__doc__)
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("--conflist", type=Path, required=True)
    p.add_argument("--agent-socket", default="/run/ambient/cni.sock")
    p.add_argument("--agent-timeout", type=float)
    p.add_argument("--bin-dir", type=Path, help="also write/remove the plugin launcher here")
    args = p.parse_args(argv)
    if args.action == "add":
        install(
            args.conflist,
            agent_socket=args.agent_socket,
            timeout=args.agent_timeout,
            bin_dir=args.bin_dir,
        )
    else:
        uninstall(args.conflist, bin_dir=args.bin_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
