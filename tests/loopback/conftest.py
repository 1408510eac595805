"""Fixtures shared by the loopback tests."""

from __future__ import annotations

import pytest

from tests.loopback.harness import TRANSPORTS


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """The HBONE transport between the two node proxies: "h2" (TLS/TCP) or "h3" (QUIC/UDP)."""
    return str(request.param)
