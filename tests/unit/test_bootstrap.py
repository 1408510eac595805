"""meshcore.bootstrap: the control-plane endpoints and certificate source both proxies share."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest

from controlplane import app as controlplane_app
from controlplane.waypoints import ROOTS_DIR, TOKEN_DIR, WaypointSettings, desired_objects
from meshcore.bootstrap import Bootstrap, certificate_provider, endpoints
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.certs import LocalCAProvider
from meshcore.errors import ConfigError
from waypoint import app as waypoint_app
from ztunnel import flags as ztunnel_flags


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


# The three processes: the node proxy and the waypoint declare the control-plane flags
# (meshcore.bootstrap.add_arguments); the control plane writes them for its waypoints.
CP_ENV = {
    "XDS_ADDRESS": "cp.env:15012",
    "CA_ADDRESS": "ca.env:15012",
    "NODE_CREDENTIAL_FILE": "/env/token",
    "CONTROLPLANE_ROOTS": "/env/roots.pem",
    "CONTROLPLANE_SERVER_NAME": "cp.env.svc",
}
FROM_ENV = Bootstrap(
    xds_address="cp.env:15012",
    ca_address="ca.env:15012",
    token_file=Path("/env/token"),
    roots_file=Path("/env/roots.pem"),
    server_name="cp.env.svc",
)


def _proxy_parses(argv: list[str]) -> dict[str, Bootstrap]:
    _, zt = ztunnel_flags.parse_args(["--node", "n1", *argv])
    _, wp = waypoint_app.parse_args(["--node", "n1", *argv])
    return {"ztunnel": Bootstrap.from_args(zt), "waypoint": Bootstrap.from_args(wp)}


@pytest.mark.parametrize(
    "boot",
    [
        Bootstrap(xds_address="cp:15012"),
        Bootstrap(
            xds_address="cp:15012",
            ca_address="ca:15012",
            token_file=Path("/t/token"),
            roots_file=Path("/t/roots.pem"),
            server_name="cp.example.svc",
        ),
    ],
)
def test_every_proxy_reads_back_the_flags_bootstrap_writes(boot: Bootstrap) -> None:
    assert _proxy_parses(boot.argv()) == {"ztunnel": boot, "waypoint": boot}


def test_every_proxy_defaults_the_flags_from_the_same_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in CP_ENV.items():
        monkeypatch.setenv(var, value)
    assert _proxy_parses([]) == {"ztunnel": FROM_ENV, "waypoint": FROM_ENV}


def test_control_plane_starts_waypoints_with_flags_the_waypoint_reads() -> None:
    settings = WaypointSettings(
        xds_address="cp.shop.svc:15012", controlplane_server_name="cp.shop.svc", roots_pem="PEM"
    )
    gateway = {
        "metadata": {"name": "wp", "namespace": "shop", "uid": "u-1"},
        "spec": {"gatewayClassName": "istio-waypoint"},
    }
    container = desired_objects(gateway, settings).deployment["spec"]["template"]["spec"][
        "containers"
    ][0]
    _, args = waypoint_app.parse_args(container["args"])
    assert Bootstrap.from_args(args) == Bootstrap(
        xds_address="cp.shop.svc:15012",
        token_file=Path(TOKEN_DIR, "token"),
        roots_file=Path(ROOTS_DIR, "root-cert.pem"),
        server_name="cp.shop.svc",
    )


def test_all_three_processes_take_the_certificate_flags_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CA_DIR", "/env/ca")
    mesh = ["--mesh-config", str(tmp_path / "mesh.yaml")]
    cp = ["--manifest-dir", str(tmp_path)]
    for extra, ca_dir, ttl in (
        ([], Path("/env/ca"), 24 * 3600.0),
        (["--ca-dir", "/x", "--cert-ttl", "60"], Path("/x"), 60.0),
    ):
        _, zt = ztunnel_flags.parse_args(["--node", "n1", *mesh, *extra])
        _, wp = waypoint_app.parse_args(mesh + extra)
        settings = controlplane_app.parse_args(cp + extra)
        assert (zt.ca_dir, zt.cert_ttl) == (ca_dir, ttl)
        assert (wp.ca_dir, wp.cert_ttl) == (ca_dir, ttl)
        assert (settings.ca_dir, settings.cert_ttl) == (ca_dir, ttl)
