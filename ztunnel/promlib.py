"""How a node-proxy process loads prometheus_client: its parts, not its package `__init__`.

Owns `defer_package_init()`, called by `ztunnel/__init__.py` before anything imports
prometheus_client (issue 14, memory). The node proxy's alone (one per node, N workers): the
waypoint and the control plane import the package as usual (their /metrics is also
`meshcore.telemetry.text_exposition`, one owner of the text format).

The package's ``__init__`` imports every submodule, ``exposition`` among them, and that one
imports `http.server`, `urllib.request`, `wsgiref.simple_server`, `gzip`, and through them
`http.client`, `email`, `html`, `socketserver`, `mimetypes`...: 40 modules, 1 981 KiB their
imports leave allocated (tracemalloc) per worker
(bench/README.md, "Session 8: fewer modules per worker"). A node-proxy worker needs none of them:
its metrics use `prometheus_client.metrics`, ``.registry``, ``.metrics_core``,
``.multiprocess`` and the process collectors, and /metrics is rendered by
`meshcore.telemetry.text_exposition` (``generate_latest``'s bytes, but for a name ending in a
line feed, which it escapes where the library writes it raw: see there).

Invariants:
- Nothing changes for code that uses the package's own names (``from prometheus_client import
  Counter``, ``prometheus_client.REGISTRY``, ``import *``): the first such access runs the
  package's ``__init__`` exactly as an import would have (PEP 562 module ``__getattr__``), so
  afterwards the package is the one an eager import gives. A submodule import
  (``prometheus_client.metrics``, ``from prometheus_client import values``) does not run it.
- Thread-safe: the ``__init__`` runs once, under a process-wide re-entrant lock (the package's
  own ``from . import x`` comes back in the same thread); another thread asking for a package
  name meanwhile waits, then gets it (or the AttributeError an eager package gives). The spec is
  marked ``_initializing`` meanwhile, as importlib marks a module being imported.
- Only a name that can be one starts the package: an unknown dunder (``__wrapped__``, probed by
  tools) or a non-identifier (``getattr(pkg, "a.b", None)``) is an AttributeError, and leaves it
  deferred.
- A no-op when the package is already imported or not installed (the import that needs it then
  fails as it always did).
- The node proxy's own modules import only submodules; tests/loopback/test_ztunnel_imports.py
  checks that a ready worker, scraped, has loaded no `prometheus_client.exposition`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading

PACKAGE = "prometheus_client"

# One start-up at a time, process-wide. Re-entrant: the package's own ``from . import x``
# runs in the thread that holds it and comes back here (a submodule: no wait).
_INIT_LOCK = threading.RLock()
# Dunders the package's ``__init__`` binds; any other dunder asked for (``__wrapped__``,
# ``__file__``-like probes by tools) does not start it.
_INIT_DUNDERS = frozenset({"__all__"})


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
    started = False

    def complete() -> None:
        """Run the package ``__init__`` once; callers hold `_INIT_LOCK`."""
        nonlocal started
        if started:
            return  # done, failed, or running in this very thread (re-entered)
        started = True
        spec._initializing = True  # type: ignore[attr-defined]  # as importlib marks it
        try:
            loader.exec_module(module)
        except BaseException:
            sys.modules.pop(PACKAGE, None)  # as a failed import leaves it
            raise
        finally:
            spec._initializing = False  # type: ignore[attr-defined]

    def attribute(name: str) -> object:
        """PEP 562: called for a name the module does not have (yet)."""
        if (name.startswith("__") and name not in _INIT_DUNDERS) or not name.isidentifier():
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
        if not started:
            submodule = f"{PACKAGE}.{name}"
            if submodule in sys.modules or importlib.util.find_spec(submodule) is not None:
                return importlib.import_module(submodule)  # sets it on the package too
        with _INIT_LOCK:  # another thread's start-up: wait for it, then look again
            complete()
        if name in module.__dict__:
            return module.__dict__[name]
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")

    module.__dict__["__getattr__"] = attribute
    sys.modules[PACKAGE] = module
