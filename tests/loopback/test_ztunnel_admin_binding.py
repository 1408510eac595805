"""The node proxy's admin endpoint (15000: the whole config dump, certificates, quitquitquit,
log level) listens on a loopback address only (issue 10, item 5): the real `ztunnel` process
refuses a non-loopback ``--admin-address`` (flag or ADMIN_ADDRESS), and the in-process proxy
refuses one given through its settings, before serving anything.

Addresses: the node is host 1 of a `tests.helpers.loopback_block` (static mode, the repository's
example mesh, no workloads on it).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshcore.ca import MeshCA
from meshcore.certs import LocalCAProvider, utcnow
from meshcore.errors import ConfigError
from meshcore.proto.yamlform import load_mesh_config
from meshcore.state import MeshState
from tests.helpers import loopback_block
from ztunnel.app import NodeProxy
from ztunnel.contexts import build_context
from ztunnel.proxy.context import ProxySettings

BIN = Path(sys.executable).parent / "ztunnel"
MESH = Path(__file__).resolve().parents[2] / "examples" / "static" / "mesh.yaml"
NODE_IP = loopback_block().ip(1)


@pytest.mark.parametrize(
    ("flag", "env"),
    [
        (["--admin-address", "0.0.0.0"], {}),
        (["--admin-address", "::"], {}),
        (["--admin-address", "10.1.2.3"], {}),
        ([], {"ADMIN_ADDRESS": "0.0.0.0"}),
    ],
    ids=["any-v4", "any-v6", "node-ip", "env"],
)
def test_non_loopback_admin_address_is_refused(flag: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(
        [str(BIN), "--node", "node-z", "--node-ip", NODE_IP, "--mesh-config", str(MESH), *flag],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "not a loopback address" in proc.stderr


def test_in_process_proxy_refuses_non_loopback_admin(tmp_path: Path) -> None:
    async def main() -> None:
        settings = ProxySettings(
            node="node-z", node_ip=NODE_IP, admin_address="0.0.0.0", drain_timeout=0.5
        )
        state = MeshState.from_config(load_mesh_config(MESH))
        ctx = build_context(settings, state, LocalCAProvider(MeshCA.create_root(), clock=utcnow))
        proxy = NodeProxy(ctx)
        try:
            with pytest.raises(ConfigError, match="not a loopback address"):
                await proxy.start()
        finally:
            await proxy.drain()

    asyncio.run(asyncio.wait_for(main(), 30))
