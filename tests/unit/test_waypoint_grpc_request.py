"""Which waypoint requests are gRPC (`waypoint.body.Request.grpc`): the local replies of a gRPC
request carry grpc-status, and its telemetry says ``grpc``. The gRPC spec's content-type rule
(`meshcore.grpcwire.is_grpc_content_type`), as Envoy's: gRPC-Web is answered as plain HTTP."""

from __future__ import annotations

import pytest

from waypoint.body import EmptyBody, Request


def request(*headers: tuple[str, str]) -> Request:
    return Request(
        protocol="h2",
        method="POST",
        target="/a.B/C",
        authority="a",
        scheme="http",
        headers=list(headers),
        body=EmptyBody(),
        has_body=False,
        content_length=None,
    )


@pytest.mark.parametrize(
    ("ctype", "grpc"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("application/grpc;charset=utf-8", True),
        ("Application/GRPC", True),
        ("application/grpc-web", False),
        ("application/grpc-web+proto", False),
        ("application/grpcx", False),
        ("text/plain", False),
    ],
)
def test_grpc_by_content_type(ctype: str, grpc: bool) -> None:
    assert request(("content-type", ctype)).grpc is grpc


def test_the_first_content_type_decides() -> None:
    assert not request(("content-type", "text/plain"), ("content-type", "application/grpc")).grpc
    assert not request(("te", "trailers")).grpc
