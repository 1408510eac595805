"""Tests that need root and the real kernel (network namespaces, eBPF, CNI).

They run for real in CI (which is root). Outside CI a non-root run skips them; inside CI a
non-root run FAILS them, so kernel tests can never be counted as passing without running.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _require_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("kernel tests must run as root in CI")
    pytest.skip("needs root (runs in CI)")
