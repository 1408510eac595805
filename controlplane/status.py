"""Findings written back into the objects' status, where ``kubectl get -o yaml`` shows them.

Owns: `desired_status` (pure: the status patch of one object given its findings) and
`StatusWriter` (patches the ``status`` subresource through `meshcore.kubeapi`, as the waypoint
controller does for Gateways).

Formats:
- Istio kinds (AuthorizationPolicy, RequestAuthentication, VirtualService, DestinationRule):
  ``status.validationMessages`` as istiod writes them (``analysis.v1alpha1.AnalysisMessageBase``:
  ``type {code, name}``, ``level`` ERROR/WARNING/INFO, ``documentationUrl``), plus our
  ``description`` naming the field path and what happens. No findings: the list is removed.
- Istio PeerAuthentication: ``status.validationMessages`` too (an unreadable one is enforced
  as STRICT for its scope, and says so).
- Gateway API HTTPRoute: ``status.parents[]`` (one per parentRef) with an ``Accepted``
  condition: False/``UnsupportedValue`` when the route is not applied (an Error finding), else
  True/``Accepted``; warnings go into the True condition's message. (Gateway API v1
  RouteParentStatus; our controllerName is `CONTROLLER_NAME`.)
- Gateway API Gateway of class ``istio-waypoint`` (`gateway_acceptance`, GatewayStatus):
  Error findings make ``Accepted`` and ``Programmed`` False with reason ``UnsupportedAddress``
  (``spec.addresses``, as the Gateway API conformance suite expects) or ``Invalid``; warnings go
  into the ``Accepted`` message. The waypoint controller (`controlplane.waypoints`) writes
  these conditions when it runs (it owns the Gateway's status); without it, this writer does.
  Gateways of other classes are not ours: Gateway API reserves their status to their class's
  controller, so they are reported on /debug/warnings and by ``ambientctl analyze`` only.

Invariants: only objects whose desired status differs from what this writer last wrote are
patched (one PATCH per change); a failed PATCH is retried on the next sync.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controlplane.store import StoreSnapshot
from meshcore.config.findings import INVALID, KIND, REFUSED, UNKNOWN, WARNED, Finding
from meshcore.kubeapi import KubeApi

log = logging.getLogger(__name__)

CONTROLLER_NAME = "ambient-mesh.io/controlplane"
DOC_URL = "https://github.com/ambient-mesh/ambient-mesh/blob/main/docs/config-fields.md"
_NAMES = {
    UNKNOWN: "UnknownField",
    REFUSED: "UnsupportedField",
    WARNED: "IgnoredField",
    KIND: "UnsupportedKind",
    INVALID: "InvalidValue",
}
API_PATHS = {
    "AuthorizationPolicy": ("/apis/security.istio.io/v1", "authorizationpolicies"),
    "RequestAuthentication": ("/apis/security.istio.io/v1", "requestauthentications"),
    "VirtualService": ("/apis/networking.istio.io/v1", "virtualservices"),
    "DestinationRule": ("/apis/networking.istio.io/v1", "destinationrules"),
    "PeerAuthentication": ("/apis/security.istio.io/v1", "peerauthentications"),
    "HTTPRoute": ("/apis/gateway.networking.k8s.io/v1", "httproutes"),
    "Gateway": ("/apis/gateway.networking.k8s.io/v1", "gateways"),
}
WAYPOINT_CLASS = "istio-waypoint"
UNIMPLEMENTED_PLURALS = {
    "ServiceEntry": "serviceentries",
    "WorkloadEntry": "workloadentries",
    "Sidecar": "sidecars",
    "EnvoyFilter": "envoyfilters",
    "Gateway.networking.istio.io": "gateways",
    "Telemetry": "telemetries",
    "WasmPlugin": "wasmplugins",
    "GRPCRoute": "grpcroutes",
    "TCPRoute": "tcproutes",
    "TLSRoute": "tlsroutes",
}
"""Kinds the mesh does not implement (`controlplane.objects.UNIMPLEMENTED_KINDS`): their one
AMB0204 finding is written like the other kinds of their API (routes: an ``Accepted=False``
parent condition, reason ``UnsupportedValue``; Istio kinds: a validationMessage), at the
apiVersion the object was read with."""
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute")


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One object the writer may report on."""

    kind: str
    namespace: str
    name: str
    parent_refs: tuple[Mapping[str, Any], ...] = ()
    """Routes only: ``spec.parentRefs`` as written."""
    api_version: str = ""
    """Kinds of `UNIMPLEMENTED_PLURALS`: the group/version the object was read with."""

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    @property
    def path(self) -> str:
        if self.kind in UNIMPLEMENTED_PLURALS:
            prefix, plural = f"/apis/{self.api_version}", UNIMPLEMENTED_PLURALS[self.kind]
        else:
            prefix, plural = API_PATHS[self.kind]
        return f"{prefix}/namespaces/{self.namespace}/{plural}/{self.name}/status"


def status_targets(snapshot: StoreSnapshot, *, gateways: bool = True) -> list[Target]:
    """Every object of a kind in `API_PATHS` in the snapshot (pure); waypoint Gateways only
    with `gateways` (False: the waypoint controller writes their status)."""
    out: list[Target] = []
    for ns, objs in sorted(snapshot.namespaces.items()):
        for ap in objs.authorization_policies.values():
            out.append(Target(kind="AuthorizationPolicy", namespace=ns, name=ap.name))
        for pa in objs.peer_authentications.values():
            out.append(Target(kind="PeerAuthentication", namespace=ns, name=pa.name))
        for obj in objs.stored.values():
            if obj.kind not in API_PATHS and obj.kind not in UNIMPLEMENTED_PLURALS:
                continue
            if obj.kind == "Gateway" and (not gateways or obj.gateway_class != WAYPOINT_CLASS):
                continue
            doc = json.loads(obj.raw_json) if obj.raw_json else {}
            parents: tuple[Mapping[str, Any], ...] = ()
            if obj.kind in ROUTE_KINDS:
                spec = doc.get("spec")
                refs = spec.get("parentRefs") if isinstance(spec, Mapping) else None
                if isinstance(refs, list):
                    parents = tuple(r for r in refs if isinstance(r, Mapping))
            api_version = (
                str(doc.get("apiVersion", "")) if obj.kind in UNIMPLEMENTED_PLURALS else ""
            )
            if obj.kind in UNIMPLEMENTED_PLURALS and "/" not in api_version:
                continue  # no group/version to write to (not read from Kubernetes)
            out.append(
                Target(
                    kind=obj.kind,
                    namespace=ns,
                    name=obj.name,
                    parent_refs=parents,
                    api_version=api_version,
                )
            )
    return out


def gateway_acceptance(findings: Sequence[Finding]) -> tuple[bool, str, str]:
    """(accepted, reason, message) of a waypoint Gateway given its findings (pure; Gateway API
    v1 GatewayConditionReason: ``Accepted``, ``Invalid``, ``UnsupportedAddress``)."""
    errors = [f for f in findings if f.level == "Error"]
    if errors:
        addresses = any(f.path.startswith("spec.addresses") for f in errors)
        return False, "UnsupportedAddress" if addresses else "Invalid", _text(errors)
    return True, "Accepted", _text(findings)


def desired_status(target: Target, findings: Sequence[Finding], now: str) -> dict[str, Any]:
    """The ``status`` merge patch for `target` (pure; `now` is an RFC 3339 timestamp)."""
    if target.kind == "Gateway":
        ok, reason, text = gateway_acceptance(findings)
        flag = "True" if ok else "False"
        conds = [
            {
                "type": "Accepted",
                "status": flag,
                "reason": reason,
                "message": text or "waypoint Gateway is valid",
                "lastTransitionTime": now,
            },
        ]
        if not ok:
            conds.append(
                {
                    "type": "Programmed",
                    "status": "False",
                    "reason": "Invalid",
                    "message": text,
                    "lastTransitionTime": now,
                }
            )
        return {"conditions": conds}
    if target.kind in ROUTE_KINDS:
        # A kind the mesh does not implement is not applied, whatever the finding's level.
        errors = [f for f in findings if f.level == "Error" or f.code == KIND]
        if errors:
            cond = {
                "type": "Accepted",
                "status": "False",
                "reason": "UnsupportedValue",
                "message": _text(errors),
            }
        else:
            cond = {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": _text(findings) or "Route was valid",
            }
        cond["lastTransitionTime"] = now
        parents = [
            {"parentRef": dict(p), "controllerName": CONTROLLER_NAME, "conditions": [cond]}
            for p in target.parent_refs
        ]
        return {"parents": parents}
    messages = [
        {
            "type": {"code": f.code, "name": _NAMES.get(f.code, "Finding")},
            "level": f.level.upper(),
            "documentationUrl": DOC_URL,
            "description": f.render(),
        }
        for f in findings
    ]
    return {"validationMessages": messages or None}


def _text(findings: Sequence[Finding]) -> str:
    return "; ".join(f"[{f.code}] {f.render()}" for f in findings)


def _without_time(status: Mapping[str, Any]) -> Any:
    """`status` without lastTransitionTime (what decides whether a PATCH is needed)."""
    conditions = status.get("conditions")
    if isinstance(conditions, list):
        return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions]
    parents = status.get("parents")
    if not isinstance(parents, list):
        return status
    return [
        [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in p["conditions"]]
        for p in parents
    ]


class StatusWriter:
    """Patches the status of objects read from Kubernetes (see the module docstring)."""

    def __init__(self, kube: KubeApi, *, gateways: bool = True) -> None:
        self._kube = kube
        self.gateways = gateways
        """Write waypoint Gateways' conditions (False when the waypoint controller does)."""
        self.written: dict[str, Any] = {}
        """ref -> the status last written (without timestamps)."""
        self.patches = 0
        self.errors: list[str] = []

    async def sync(
        self, targets: Sequence[Target], findings: Mapping[str, Sequence[Finding]], now: str
    ) -> None:
        """Bring every target's status in line with its findings (objects never reported on
        and still clean are left alone)."""
        for t in targets:
            found = findings.get(t.ref, ())
            if not found and t.ref not in self.written:
                continue
            status = desired_status(t, found, now)
            key = _without_time(status)
            if self.written.get(t.ref) == key:
                continue
            code, data = await self._kube.call("PATCH", t.path, {"status": status})
            if code >= 300:
                msg = data.get("message") if isinstance(data, Mapping) else data
                self.errors.append(f"PATCH {t.path}: HTTP {code} {msg}")
                log.warning("status of %s not written: HTTP %s %s", t.ref, code, msg)
                continue
            self.patches += 1
            if found:
                self.written[t.ref] = key
            else:
                self.written.pop(t.ref, None)

    async def run(
        self,
        state: Callable[[], tuple[StoreSnapshot, Mapping[str, Sequence[Finding]]]],
        wake: asyncio.Event,
        clock: Callable[[], str],
    ) -> None:
        """Sync whenever `wake` is set (cancel to stop); errors are logged and retried."""
        try:
            while True:
                await wake.wait()
                wake.clear()
                snapshot, findings = state()
                try:
                    await self.sync(
                        status_targets(snapshot, gateways=self.gateways), findings, clock()
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("status sync failed: %s", exc)
                    self.errors.append(str(exc))
        finally:
            await self._kube.close()
