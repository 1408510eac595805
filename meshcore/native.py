"""The compiled (mypyc) build of the data path's hot modules (node proxy and waypoint), and the
pure-Python fallback.

Owns: which modules are compiled (`COMPILED`), which sources a build depends on
(`build_inputs`), the build (`build()`, run by scripts/setup
through the user-level build cache `meshcore.nativecache`), and the choice made at import time
(`select()`, called from `meshcore/__init__.py` before any of them is imported;
`waypoint/__init__.py` and `ztunnel/__init__.py` import `meshcore` first for that).

The build puts one extension module per compiled module next to its source
(``connection.cpython-311-x86_64-linux-gnu.so`` beside ``connection.py``), plus their shared
library ``meshcore/_native__mypyc*.so``; Python's import system prefers an extension module to a
source file of the same name, so the compiled build is the default once built.

Invariants:
- All compiled modules run compiled, or none does (they are one mypyc group: compiled code
  calls compiled classes directly, a mix would have two copies of a class).
- ``AMBIENT_MESH_PURE_PYTHON=1`` in the environment forces the pure-Python sources.
- The sources a build depends on are the compiled modules and every first-party module they
  import, transitively (`build_inputs`: mypyc compiles against their types and inlines their
  `Final` constants); one set for both the stamp and the build cache's key
  (`meshcore.nativecache`).
- A build whose recorded source hashes (`STAMP`) no longer match the sources is never used: the
  sources are imported and one warning says so (an edited module, or a module it imports such
  as `meshcore.errors`, must not run as its stale compiled self). `python -m meshcore.native`
  rebuilds; `python -m meshcore.nativecache` restores a build of the same sources from the
  cache, else builds and caches it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
COMPILED: tuple[str, ...] = (
    "meshcore.hbone.frames",
    "meshcore.hbone.headers",
    "meshcore.hbone.events",
    "meshcore.hbone.budget",
    "meshcore.hbone.output",
    "meshcore.hbone.streams",
    "meshcore.hbone.flow",
    "meshcore.hbone.control",
    "meshcore.hbone.headerblock",
    "meshcore.hbone.connection",
    "meshcore.hbone.aio",
    "meshcore.hbone.pool",
    "ztunnel.proxy.relay",
    "ztunnel.proxy.inbound",
    "ztunnel.proxy.outbound",
    "ztunnel.protocol.plan",
    "ztunnel.protocol.plantypes",
    "ztunnel.metrics",
    "meshcore.sockets",
    "meshcore.deadlines",
    "waypoint.protocol.http1",
    "waypoint.protocol.hygiene",
    "waypoint.protocol.route",
    "waypoint.protocol.authz",
    "waypoint.protocol.cluster",
    "waypoint.protocol.trace",
    "waypoint.tunnel",
    "waypoint.upstream",
    "waypoint.http1",
    "waypoint.handler",
    "waypoint.derived",
    "waypoint.reply",
    "waypoint.metrics",
)
"""The node proxy's per-byte, per-stream and per-connection path and the waypoint's
per-request path (profiles in bench/README.md)."""
GROUP = "meshcore._native"
STAMP = ROOT / "meshcore" / "_native.json"
"""Written by `build()`: the sha256 of each source the build depends on (`stamp_text`)."""
FIRST_PARTY = ("meshcore", "ztunnel", "waypoint")
PURE_ENV = "AMBIENT_MESH_PURE_PYTHON"

_state: dict[str, str] = {"mode": "unselected"}


def source(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def _module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


_parsed: dict[tuple[str, str, bool], frozenset[str]] = {}
"""(sha256 of a source, its module, is a package) -> `_imported`: parsing is most of a key's
cost, and a source's imports are a function of its text."""


def _imported(source: bytes, digest: str, module: str, *, package: bool) -> frozenset[str]:
    """Module names an import statement of `source` may load (``from a import b``: ``a`` and
    ``a.b``, which may be a submodule); relative imports resolved against `module`."""
    memo = _parsed.get((digest, module, package))
    if memo is not None:
        return memo
    base_package = module if package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = base_package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    found = _parsed[(digest, module, package)] = frozenset(n for n in names if n)
    return found


def build_inputs(root: Path = ROOT) -> tuple[dict[str, str], set[str]]:
    """(relative path -> sha256 of every first-party source the compiled modules depend on,
    with their packages' ``__init__``; top-level names of the third-party modules they import)."""
    files: dict[str, str] = {}
    third: set[str] = set()
    todo = list(COMPILED)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        top = name.partition(".")[0]
        if top not in FIRST_PARTY:
            if top not in sys.stdlib_module_names:
                third.add(top)
            continue
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # packages run first
        path = _module_file(root, name)
        if path is None:
            continue  # ``from pkg import function``: not a module
        text = path.read_bytes()
        digest = files[path.relative_to(root).as_posix()] = hashlib.sha256(text).hexdigest()
        todo += sorted(_imported(text, digest, name, package=path.name == "__init__.py"))
    return files, third


def stamp_path(root: Path = ROOT) -> Path:
    """`STAMP` of the tree at `root`."""
    return root / STAMP.relative_to(ROOT)


def stamp_text(root: Path = ROOT) -> str:
    """The stamp `build()` writes for the sources of the tree at `root`: the sha256 of every
    source the build depends on (`build_inputs`), by tree-relative path."""
    return json.dumps(build_inputs(root)[0], indent=1, sort_keys=True) + "\n"


def _stamp_current(recorded: object, root: Path = ROOT) -> bool:
    """Whether every source the stamp names still has its recorded hash. Hashing the recorded
    files (not walking the imports again) suffices: the set of sources changes only through an
    edit to one of them."""
    if not isinstance(recorded, dict) or not recorded:
        return False
    for rel, digest in recorded.items():
        try:
            data = (root / str(rel)).read_bytes()
        except OSError:
            return False
        if hashlib.sha256(data).hexdigest() != digest:
            return False
    return all(source(m, root).relative_to(root).as_posix() in recorded for m in COMPILED)


def _built() -> bool:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return (
        all(any(source(m).with_suffix(s).exists() for s in suffixes) for m in COMPILED)
        and STAMP.exists()
    )


class _SourceFinder:
    """Finds the compiled modules' .py sources ahead of their extension modules. A meta path
    finder is any object with `find_spec` (PEP 451); not subclassing `importlib.abc` keeps that
    module (and `importlib.resources`, `tempfile`... it imports) out of every process."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, source(fullname))


def select() -> str:
    """Choose compiled or pure Python for this process (once); returns the mode: "compiled",
    "pure" (forced, or nothing built) or "stale" (built from other sources: pure Python)."""
    if _state["mode"] != "unselected":
        return _state["mode"]
    mode = "compiled"
    if os.environ.get(PURE_ENV, "") not in ("", "0") or not _built():
        mode = "pure"
    else:
        try:
            recorded = json.loads(STAMP.read_text())
        except (OSError, ValueError):
            recorded = {}
        if not _stamp_current(recorded):
            mode = "stale"
            warnings.warn(
                "the compiled build of the hot modules is stale; running the "
                "pure-Python sources (rebuild: scripts/setup or python -m meshcore.native)",
                RuntimeWarning,
                stacklevel=2,
            )
    if mode != "compiled" and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())
    _state["mode"] = mode
    return mode


def build(opt_level: str = "3") -> None:
    """Compile `COMPILED` in place with mypyc and record the sources' hashes."""
    from mypyc.build import mypycify

    setup = importlib.import_module("setuptools").setup  # untyped; build time only

    stamp = stamp_text()
    STAMP.unlink(missing_ok=True)  # a failed build leaves no stamp: pure Python is used
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        setup(
            name="ambient-mesh-native",
            ext_modules=mypycify(
                [str(source(m).relative_to(ROOT)) for m in COMPILED],
                opt_level=opt_level,
                group_name=GROUP,
            ),
            script_args=["build_ext", "--inplace", "--build-temp", "build/native"],
        )
    finally:
        os.chdir(cwd)
    STAMP.write_text(stamp)


if __name__ == "__main__":
    build()
