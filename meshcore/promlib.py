"""How a node-proxy process loads prometheus_client: its parts, not its package `__init__`.

Owns `defer_package_init()`, called by `ztunnel/__init__.py` before anything imports
prometheus_client (issue 14, memory). The package's ``__init__`` imports every submodule,
``exposition`` among them, and that one imports `http.server`, `urllib.request`,
`wsgiref.simple_server`, `gzip`, and through them `http.client`, `email`, `html`,
`socketserver`, `mimetypes`, `shutil`, `tempfile`...: 48 modules, ~2.1 MiB of RSS per worker
(bench/README.md, "Session 8: fewer modules per worker"). A node-proxy worker needs none of them:
its metrics use `prometheus_client.metrics`, ``.registry``, ``.metrics_core``,
``.multiprocess`` and the process collectors, and /metrics is rendered by
`meshcore.telemetry.text_exposition`.

Invariants:
- Nothing changes for code that uses the package's own names (``from prometheus_client import
  Counter``, ``prometheus_client.REGISTRY``, ``import *``): the first such access runs the
  package's ``__init__`` exactly as an import would have (PEP 562 module ``__getattr__``), so
  afterwards the package is the one an eager import gives. A submodule import
  (``prometheus_client.metrics``, ``from prometheus_client import values``) does not run it.
- A no-op when the package is already imported or not installed (the import that needs it then
  fails as it always did).
- The node proxy's own modules import only submodules; tests/loopback/test_ztunnel_imports.py
  checks that a ready worker, scraped, has loaded no `prometheus_client.exposition`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

PACKAGE = "prometheus_client"


def defer_package_init() -> None:
    """Put prometheus_client in `sys.modules` with its package ``__init__`` not yet run; its
    first package-level name asked for runs it (see the module docstring)."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    initialised = False

    def complete() -> None:
        nonlocal initialised
        initialised = True
        try:
            loader.exec_module(module)
        except BaseException:
            sys.modules.pop(PACKAGE, None)  # as a failed import leaves it
            raise

    def attribute(name: str) -> object:
        """PEP 562: called for a name the module does not have (yet)."""
        if not initialised:
            submodule = f"{PACKAGE}.{name}"
            if submodule in sys.modules or importlib.util.find_spec(submodule) is not None:
                return importlib.import_module(submodule)  # sets it on the package too
            complete()
            if name in module.__dict__:
                return module.__dict__[name]
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")

    module.__dict__["__getattr__"] = attribute
    sys.modules[PACKAGE] = module
