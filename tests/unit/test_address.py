"""meshcore.address: the one host:port contract (every parser raises, none returns None)."""

from __future__ import annotations

import pytest

from meshcore.address import listen_address, parse_authority, split_host_port
from meshcore.errors import BadRequest, ConfigError


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("[fd00::1]:15008", ("fd00::1", 15008)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_split_host_port(text: str, want: tuple[str, int]) -> None:
    assert split_host_port(text) == want


@pytest.mark.parametrize("text", ["", "10.0.0.1", ":80", "10.0.0.1:", "10.0.0.1:x", "a:65536"])
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        split_host_port(text)


def test_authority_is_an_ip_and_a_port() -> None:
    assert parse_authority("10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_authority("[fd00::1]:9080") == ("fd00::1", 9080)


@pytest.mark.parametrize(
    "authority", ["reviews:9080", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:99999", "[fd00::1]"]
)
def test_bad_authority_is_a_400(authority: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_authority(authority)
    assert info.value.status == 400


def test_listen_address_names_the_flag() -> None:
    assert listen_address("127.0.0.1:15020", "--admin") == ("127.0.0.1", 15020)
    with pytest.raises(ConfigError, match="--admin"):
        listen_address("15020", "--admin")
