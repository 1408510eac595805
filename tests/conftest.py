"""Suite-wide pytest configuration: each test gets the marker of its directory.

- ``unit``: pure logic and in-process sockets; no child processes, no external tools.
- ``loopback``: real processes, servers and tools (helm) on 127.0.0.0/8; no root.
- ``root``: the real kernel (network namespaces, eBPF, CNI); root, serialised by CI.
- ``cluster``: a real kube-apiserver, controller-manager, scheduler and etcd (built by
  scripts/kube-build) on loopback.

Select with ``-m``, e.g. ``pytest -m unit``. Shared helpers are in tests/helpers.py. Suite-wide
fixtures: the real Kubernetes cluster (tests/cluster/fixtures.py), one per session, shared by
tests/cluster and tests/root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.fixtures import chart, kube

__all__ = ["chart", "kube"]

TIERS = ("unit", "loopback", "root", "cluster")
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path))
        parts = path.relative_to(HERE).parts if path.is_relative_to(HERE) else ()
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
