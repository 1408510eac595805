"""The mesh state snapshot: every workload, service and policy, indexed for the data path.

Owns: `MeshState`, an immutable snapshot built in one go from records (a `MeshConfig`, or
upserts/removals applied to a previous snapshot), and its lookups: workload by (network, IP),
service by (network, VIP) and by ``ns/hostname``, a service's endpoints, the policies that apply
to a workload, the workloads of a node; and the config_dump form.

Invariants:
- A snapshot never changes after construction; updates return a new one. The proxy publishes a
  snapshot by swapping one reference, so a reader sees either the old or the new state, never
  half an update (ztunnel state.rs/xds.rs do the same under a lock).
- Updates are incremental: every index is a persistent map (`meshcore.pmap.PMap`) and
  `with_updates` touches only the entries of the changed records (their addresses, their
  services' endpoint lists, their node's list), sharing the rest with the previous snapshot:
  a one-workload delta costs O(changed), not a rebuild (issue 14: 24 ms -> ~0.07 ms at 10,000
  workloads). The result equals a from-scratch build of the same records in the same upsert
  order (hypothesis property in tests/unit/test_state_incremental.py).
- The address indexes are keyed by `AddressKey` ``(network, packed address)``, never by
  `ipaddress` objects: an address's text from a socket maps to its key through one memoised
  call (`address_key`), and a lookup hashes bytes, not an `IPv4Address` (whose `__hash__` is
  interpreted Python; issue 14: per connection). The memo of address texts (also behind
  `parse_address` and the plans' address texts) is bounded by the state, not by what peers send: the
  canonical texts of addresses a snapshot's lookup found (`_known`, at most max(`MEMO_FLOOR`,
  2 x that snapshot's addresses)), and at most `RECENT_MAX` other texts (`_recent`, emptied
  when full: a peer cycling through addresses the mesh does not know only empties it). The key
  distinguishes what `ipaddress` equality distinguishes: the version (4 vs 16 bytes; an
  IPv4-mapped IPv6 address is not the IPv4 address) and an IPv6 scope id.
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

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

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
from meshcore.pmap import PMap
from meshcore.proto.yamlform import check_unique

Record = Workload | Service | Authorization
AddressKey = tuple[str, bytes]
"""(network, packed address [+ b"%" + IPv6 scope id]): the key of the address indexes."""
_T = TypeVar("_T")
SPLICE_MAX = 8
"""Up to this many changed uids per list: spliced in place; more (a full sync): filter + sort."""


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


def packed_address(ip: IPAddress) -> bytes:
    """`ip`'s index form: its packed bytes (4 or 16), with ``%scope`` for a scoped IPv6 address
    (`ipaddress` tells ``fe80::1%eth0`` from ``fe80::1``, so the index must too)."""
    scope = getattr(ip, "scope_id", None)
    return ip.packed if scope is None else ip.packed + b"%" + scope.encode()


MEMO_FLOOR = 1024
"""The known-address memo is emptied when it reaches max(MEMO_FLOOR, 2 x the addresses of the
snapshot admitting a text): the addresses of removed records leave it within that bound."""
RECENT_MAX = 256
"""Entries of the memo of other texts (emptied when full): a constant, whatever peers send."""
RECENT_TEXT_MAX = 64
"""Longer texts (an IPv6 scope id is free text) are parsed each time, never stored."""
Parsed = tuple[IPAddress, bytes, str]
"""An address text's `ipaddress` object, `packed_address` and canonical text (`str()`)."""


class _KnownTexts(dict[str, Parsed]):
    """The memo of known address texts: canonical text -> `Parsed`, for texts a snapshot's
    lookup found in its address indexes (`MeshState._admit`): bounded by the control plane's
    state, not by what peers send. Shared by all snapshots: a value is a pure function of its
    text, only what is admitted depends on a snapshot. Subscripting answers every valid text
    (a miss: from `_recent`, else parsed, never stored here), so a hit costs one C-level dict
    lookup for a caller, with no Python frame: the per-connection case."""

    __slots__ = ()

    def __missing__(self, text: str) -> Parsed:
        return _other(text)


_known = _KnownTexts()
address_texts: Final[Mapping[str, Parsed]] = _known
"""Address text -> `Parsed`, memoised (bounded as above); ``address_texts[text]`` raises
ValueError for a text that is not an address."""
_recent: dict[str, Parsed] = {}
"""Every other valid text (a peer's CONNECT target, a passthrough destination, a second
spelling of a known address), at most `RECENT_MAX` of them: repeated passthrough destinations
stay cheap, and a peer cycling through addresses only empties it."""


def _parse(text: str) -> Parsed:
    ip = ip_from_text(text)
    return (ip, packed_address(ip), str(ip))


def _other(text: str) -> Parsed:
    """A text not in the known memo: from `_recent`, else parsed and kept there (emptied when
    full) unless the text is long."""
    parsed = _recent.get(text)
    if parsed is None:
        parsed = _parse(text)
        if len(text) <= RECENT_TEXT_MAX:
            if len(_recent) >= RECENT_MAX:
                _recent.clear()
            _recent[text] = parsed
    return parsed


def parse_address(text: str) -> IPAddress:
    """`text` parsed as `ip_from_text` parses it, memoised (bounded). Raises ValueError."""
    return _known[text][0]


def known_address_texts() -> int:
    """How many texts the memo of known addresses holds (bounded by the state; tests)."""
    return len(_known)


def address_key(ip: IPAddress | str, network: str = "") -> AddressKey:
    """The index key of `ip` on `network`; a text address is parsed as `ip_from_text` parses it,
    memoised (bounded; a lookup through `MeshState` moves a known text to the memo of known
    addresses). Raises ValueError for a text that is not an address."""
    return (network, _known[ip][1] if isinstance(ip, str) else packed_address(ip))


class _Edit:
    """The working set of one `with_updates`: final values per touched key, read through to
    the previous snapshot's maps (never written to). ``None`` = deleted."""

    __slots__ = ("addr_claims", "policies", "services", "vip_claims", "workloads")

    def __init__(self) -> None:
        self.workloads: dict[str, Workload | None] = {}
        self.services: dict[str, Service | None] = {}
        self.policies: dict[str, Authorization | None] = {}
        self.addr_claims: dict[AddressKey, tuple[str, ...] | None] = {}
        self.vip_claims: dict[AddressKey, tuple[str, ...] | None] = {}


def _workload_addrs(w: Workload) -> tuple[AddressKey, ...]:
    return tuple(dict.fromkeys(address_key(a, w.network) for a in w.addresses))


def _service_vips(s: Service) -> tuple[AddressKey, ...]:
    return tuple(dict.fromkeys(address_key(na.address, na.network) for na in s.addresses))


def _eps_by_uid(items: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Sorted by workload uid (stable: a workload listing a service twice keeps its order)."""
    return tuple(sorted(items, key=lambda e: e.workload.uid))


def _wls_by_uid(items: Iterable[Workload]) -> tuple[Workload, ...]:
    return tuple(sorted(items, key=lambda w: w.uid))


def _endpoint_uid(e: Endpoint) -> str:
    return e.workload.uid


def _uid(w: Workload) -> str:
    return w.uid


def _replace_by_uid(
    items: tuple[_T, ...], mine: Mapping[str, tuple[_T, ...]], key: Callable[[_T], str]
) -> tuple[_T, ...]:
    """`items` (sorted by uid, stable) with the entries of each uid in `mine` replaced by its
    value. A few uids: two binary searches and one tuple copy (a memcpy of pointers) each, no
    re-sort; many (a full sync): one filter and one sort."""
    if len(mine) > SPLICE_MAX:
        kept = [x for x in items if key(x) not in mine]
        for uid in mine:
            kept.extend(mine[uid])
        return tuple(sorted(kept, key=key))
    for uid in sorted(mine):
        lo = bisect_left(items, uid, key=key)
        hi = bisect_right(items, uid, lo=lo, key=key)
        if lo != hi or mine[uid]:
            items = (*items[:lo], *mine[uid], *items[hi:])
    return items


@dataclass(frozen=True, slots=True, kw_only=True)
class _Indexes:
    """The maps one MeshState consists of (documented on MeshState's attributes)."""

    workloads: PMap[str, Workload]
    services: PMap[str, Service]
    policies: PMap[str, Authorization]
    addr_claims: PMap[AddressKey, tuple[str, ...]]
    wl_by_addr: PMap[AddressKey, Workload]
    vip_claims: PMap[AddressKey, tuple[str, ...]]
    svc_by_vip: PMap[AddressKey, Service]
    endpoints: PMap[str, tuple[Endpoint, ...]]
    wl_by_node: PMap[str, tuple[Workload, ...]]


class MeshState:
    """An immutable, indexed snapshot of the mesh. Construct with `build` / `from_config`;
    derive the next one with `with_updates` (O(changed))."""

    __slots__ = (
        "_addr_claims",
        "_endpoints",
        "_policies",
        "_policies_memo",
        "_services",
        "_svc_by_vip",
        "_vip_claims",
        "_wl_by_addr",
        "_wl_by_node",
        "_workloads",
    )

    _workloads: PMap[str, Workload]
    _services: PMap[str, Service]
    _policies: PMap[str, Authorization]
    _wl_by_addr: PMap[AddressKey, Workload]
    _svc_by_vip: PMap[AddressKey, Service]
    _addr_claims: PMap[AddressKey, tuple[str, ...]]
    """(network, IP) -> uids of the workloads listing it, oldest first; the last one owns it."""
    _vip_claims: PMap[AddressKey, tuple[str, ...]]
    """(network, VIP) -> keys of the services listing it, oldest first; the last one owns it."""
    _endpoints: PMap[str, tuple[Endpoint, ...]]
    """Non-empty endpoint lists only, by uid."""
    _wl_by_node: PMap[str, tuple[Workload, ...]]
    """Non-empty lists only, by uid."""
    _policies_memo: dict[tuple[str, tuple[str, ...]], tuple[Authorization, ...]]
    """`policies_for` by (namespace, listed policies): computed once per snapshot, not per
    connection (it scans every policy). Bounded by the distinct pairs among the workloads."""

    def __init__(
        self,
        workloads: Mapping[str, Workload],
        services: Mapping[str, Service],
        policies: Mapping[str, Authorization],
    ) -> None:
        """Index the given records (keyed by uid / service key / policy key). Insertion order
        decides address conflicts: a later record owns the address. Prefer `build`."""
        addr_claims: dict[AddressKey, list[str]] = {}
        vip_claims: dict[AddressKey, list[str]] = {}
        by_node: dict[str, list[Workload]] = {}
        endpoints: dict[str, list[Endpoint]] = {}
        for uid, w in workloads.items():
            for key in _workload_addrs(w):
                addr_claims.setdefault(key, []).append(uid)
            by_node.setdefault(w.node, []).append(w)
            for skey, ports in w.services:
                endpoints.setdefault(skey, []).append(Endpoint(workload=w, ports=ports))
        for skey, s in services.items():
            for vip in _service_vips(s):
                vip_claims.setdefault(vip, []).append(skey)
        self._set(
            _Indexes(
                workloads=PMap(workloads.items()),
                services=PMap(services.items()),
                policies=PMap(policies.items()),
                addr_claims=PMap((k, tuple(v)) for k, v in addr_claims.items()),
                wl_by_addr=PMap((k, workloads[v[-1]]) for k, v in addr_claims.items()),
                vip_claims=PMap((k, tuple(v)) for k, v in vip_claims.items()),
                svc_by_vip=PMap((k, services[v[-1]]) for k, v in vip_claims.items()),
                endpoints=PMap((k, _eps_by_uid(v)) for k, v in endpoints.items()),
                wl_by_node=PMap((k, _wls_by_uid(v)) for k, v in by_node.items()),
            )
        )

    def _set(self, ix: _Indexes) -> None:
        set_ = object.__setattr__
        set_(self, "_workloads", ix.workloads)
        set_(self, "_services", ix.services)
        set_(self, "_policies", ix.policies)
        set_(self, "_addr_claims", ix.addr_claims)
        set_(self, "_wl_by_addr", ix.wl_by_addr)
        set_(self, "_vip_claims", ix.vip_claims)
        set_(self, "_svc_by_vip", ix.svc_by_vip)
        set_(self, "_endpoints", ix.endpoints)
        set_(self, "_wl_by_node", ix.wl_by_node)
        set_(self, "_policies_memo", {})

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
        claims an address another record holds, takes it over.

        Cost: O(changed records x (their addresses + the endpoint lists of their services and
        nodes)) plus one shard copy per touched index key (`meshcore.pmap`): the indexes of
        untouched records are shared with `self`, never rebuilt. The result equals building
        the same record set from scratch in the same upsert order (tests/unit/test_state.py)."""
        ed = _Edit()
        for name in removals:
            self._drop_workload(ed, name)
            self._drop_service(ed, name)
        for name in policy_removals:
            if name in ed.policies or name in self._policies:
                ed.policies[name] = None
        for rec in upserts:
            if isinstance(rec, Workload):
                # drop first so the upserted record is the newest claimant: it wins addresses.
                self._drop_workload(ed, rec.uid)
                ed.workloads[rec.uid] = rec
                for key in _workload_addrs(rec):
                    ed.addr_claims[key] = (
                        *self._claims(ed.addr_claims, self._addr_claims, key),
                        rec.uid,
                    )
            elif isinstance(rec, Service):
                self._drop_service(ed, rec.key)
                ed.services[rec.key] = rec
                for key in _service_vips(rec):
                    ed.vip_claims[key] = (
                        *self._claims(ed.vip_claims, self._vip_claims, key),
                        rec.key,
                    )
            else:
                ed.policies[rec.key] = rec
        if not (ed.workloads or ed.services or ed.policies):
            return self
        return self._apply(ed)

    @staticmethod
    def _claims(
        edited: Mapping[AddressKey, tuple[str, ...] | None],
        base: PMap[AddressKey, tuple[str, ...]],
        key: AddressKey,
    ) -> tuple[str, ...]:
        if key in edited:
            return edited[key] or ()
        return base.get(key, ())

    def _drop_workload(self, ed: _Edit, uid: str) -> None:
        old = ed.workloads[uid] if uid in ed.workloads else self._workloads.get(uid)
        if old is None:
            return
        ed.workloads[uid] = None
        for key in _workload_addrs(old):
            rest = tuple(
                u for u in self._claims(ed.addr_claims, self._addr_claims, key) if u != uid
            )
            ed.addr_claims[key] = rest or None

    def _drop_service(self, ed: _Edit, key: str) -> None:
        old = ed.services[key] if key in ed.services else self._services.get(key)
        if old is None:
            return
        ed.services[key] = None
        for vip in _service_vips(old):
            rest = tuple(k for k in self._claims(ed.vip_claims, self._vip_claims, vip) if k != key)
            ed.vip_claims[vip] = rest or None

    def _apply(self, ed: _Edit) -> MeshState:
        workloads = self._workloads.evolve(ed.workloads)
        services = self._services.evolve(ed.services)
        # Address owners: the newest claimant of every touched address.
        wl_by_addr: dict[AddressKey, Workload | None] = {}
        for key, claims in ed.addr_claims.items():
            wl_by_addr[key] = workloads[claims[-1]] if claims else None
        svc_by_vip: dict[AddressKey, Service | None] = {}
        for key, keys in ed.vip_claims.items():
            svc_by_vip[key] = services[keys[-1]] if keys else None
        # Endpoint and per-node lists touched by a changed workload (old or new version).
        ep_uids: dict[str, set[str]] = {}
        node_uids: dict[str, set[str]] = {}
        for uid, new_w in ed.workloads.items():
            for w in (self._workloads.get(uid), new_w):
                if w is not None:
                    node_uids.setdefault(w.node, set()).add(uid)
                    for skey, _ in w.services:
                        ep_uids.setdefault(skey, set()).add(uid)
        endpoints: dict[str, tuple[Endpoint, ...] | None] = {}
        for skey, uids in ep_uids.items():
            endpoints[skey] = (
                _replace_by_uid(
                    self._endpoints.get(skey, ()),
                    {
                        uid: ()
                        if w is None
                        else tuple(
                            Endpoint(workload=w, ports=p) for k, p in w.services if k == skey
                        )
                        for uid in uids
                        for w in (ed.workloads[uid],)
                    },
                    _endpoint_uid,
                )
                or None
            )
        by_node: dict[str, tuple[Workload, ...] | None] = {}
        for node, uids in node_uids.items():
            by_node[node] = (
                _replace_by_uid(
                    self._wl_by_node.get(node, ()),
                    {
                        uid: (w,) if w is not None and w.node == node else ()
                        for uid in uids
                        for w in (ed.workloads[uid],)
                    },
                    _uid,
                )
                or None
            )
        new = MeshState.__new__(MeshState)
        new._set(
            _Indexes(
                workloads=workloads,
                services=services,
                policies=self._policies.evolve(ed.policies),
                addr_claims=self._addr_claims.evolve(ed.addr_claims),
                wl_by_addr=self._wl_by_addr.evolve(wl_by_addr),
                vip_claims=self._vip_claims.evolve(ed.vip_claims),
                svc_by_vip=self._svc_by_vip.evolve(svc_by_vip),
                endpoints=self._endpoints.evolve(endpoints),
                wl_by_node=self._wl_by_node.evolve(by_node),
            )
        )
        return new

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

    def _key(self, ip: IPAddress | str, network: str) -> AddressKey:
        """`address_key`, admitting a text this snapshot knows to the known memo (`_admit`)."""
        if isinstance(ip, str):
            hit = _known.get(ip)
            return (network, (hit or self._admit(ip, network))[1])
        return (network, packed_address(ip))

    def _admit(self, text: str, network: str) -> Parsed:
        """A text not in the known memo (from `_recent`, else parsed): moved to the known memo
        only if it is the canonical text of an address of this snapshot (so one entry per
        known address, whatever peers send), else kept in `_recent`."""
        parsed = _other(text)
        key = (network, parsed[1])
        if parsed[2] != text or (key not in self._wl_by_addr and key not in self._svc_by_vip):
            return parsed
        if len(_known) >= max(MEMO_FLOOR, 2 * (len(self._wl_by_addr) + len(self._svc_by_vip))):
            _known.clear()
        _known[text] = parsed
        _recent.pop(text, None)
        return parsed

    def workload_by_address(self, ip: IPAddress | str, network: str = "") -> Workload | None:
        """The workload owning `ip` on `network`. Raises ValueError for a text that is not an
        address."""
        return self._wl_by_addr.get(self._key(ip, network))

    def service(self, key: str) -> Service | None:
        """The service named ``ns/hostname``."""
        return self._services.get(key)

    def service_by_vip(self, ip: IPAddress | str, network: str = "") -> Service | None:
        """The service whose VIP is `ip` on `network`. Raises ValueError for a text that is
        not an address."""
        return self._svc_by_vip.get(self._key(ip, network))

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
        memo_key = (workload.namespace, workload.authorization_policies)
        found = self._policies_memo.get(memo_key)
        if found is None:
            found = self._policies_memo[memo_key] = self._policies_of(*memo_key)
        return found

    def _policies_of(self, namespace: str, selected: tuple[str, ...]) -> tuple[Authorization, ...]:
        out: dict[str, Authorization] = {}
        for key, p in self._policies.items():
            if p.scope is Scope.GLOBAL or (p.scope is Scope.NAMESPACE and p.namespace == namespace):
                out[key] = p
        for key in selected:
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
