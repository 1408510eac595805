"""Control-plane bootstrap shared by the node proxy and the waypoint (and the control plane's
certificate flags): how a proxy reaches the control plane (xDS and CA endpoints, node
credential, serving roots) and where its certificates come from.

Owns: the control-plane flags every proxy spells the same way (`add_arguments`: names, env-var
defaults, help; `Bootstrap.from_args` reads them back; `Bootstrap.argv` writes them for a proxy
someone else starts: the control plane's waypoint Deployments, the lab's node proxies), the
CA-directory and certificate-TTL flags all three processes spell the same way
(`add_certificate_arguments`),
`endpoints` (the xDS endpoint and the CA endpoint, which defaults to the xDS address; one
node credential, read once to fail fast and re-read from its file for every call, and one set
of roots for both) and `certificate_provider` (the control plane's CA, or local signing from a
CA directory when the caller's flags ask for it).

Invariants: an unreadable roots or credential file is a `ConfigError` naming it, before anything
connects; nothing is dialled here (the endpoints connect when the xDS client and the CA
provider first use them); `Bootstrap.from_args` of a parse of `Bootstrap.argv` is the same
`Bootstrap`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from meshcore.certs import CertificateProvider, LocalCAProvider, utcnow
from meshcore.errors import ConfigError

if TYPE_CHECKING:  # protobuf loads with the clients only: a static node proxy parses these flags
    from meshcore.certhelper import CertHelper
    from meshcore.xds import ControlPlaneEndpoint

DEFAULT_SERVER_NAME = "ambient-controlplane.istio-system.svc"
"""The name the control plane's serving certificate is verified against (its Service)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Bootstrap:
    """The control-plane flags every proxy shares (``--xds-address``, ``--ca-address``,
    ``--node-credential-file``, ``--controlplane-roots``, ``--controlplane-server-name``)."""

    xds_address: str
    ca_address: str | None = None
    """Default: the xDS address."""
    token_file: Path | None = None
    roots_file: Path | None = None
    """None: plaintext (lab, loopback only)."""
    server_name: str = DEFAULT_SERVER_NAME

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Bootstrap:
        """From the flags `add_arguments` declared."""
        return cls(
            xds_address=args.xds_address,
            ca_address=args.ca_address,
            token_file=args.node_credential_file,
            roots_file=args.controlplane_roots,
            server_name=args.controlplane_server_name,
        )

    def argv(self) -> list[str]:
        """The flags that make a proxy dial this control plane; the server name goes only
        with roots (it names the TLS certificate to verify, and plaintext has none)."""
        out = ["--xds-address", self.xds_address]
        if self.ca_address:
            out += ["--ca-address", self.ca_address]
        if self.token_file is not None:
            out += ["--node-credential-file", str(self.token_file)]
        if self.roots_file is not None:
            out += ["--controlplane-roots", str(self.roots_file)]
            out += ["--controlplane-server-name", self.server_name]
        return out


def add_arguments(group: argparse._ActionsContainer, *, xds_help: str) -> None:
    """Declare the control-plane flags on `group` (a parser or one of its argument groups),
    each defaulting to its environment variable; `xds_help` says what the process takes over
    xDS. Read back with `Bootstrap.from_args`."""
    env = os.environ.get
    group.add_argument("--xds-address", default=env("XDS_ADDRESS"), help=xds_help)
    group.add_argument(
        "--ca-address",
        default=env("CA_ADDRESS"),
        help="control plane host:port for CreateCertificate (default: --xds-address)",
    )
    group.add_argument(
        "--node-credential-file",
        type=Path,
        default=env("NODE_CREDENTIAL_FILE"),
        help="file holding this node's control-plane token (first line, sent as Bearer)",
    )
    group.add_argument(
        "--controlplane-roots",
        type=Path,
        default=env("CONTROLPLANE_ROOTS"),
        help="PEM roots to verify the control plane's TLS certificate; absent = plaintext",
    )
    group.add_argument(
        "--controlplane-server-name",
        default=env("CONTROLPLANE_SERVER_NAME", DEFAULT_SERVER_NAME),
        help="name the control plane's TLS certificate is verified against",
    )


def add_certificate_arguments(
    group: argparse._ActionsContainer, *, ca_dir_help: str, required: bool = False
) -> None:
    """Declare ``--ca-dir`` (env CA_DIR; `required` unless that variable is set) and
    ``--cert-ttl`` (seconds, default a day): the flags of every process that signs or holds
    workload certificates."""
    env = os.environ.get
    group.add_argument(
        "--ca-dir",
        type=Path,
        default=env("CA_DIR"),
        required=required and env("CA_DIR") is None,
        help=ca_dir_help,
    )
    group.add_argument("--cert-ttl", type=float, default=24 * 3600, help="certificate TTL, seconds")


def endpoints(boot: Bootstrap) -> tuple[ControlPlaneEndpoint, ControlPlaneEndpoint]:
    """(xDS, CA) endpoints. Raises ConfigError for an unreadable credential or roots file."""
    from meshcore.xds import ControlPlaneEndpoint, read_token_file

    token = read_token_file(boot.token_file) if boot.token_file else None
    try:
        roots = boot.roots_file.read_bytes() if boot.roots_file else None
    except OSError as exc:
        raise ConfigError("--controlplane-roots", f"cannot read: {exc}") from None

    def endpoint(address: str) -> ControlPlaneEndpoint:
        return ControlPlaneEndpoint(
            address=address,
            token=token,
            token_file=boot.token_file,
            tls_roots=roots,
            server_name=boot.server_name,
        )

    return endpoint(boot.xds_address), endpoint(boot.ca_address or boot.xds_address)


def certificate_provider(
    ca: ControlPlaneEndpoint,
    *,
    ttl: timedelta,
    local_ca_dir: Path | None = None,
    trust_domain: str = "",
    helper: CertHelper | None = None,
) -> CertificateProvider:
    """The control plane's CA at `ca`; with `local_ca_dir`, local signing by the mesh CA kept
    there (created on first use) instead. With `helper` (the node proxy's), keys, CSRs, signing
    and checks run in its helper processes, never in this one (`meshcore.certhelper`)."""
    if local_ca_dir is None:
        from meshcore.caclient import ControlPlaneCAProvider

        return ControlPlaneCAProvider(ca, ttl=ttl, helper=helper)
    if helper is not None:
        from meshcore.certhelper import local_provider

        return local_provider(local_ca_dir, trust_domain, ttl=ttl, helper=helper)
    from meshcore.ca import MeshCA

    mesh_ca = MeshCA.load_or_create(local_ca_dir, trust_domain=trust_domain)
    return LocalCAProvider(mesh_ca, ttl=ttl, clock=utcnow)
