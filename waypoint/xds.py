"""The waypoint's control-plane config channel: delta xDS + the control plane's CA.

Owns: `L7Store` (the current ``ambient.l7.Resource`` objects by name -> one `WaypointConfig`),
and `controlplane_context` (the xDS client subscribed to Address + Authorization, like a node
proxy, plus the L7 type; certificates from the control plane's CA).

Invariants:
- Each L7 resource is decoded on its own (`meshcore.proto.l7res.unpack_l7`); undecodable ones
  are NACKed by name and the rest applied. Objects are then parsed exactly as a static
  ``--config`` file (`meshcore.config.objects.parse_objects`, in resource-name order so the result
  does not depend on arrival order): a bad object is left out with a warning (a bad
  AuthorizationPolicy fails closed), as in static mode, AND NACKed by name with its findings
  (`nacks`), so the control plane's connection view shows which object the waypoint refused.
- The mesh path settings come from the control plane's ``MeshSettings`` resource; a waypoint
  flag that was given overrides its setting (`L7Store.path_policy`). The settings are swapped
  by one assignment too.
- State and config are each swapped by one assignment (`WaypointContext.set_state`/
  `set_config`); while the control plane is unreachable the last good ones stay in force.
- The waypoint authenticates with its node's credential and asks only for its own identity:
  the control plane's CA signs it because the waypoint's pod runs on that node.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta

from meshcore.bootstrap import Bootstrap, certificate_provider, endpoints
from meshcore.certs import CertificateProvider
from meshcore.config.objects import parse_objects
from meshcore.config.pathnorm import PathPolicy
from meshcore.config.routes import WaypointConfig
from meshcore.errors import ConfigError
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto.l7res import L7_TYPE, L7Resource, MeshSettings, unpack_l7
from meshcore.state import MeshState
from meshcore.xds import XdsClient, XdsSettings
from waypoint.context import WaypointContext, WaypointSettings

log = logging.getLogger("waypoint.xds")


class L7Store:
    """The L7 objects received so far, by resource name."""

    def __init__(self, domain_suffix: str = "cluster.local") -> None:
        self.domain_suffix = domain_suffix
        self.resources: dict[str, L7Resource] = {}

    def apply(self, resp: dpb.DeltaDiscoveryResponse) -> list[tuple[str, str]]:
        """Apply removals and every decodable resource; return (name, error) of the others."""
        errors: list[tuple[str, str]] = []
        for name in resp.removed_resources:
            self.resources.pop(name, None)
        for res in resp.resources:
            try:
                self.resources[res.name] = unpack_l7(res.name, res.resource)
            except ConfigError as exc:
                errors.append((res.name, str(exc)))
        return errors

    def config(self) -> WaypointConfig:
        docs = [
            self.resources[k].document()
            for k in sorted(self.resources)
            if self.resources[k].mesh is None
        ]
        return parse_objects(docs, domain_suffix=self.domain_suffix)

    def path_policy(self, override: tuple[str, str]) -> PathPolicy:
        """The mesh's path settings (the control plane's MeshSettings resource), each one
        overridden by the waypoint's own flag when that was given (`override`)."""
        mesh = next((r.mesh for r in self.resources.values() if r.mesh is not None), None)
        mesh = mesh or MeshSettings()
        return PathPolicy.parse(
            override[0] or mesh.path_normalization, override[1] or mesh.escaped_slashes_action
        )

    def nacks(self, cfg: WaypointConfig, names: Sequence[str]) -> list[tuple[str, str]]:
        """(name, error) of the resources among `names` whose object has Error findings (left
        out, or fail-closed for a policy)."""
        errors: dict[str, list[str]] = {}
        for ref, finding in cfg.findings:
            if finding.level == "Error":
                errors.setdefault(ref, []).append(f"[{finding.code}] {finding.render()}")
        out = []
        for name in names:
            res = self.resources.get(name)
            if res is None:
                continue
            found = errors.get(f"{res.kind} {res.namespace}/{res.name}")
            if found:
                out.append((name, "; ".join(found)))
        return out


def apply_l7(
    ctx: WaypointContext, store: L7Store, resp: dpb.DeltaDiscoveryResponse
) -> list[tuple[str, str]]:
    """One L7 response: objects and mesh settings into `ctx`; (name, error) to NACK."""
    errors = store.apply(resp)
    cfg = store.config()
    errors += store.nacks(cfg, [r.name for r in resp.resources])
    policy = store.path_policy(ctx.settings.path_override)
    if policy != ctx.settings.path_policy:
        log.info(
            "mesh path settings: %s, %s", policy.normalization.value, policy.escaped_slashes.value
        )
        ctx.settings = dataclasses.replace(ctx.settings, path_policy=policy)
    ctx.set_config(cfg)
    ctx.warnings[:] = list(cfg.warnings)
    for w in cfg.warnings:
        log.warning("config: %s", w)
    log.info(
        "L7 config: %d route tables, %d destination rules, %d policies",
        len(cfg.route_tables),
        len(cfg.destination_rules),
        len(cfg.policies),
    )
    return errors


def controlplane_context(
    settings: WaypointSettings,
    args: argparse.Namespace,
    build: Callable[
        [WaypointSettings, MeshState, WaypointConfig, CertificateProvider], WaypointContext
    ],
) -> tuple[WaypointContext, XdsClient, L7Store]:
    """The context (empty state/config until the first responses) and its xDS client."""
    xds_ep, ca_ep = endpoints(Bootstrap.from_args(args))
    provider = certificate_provider(ca_ep, ttl=timedelta(seconds=args.cert_ttl))
    store = L7Store(settings.domain_suffix)
    ctx = build(settings, MeshState.empty(), parse_objects([]), provider)

    def on_update(state: MeshState) -> None:
        ctx.set_state(state)

    def on_l7(resp: dpb.DeltaDiscoveryResponse) -> Sequence[tuple[str, str]]:
        return apply_l7(ctx, store, resp)

    client = XdsClient(
        xds_ep,
        XdsSettings(node=args.node, node_kind="waypoint"),
        on_update=on_update,
        extra_types={L7_TYPE: on_l7},
    )
    ctx.metrics.xds_stats = client.stats
    return ctx, client, store
