"""meshcore.bootstrap: the control-plane endpoints and certificate source both proxies share."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest

from meshcore.bootstrap import Bootstrap, certificate_provider, endpoints
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.certs import LocalCAProvider
from meshcore.errors import ConfigError


def test_ca_endpoint_defaults_to_xds_and_shares_the_credential(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    roots = tmp_path / "roots.pem"
    roots.write_bytes(b"PEM")
    xds, ca = endpoints(Bootstrap(xds_address="10.0.0.1:15012", token_file=token, roots_file=roots))
    assert ca.address == xds.address == "10.0.0.1:15012"
    assert xds.metadata() == ca.metadata() == (("authorization", "Bearer secret"),)
    assert xds.tls_roots == ca.tls_roots == b"PEM"
    _, other = endpoints(Bootstrap(xds_address="a:1", ca_address="b:2"))
    assert other.address == "b:2"
    assert other.tls_roots is None


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--controlplane-roots"):
        endpoints(Bootstrap(xds_address="a:1", roots_file=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="node credential"):
        endpoints(Bootstrap(xds_address="a:1", token_file=tmp_path / "missing"))


def test_from_args_reads_the_shared_flags(tmp_path: Path) -> None:
    args = argparse.Namespace(
        xds_address="a:1",
        ca_address=None,
        node_credential_file=None,
        controlplane_roots=None,
        controlplane_server_name="cp.example",
    )
    assert Bootstrap.from_args(args) == Bootstrap(xds_address="a:1", server_name="cp.example")


def test_certificate_source(tmp_path: Path) -> None:
    _, ca = endpoints(Bootstrap(xds_address="a:1"))
    ttl = timedelta(hours=1)
    assert isinstance(certificate_provider(ca, ttl=ttl), ControlPlaneCAProvider)
    local = certificate_provider(ca, ttl=ttl, local_ca_dir=tmp_path / "ca", trust_domain="td")
    assert isinstance(local, LocalCAProvider)
    assert (tmp_path / "ca").is_dir()
