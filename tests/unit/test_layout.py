"""The layout's promises, checked against the source: which meshcore modules may open sockets
(meshcore/__init__.py), that meshcore never imports a process package, that the tests'
loopback blocks (tests/helpers.py) are disjoint, and that docs/waypoint.md's module table names
every waypoint module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import meshcore
from tests.helpers import ALLOCATOR_RANGE, loopback_block

ROOT = Path(meshcore.__file__).parent
SOCKET_MODULES = {
    "hbone.aio",
    "hbone.h3aio",
    "hbone.pool",
    "sockets",
    "grpcclient",
    "xds",
    "caclient",
    "kubeapi",
    "reflector",
    "opshttp",
    "tracing",
}
NETWORK_IMPORTS = (
    "socket",
    "grpc",
    "aiohttp",
    "kubernetes_asyncio",
    "meshcore.sockets",
    "meshcore.hbone.aio",
    "meshcore.grpcclient",
    "meshcore.kubeapi",
    "opentelemetry.exporter",
)
NETWORK_CALLS = {
    "open_connection",
    "start_server",
    "create_server",
    "create_connection",
    "sock_connect",
    "open_unix_connection",
    "start_unix_server",
}
PROCESSES = ("ztunnel", "waypoint", "cni", "controlplane", "ambientctl")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.parts[0] == "proto" or rel.name == "__init__":
            continue
        out[".".join(rel.parts)] = ast.parse(path.read_text())
    return out


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _does_network_io(tree: ast.Module) -> bool:
    imports = _imports(tree)
    if any(i == n or i.startswith(n + ".") for i in imports for n in NETWORK_IMPORTS):
        return True
    return any(
        isinstance(node, ast.Attribute) and node.attr in NETWORK_CALLS for node in ast.walk(tree)
    )


def test_exactly_the_documented_modules_open_sockets() -> None:
    doing_io = {name for name, tree in _modules().items() if _does_network_io(tree)}
    assert doing_io == SOCKET_MODULES
    doc = meshcore.__doc__ or ""
    for name in SOCKET_MODULES:
        assert f"`{name}`" in doc


def test_meshcore_never_imports_a_process_package() -> None:
    for name, tree in _modules().items():
        bad = {i for i in _imports(tree) if i.split(".")[0] in PROCESSES}
        assert not bad, f"meshcore.{name} imports {bad}"


def test_loopback_blocks_are_disjoint() -> None:
    a, b = loopback_block(), loopback_block()
    assert a.network != b.network
    assert not a.network.overlaps(b.network)
    assert a.network.subnet_of(ALLOCATOR_RANGE)
    assert b.network.subnet_of(ALLOCATOR_RANGE)
    assert a.ip(1) != b.ip(1)
    with pytest.raises(ValueError, match="host"):
        a.ip(255)


def test_waypoint_module_table_names_every_module() -> None:
    """docs/waypoint.md's module table has a row naming each waypoint module."""
    repo = ROOT.parent
    table = (repo / "docs" / "waypoint.md").read_text()
    modules = sorted((repo / "waypoint").rglob("*.py"))
    missing = [
        str(p.relative_to(repo))
        for p in modules
        if p.name != "__init__.py" and f"`{p.relative_to(repo)}`" not in table
    ]
    assert missing == []


def test_fixed_loopback_blocks_belong_to_one_module() -> None:
    """A fixed 127.0.x.0/24 used by loopback or root tests belongs to one module and the modules
    that import it (tests/helpers.py); new modules take `loopback_block()` instead."""
    tests = ROOT.parent / "tests"
    users: dict[str, set[str]] = {}
    imports: dict[str, set[str]] = {}
    for path in [*(tests / "loopback").glob("*.py"), *(tests / "root").glob("*.py")]:
        text = path.read_text()
        name = path.stem
        imports[name] = set(re.findall(r"^from tests\.(?:loopback|root)\.(\w+) import", text, re.M))
        for block in re.findall(r'"127\.(\d+\.\d+)\.\d+', text):
            if block != "0.0":
                users.setdefault(block, set()).add(name)
    for block, names in users.items():
        owners = [n for n in names if not (names - {n}) - {m for m in names if n in imports[m]}]
        assert owners, f"127.{block}.0/24 is used by unrelated modules: {sorted(names)}"
