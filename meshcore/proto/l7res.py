"""The waypoint's L7 resource type over delta xDS (``type.googleapis.com/ambient.l7.Resource``).

Owns: the type URL, `L7Resource` (kind, namespace, name, the object as JSON), its xDS resource
name, and `Any` packing/unpacking (the control plane packs, the waypoint unpacks).

Invariants:
- Resource name = ``<kind>/<namespace>/<name>`` (WorkloadLabels: ``WorkloadLabels/<namespace>/
  pods``), unique per object.
- `unpack_l7` checks the Any type, the JSON, and that the JSON's kind equals the message's kind;
  every problem is a `ConfigError` whose path starts with the resource name (per-resource NACK).
- The JSON is parsed by the waypoint with `meshcore.config.objects.parse_objects`, exactly as a
  static ``--config`` file, so both channels accept the same objects.
- Kind ``MeshSettings`` (name ``MeshSettings//mesh``) carries the mesh-wide request-hygiene
  settings (`MeshSettings`: Istio meshConfig ``pathNormalization``, Envoy's escaped-slashes
  action) in the message's ``mesh`` field instead of JSON; `unpack_l7` refuses names that are
  not setting names (`meshcore.config.pathnorm.PathPolicy.parse`), so a bad value is NACKed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

import meshcore.proto.l7_pb2 as l7_pb2
from meshcore.config.pathnorm import PathPolicy
from meshcore.errors import ConfigError

L7_TYPE = "type.googleapis.com/ambient.l7.Resource"
L7_KINDS = (
    "VirtualService",
    "DestinationRule",
    "HTTPRoute",
    "AuthorizationPolicy",
    "RequestAuthentication",
    "WorkloadLabels",
    "MeshSettings",
    "HTTPLocalRateLimitPolicy",
    "GRPCRoute",
    "TCPRoute",
    "TLSRoute",
)
MESH_SETTINGS = "MeshSettings"


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshSettings:
    """Mesh-wide waypoint settings; "" = the default (see ``l7.proto``)."""

    path_normalization: str = ""
    escaped_slashes_action: str = ""

    def resource(self) -> L7Resource:
        return L7Resource(kind=MESH_SETTINGS, namespace="", name="mesh", json="", mesh=self)


@dataclass(frozen=True, slots=True, kw_only=True)
class L7Resource:
    kind: str
    namespace: str
    name: str
    json: str
    """The object as written (canonical JSON); "" for MeshSettings."""
    mesh: MeshSettings | None = None
    """MeshSettings only."""

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"

    def document(self) -> dict[str, Any]:
        """The object as a dict, with its namespace filled in (objects in files may omit it)."""
        doc = json.loads(self.json)
        if not isinstance(doc, dict):
            raise ConfigError(self.key, "JSON is not an object")
        if self.kind != "WorkloadLabels":
            meta = doc.setdefault("metadata", {})
            if isinstance(meta, dict):
                meta.setdefault("namespace", self.namespace)
        return doc


def pack_l7(res: L7Resource) -> any_pb2.Any:
    msg = l7_pb2.Resource(kind=res.kind, namespace=res.namespace, name=res.name, json=res.json)
    if res.mesh is not None:
        msg.mesh.path_normalization = res.mesh.path_normalization
        msg.mesh.escaped_slashes_action = res.mesh.escaped_slashes_action
    out = any_pb2.Any()
    out.Pack(msg, type_url_prefix="type.googleapis.com/")
    return out


def unpack_l7(name: str, resource: any_pb2.Any) -> L7Resource:
    if resource.type_url != L7_TYPE:
        raise ConfigError(name, f"resource type {resource.type_url!r} is not {L7_TYPE}")
    msg = l7_pb2.Resource()
    try:
        msg.ParseFromString(resource.value)
    except DecodeError as exc:
        raise ConfigError(name, f"undecodable ambient.l7.Resource: {exc}") from None
    res = L7Resource(kind=msg.kind, namespace=msg.namespace, name=msg.name, json=msg.json)
    if res.kind not in L7_KINDS:
        raise ConfigError(f"{name}: kind", f"{res.kind!r} is not one of {', '.join(L7_KINDS)}")
    if res.kind == MESH_SETTINGS:
        mesh = MeshSettings(
            path_normalization=msg.mesh.path_normalization,
            escaped_slashes_action=msg.mesh.escaped_slashes_action,
        )
        try:
            PathPolicy.parse(mesh.path_normalization, mesh.escaped_slashes_action)
        except ValueError as exc:
            raise ConfigError(f"{name}: mesh", str(exc)) from None
        return L7Resource(kind=res.kind, namespace=res.namespace, name=res.name, json="", mesh=mesh)
    try:
        doc = res.document()
    except ValueError as exc:
        raise ConfigError(f"{name}: json", f"invalid JSON: {exc}") from None
    if doc.get("kind") != res.kind:
        raise ConfigError(f"{name}: json", f"kind {doc.get('kind')!r} != {res.kind!r}")
    return res
