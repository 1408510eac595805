"""The compiled (mypyc) build of the data path's hot modules (node proxy and waypoint), and the
pure-Python fallback.

Owns: which modules are compiled (`COMPILED`), the build (`build()`, run by scripts/setup
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
- A build whose recorded source hashes (`STAMP`) no longer match the sources is never used: the
  sources are imported and one warning says so (an edited module must not run as its stale
  compiled self). `python -m meshcore.native` rebuilds; `python -m meshcore.nativecache`
  restores a build of the same sources from the cache, else builds and caches it.
"""

from __future__ import annotations

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
    "waypoint.metrics",
)
"""The node proxy's per-byte, per-stream and per-connection path and the waypoint's
per-request path (profiles in bench/README.md)."""
GROUP = "meshcore._native"
STAMP = ROOT / "meshcore" / "_native.json"
"""Written by `build()`: the sha256 of each compiled module's source."""
PURE_ENV = "AMBIENT_MESH_PURE_PYTHON"

_state: dict[str, str] = {"mode": "unselected"}


def source(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_hashes(root: Path = ROOT) -> dict[str, str]:
    return {m: hashlib.sha256(source(m, root).read_bytes()).hexdigest() for m in COMPILED}


def stamp_path(root: Path = ROOT) -> Path:
    """`STAMP` of the tree at `root`."""
    return root / STAMP.relative_to(ROOT)


def stamp_text(root: Path = ROOT) -> str:
    """The stamp `build()` writes for the sources of the tree at `root`."""
    return json.dumps(source_hashes(root), indent=1, sort_keys=True) + "\n"


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
        if recorded != source_hashes():
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
