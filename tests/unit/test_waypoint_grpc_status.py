"""The `grpc_response_status` label takes only a gRPC status code from an upstream's
`grpc-status` (gRPC's statuscodes.md: 0-16): any other value would add a label set per distinct
value, kept for the life of the waypoint."""

from __future__ import annotations

import pytest

from waypoint.handler import _grpc_status


@pytest.mark.parametrize(("value", "label"), [("0", "0"), ("14", "14"), ("16", "16")])
def test_a_status_code_is_the_label(value: str, label: str) -> None:
    assert _grpc_status([("content-type", "application/grpc"), ("grpc-status", value)]) == label


@pytest.mark.parametrize("value", ["", "abc", "123", "-1", "\uff11", "0 ", "x" * 60000])
def test_anything_else_is_no_label(value: str) -> None:
    assert _grpc_status([("grpc-status", value)]) is None


def test_no_header_is_no_label() -> None:
    assert _grpc_status([("content-type", "application/grpc")]) is None
