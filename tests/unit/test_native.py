"""The compiled (mypyc) build of the hot modules is the default, and the pure-Python fallback
works too (`meshcore.native`, issue 14): the HBONE core's, the node proxy's planning and
telemetry, and the waypoint codec's, routing's and authorization's unit tests run once more
against the sources in a subprocess with AMBIENT_MESH_PURE_PYTHON=1 (the rest of the suite runs
whichever build this process selected, compiled after scripts/setup)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshcore import native

CORE_TESTS = (
    "tests/unit/test_hbone_connection.py",
    "tests/unit/test_hbone_headers.py",
    "tests/unit/test_hbone_limits.py",
    "tests/unit/test_accept_path.py",
    "tests/unit/test_hbone_backpressure.py",
    "tests/unit/test_hbone_bulk.py",
    "tests/unit/test_hbone_fuzz.py",
    "tests/unit/test_hbone_data_path.py",
    "tests/unit/test_hbone_pool.py",
    "tests/unit/test_hbone_connect.py",
    "tests/unit/test_waypoint_http1.py",
    "tests/unit/test_waypoint_routing.py",
    "tests/unit/test_waypoint_authz.py",
    "tests/unit/test_waypoint_cluster.py",
    "tests/unit/test_hygiene.py",
    "tests/unit/test_tracing_sampler.py",
    "tests/unit/test_deadlines.py",
    "tests/unit/test_telemetry.py",
    "tests/unit/test_plan.py",
)


def _files(env: dict[str, str], cwd: Path = native.ROOT) -> dict[str, str]:
    """The mode a fresh interpreter selects and the file each compiled module loads from."""
    code = (
        "import json, importlib, meshcore.native as n\n"
        "print(json.dumps({'mode': n.select(), **{m: importlib.import_module(m).__file__ "
        "for m in n.COMPILED}}))"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
    ).stdout
    files: dict[str, str] = json.loads(out)
    return files


def test_compiled_build_is_the_default_once_built() -> None:
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if native.select() == "pure" and not os.environ.get(native.PURE_ENV):
        pytest.fail("no compiled build: scripts/setup builds it (python -m meshcore.native)")
    files = _files(env)
    assert files.pop("mode") == "compiled"
    assert all(f.endswith(".so") for f in files.values()), files


def test_pure_python_is_forced_by_the_environment() -> None:
    files = _files({**os.environ, native.PURE_ENV: "1"})
    assert files.pop("mode") == "pure"
    assert all(f.endswith(".py") for f in files.values()), files


def test_hbone_core_tests_pass_in_pure_python() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS],
        env={**os.environ, native.PURE_ENV: "1"},
        capture_output=True,
        text=True,
        cwd=native.ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_a_stale_build_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled build whose recorded source hashes differ (a module edited after the build)
    selects the sources, with a warning, instead of running stale compiled code."""
    stamp = tmp_path / "_native.json"
    stamp.write_text(json.dumps({m: "0" * 64 for m in native.COMPILED}))
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    monkeypatch.setattr(native, "STAMP", stamp)
    monkeypatch.setattr(native, "_built", lambda: True)
    monkeypatch.setitem(native._state, "mode", "unselected")
    before = list(sys.meta_path)
    try:
        with pytest.warns(RuntimeWarning, match="stale"):
            assert native.select() == "stale"
        finder = sys.meta_path[0]
        spec = finder.find_spec("meshcore.hbone.frames", None)
        assert spec is not None
        assert spec.origin is not None
        assert spec.origin.endswith(".py")
        assert finder.find_spec("meshcore.state", None) is None
    finally:
        sys.meta_path[:] = before
    importlib.invalidate_caches()


def test_every_module_imports_with_the_compiled_build() -> None:
    """A class compiled by mypyc can be subclassed by interpreted code only when it says so
    (`mypyc_attr(allow_interpreted_subclasses=True)`); otherwise the subclass's module fails
    at import. Import every module of the packages that use the compiled ones."""
    code = (
        "import importlib, pkgutil, meshcore, ztunnel, waypoint, meshcore.native as n\n"
        "assert n.select() == 'compiled', n.select()\n"
        "for pkg in (meshcore, ztunnel, waypoint):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        env={k: v for k, v in os.environ.items() if k != native.PURE_ENV},
        capture_output=True,
        text=True,
        cwd=native.ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_except_name_bound_to_a_native_class_and_another() -> None:
    """mypyc gives a name bound by several `except ... as name` of one function the type of
    the first: when that is a class compiled with the module (a native class), binding the
    name to another exception raises TypeError ("HttpParseError object expected; got
    ConnectionResetError": an upstream closing before its response head was a 500, not a
    reset, in the compiled build). Each handler of a native class gets a name of its own."""
    trees = {
        m: ast.parse((native.ROOT / (m.replace(".", "/") + ".py")).read_text())
        for m in native.COMPILED
    }
    native_classes = {
        node.name
        for tree in trees.values()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }
    found = []
    for module, tree in trees.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            types: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            for name, bound in types.items():
                natives = {t for t in bound if t.rsplit(".", 1)[-1] in native_classes}
                if natives and len(bound) > 1:
                    found.append(f"{module}.{fn.name}: {name} as {sorted(bound)}")
    assert not found, found
