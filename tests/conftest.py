"""Suite-wide pytest configuration: each test gets the marker of its directory.

- ``unit``: pure logic and in-process sockets; no child processes, no external tools.
- ``loopback``: real processes, servers and tools (helm) on 127.0.0.0/8; no root.
- ``root``: the real kernel (network namespaces, eBPF, CNI); root, serialised by CI.
- ``cluster``: a real kube-apiserver, controller-manager, scheduler and etcd (built by
  scripts/kube-build) on loopback.

Select with ``-m``, e.g. ``pytest -m unit``. Shared helpers are in tests/helpers.py. Suite-wide
fixtures: the real Kubernetes cluster (tests/cluster/fixtures.py), one per session, shared by
tests/cluster and tests/root.

Each run first reaps what runs that are gone (killed before their teardown) left behind, then
marks itself (tests/runreaper.py): its token in the environment of every process it starts,
and the named netns it creates recorded, so that a later run can reap them in turn.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ambientctl.lab import system
from tests import runreaper
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


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")


def pytest_configure(config: pytest.Config) -> None:
    runreaper.reap(log=_stderr)
    token = runreaper.token_of(os.getpid())
    os.environ[runreaper.ENV] = token
    create = system.netns_add

    def netns_add(name: str) -> None:
        runreaper.record_netns(runreaper.RUNS_DIR, token, name)
        existed = system.netns_exists(name)
        create(name)
        if not existed:  # one reused (netns_add keeps an existing one) is not this run's
            runreaper.record_created(runreaper.RUNS_DIR, token, name)

    system.netns_add = netns_add  # this run's netns: named before they exist, then identified


def pytest_unconfigure(config: pytest.Config) -> None:
    """A run that ends normally has torn its fixtures down: its record goes."""
    (runreaper.RUNS_DIR / f"{os.environ.get(runreaper.ENV)}.netns").unlink(missing_ok=True)
