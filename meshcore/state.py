"""The mesh state snapshot: every workload, service and policy, indexed for the data path.

Owns: `MeshState`, an immutable snapshot built in one go from records (a `MeshConfig`, or
upserts/removals applied to a previous snapshot), and its lookups: workload by (network, IP),
service by (network, VIP) and by ``ns/hostname``, a service's endpoints, the policies that apply
to a workload, the workloads of a node; and the config_dump form.

Invariants:
- A snapshot never changes after construction; updates return a new one. The proxy publishes a
  snapshot by swapping one reference, so a reader sees either the old or the new state, never
  half an update (ztunnel state.rs/xds.rs do the same under a lock).
- Indexes are derived from the record set alone. `build` is strict (duplicate uid, service key,
  policy key or address is a ConfigError); `with_updates` is last-writer-wins for an address
  claimed by two records (the most recently upserted record owns it), because xDS deltas can
  arrive in any order (a pod IP reused before the old pod's removal arrives).
- Policy selection (`policies_for`) follows Istio: scope GLOBAL applies to every workload
  (istiod emits GLOBAL for policies in the root namespace ``istio-system``); NAMESPACE applies to
  workloads of the policy's namespace; WORKLOAD_SELECTOR policies apply to the workloads whose
  ``authorization_policies`` name them (a listed key that is not known is ignored, as its
  resource may arrive later).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from meshcore.model import (
    Authorization,
    IPAddress,
    MeshConfig,
    Port,
    Scope,
    Service,
    Workload,
    WorkloadStatus,
    ip_from_text,
)
from meshcore.proto.yamlform import check_unique

Record = Workload | Service | Authorization


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A workload backing a service, with the workload's port mappings for that service."""

    workload: Workload
    """The backing workload."""
    ports: tuple[Port, ...]
    """The workload's per-service mappings (``Workload.services[key]``); may be empty."""

    def target_port(self, service_port: Port) -> int | None:
        """Where `service_port` lands on this workload: the workload's own mapping if it has
        one, else the service's target port; None if neither is set (ztunnel drops such an
        endpoint for that port)."""
        for p in self.ports:
            if p.service_port == service_port.service_port and p.target_port:
                return p.target_port
        return service_port.target_port or None

    @property
    def healthy(self) -> bool:
        return self.workload.status is WorkloadStatus.HEALTHY


def _as_ip(ip: IPAddress | str) -> IPAddress:
    return ip if not isinstance(ip, str) else ip_from_text(ip)


class MeshState:
    """An immutable, indexed snapshot of the mesh. Construct with `build` / `from_config`."""

    __slots__ = (
        "_endpoints",
        "_policies",
        "_services",
        "_svc_by_vip",
        "_wl_by_addr",
        "_wl_by_node",
        "_workloads",
    )

    _workloads: Mapping[str, Workload]
    _services: Mapping[str, Service]
    _policies: Mapping[str, Authorization]
    _wl_by_addr: Mapping[tuple[str, IPAddress], Workload]
    _svc_by_vip: Mapping[tuple[str, IPAddress], Service]
    _endpoints: Mapping[str, tuple[Endpoint, ...]]
    _wl_by_node: Mapping[str, tuple[Workload, ...]]

    def __init__(
        self,
        workloads: Mapping[str, Workload],
        services: Mapping[str, Service],
        policies: Mapping[str, Authorization],
    ) -> None:
        """Index the given records (keyed by uid / service key / policy key). Insertion order
        decides address conflicts: a later record owns the address. Prefer `build`."""
        wl_by_addr: dict[tuple[str, IPAddress], Workload] = {}
        svc_by_vip: dict[tuple[str, IPAddress], Service] = {}
        by_node: dict[str, list[Workload]] = {}
        endpoints: dict[str, list[Endpoint]] = {key: [] for key in services}
        for w in workloads.values():
            for addr in w.addresses:
                wl_by_addr[(w.network, addr)] = w
            by_node.setdefault(w.node, []).append(w)
            for key, ports in w.services:
                endpoints.setdefault(key, []).append(Endpoint(workload=w, ports=ports))
        for s in services.values():
            for na in s.addresses:
                svc_by_vip[(na.network, na.address)] = s
        set_ = object.__setattr__
        set_(self, "_workloads", MappingProxyType(dict(workloads)))
        set_(self, "_services", MappingProxyType(dict(services)))
        set_(self, "_policies", MappingProxyType(dict(policies)))
        set_(self, "_wl_by_addr", MappingProxyType(wl_by_addr))
        set_(self, "_svc_by_vip", MappingProxyType(svc_by_vip))
        set_(
            self,
            "_endpoints",
            MappingProxyType(
                {k: tuple(sorted(v, key=lambda e: e.workload.uid)) for k, v in endpoints.items()}
            ),
        )
        set_(
            self,
            "_wl_by_node",
            MappingProxyType(
                {k: tuple(sorted(v, key=lambda w: w.uid)) for k, v in by_node.items()}
            ),
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("MeshState is immutable; use with_updates()")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("MeshState is immutable; use with_updates()")

    def __repr__(self) -> str:
        return (
            f"MeshState(workloads={len(self._workloads)}, services={len(self._services)}, "
            f"policies={len(self._policies)})"
        )

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        workloads: Iterable[Workload] = (),
        services: Iterable[Service] = (),
        policies: Iterable[Authorization] = (),
    ) -> MeshState:
        """A snapshot of exactly these records; duplicates are ConfigErrors (see check_unique)."""
        wl, sv, po = tuple(workloads), tuple(services), tuple(policies)
        check_unique(wl, sv, po)
        return cls({w.uid: w for w in wl}, {s.key: s for s in sv}, {p.key: p for p in po})

    @classmethod
    def from_config(cls, config: MeshConfig) -> MeshState:
        """A snapshot of a static mesh config."""
        return cls.build(
            workloads=config.workloads, services=config.services, policies=config.policies
        )

    @classmethod
    def empty(cls) -> MeshState:
        return cls({}, {}, {})

    def with_updates(
        self,
        upserts: Iterable[Record] = (),
        removals: Iterable[str] = (),
        *,
        policy_removals: Iterable[str] = (),
    ) -> MeshState:
        """A new snapshot with `removals` applied, then `upserts`.

        `removals` are ``istio.workload.Address`` resource names: a workload uid or a service
        ``ns/hostname``; `policy_removals` are Authorization keys ``ns/name`` (xDS removes per
        type URL, and the two name spaces may overlap). Unknown names are ignored (xDS removals
        are idempotent). An upserted record replaces the one with the same key and, if it
        claims an address another record holds, takes it over."""
        workloads = dict(self._workloads)
        services = dict(self._services)
        policies = dict(self._policies)
        for name in removals:
            workloads.pop(name, None)
            services.pop(name, None)
        for name in policy_removals:
            policies.pop(name, None)
        for rec in upserts:
            # pop first so the upserted record is last in insertion order: it wins addresses.
            if isinstance(rec, Workload):
                workloads.pop(rec.uid, None)
                workloads[rec.uid] = rec
            elif isinstance(rec, Service):
                services.pop(rec.key, None)
                services[rec.key] = rec
            else:
                policies.pop(rec.key, None)
                policies[rec.key] = rec
        return MeshState(workloads, services, policies)

    # --- lookups ------------------------------------------------------------------------------

    @property
    def workloads(self) -> tuple[Workload, ...]:
        """All workloads, by uid."""
        return tuple(self._workloads[k] for k in sorted(self._workloads))

    @property
    def services(self) -> tuple[Service, ...]:
        """All services, by key."""
        return tuple(self._services[k] for k in sorted(self._services))

    @property
    def policies(self) -> tuple[Authorization, ...]:
        """All policies, by key."""
        return tuple(self._policies[k] for k in sorted(self._policies))

    def workload(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def workload_by_address(self, ip: IPAddress | str, network: str = "") -> Workload | None:
        """The workload owning `ip` on `network`."""
        return self._wl_by_addr.get((network, _as_ip(ip)))

    def service(self, key: str) -> Service | None:
        """The service named ``ns/hostname``."""
        return self._services.get(key)

    def service_by_vip(self, ip: IPAddress | str, network: str = "") -> Service | None:
        """The service whose VIP is `ip` on `network`."""
        return self._svc_by_vip.get((network, _as_ip(ip)))

    def policy(self, key: str) -> Authorization | None:
        return self._policies.get(key)

    def endpoints(self, service_key: str) -> tuple[Endpoint, ...]:
        """Workloads listing `service_key` in their `services` (any health), by uid."""
        return self._endpoints.get(service_key, ())

    def services_for(self, workload: Workload) -> tuple[Service, ...]:
        """Known services the workload backs."""
        return tuple(s for key, _ in workload.services if (s := self._services.get(key)))

    def policies_for(self, workload: Workload) -> tuple[Authorization, ...]:
        """Policies applying to `workload` (GLOBAL, its namespace's NAMESPACE policies, and its
        listed WORKLOAD_SELECTOR policies), de-duplicated, ordered by key."""
        out: dict[str, Authorization] = {}
        for key, p in self._policies.items():
            if p.scope is Scope.GLOBAL or (
                p.scope is Scope.NAMESPACE and p.namespace == workload.namespace
            ):
                out[key] = p
        for key in workload.authorization_policies:
            listed = self._policies.get(key)
            if listed is not None:
                out[key] = listed
        return tuple(out[k] for k in sorted(out))

    def local_workloads(self, node: str) -> tuple[Workload, ...]:
        """Workloads scheduled on `node`, by uid."""
        return self._wl_by_node.get(node, ())

    def to_dump(self) -> dict[str, Any]:
        """The config_dump form: ``{workloads, services, policies}`` in the records' dict shape."""
        return {
            "workloads": [w.to_dict() for w in self.workloads],
            "services": [s.to_dict() for s in self.services],
            "policies": [p.to_dict() for p in self.policies],
        }
