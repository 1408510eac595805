"""The control plane's config store: every object from every source, one immutable snapshot.

Owns: `StoreSnapshot` (objects grouped by namespace), `ConfigStore` (applies source updates,
publishes snapshots, notifies subscribers) and the per-object source warnings.

Invariants:
- A snapshot never changes. An update builds a new snapshot that shares every untouched
  `NamespaceObjects` with the previous one (same object), so consumers detect "this namespace
  did not change" with an identity check; the translator relies on it.
- Each object is owned by the source that last wrote it. `replace_source` (a full list: a file
  re-read, a Kubernetes re-list) deletes exactly the objects that source owned and no longer
  lists; another source's objects are never touched.
- Subscribers are called synchronously after the new snapshot is published, never with a
  half-applied update; they must be cheap (set an event, schedule work).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from controlplane.objects import (
    AuthorizationPolicy,
    EndpointSlice,
    KubeObject,
    KubeService,
    Namespace,
    ObjectKey,
    PeerAuthentication,
    Pod,
    ServiceAccount,
    StoredObject,
    object_key,
)

log = logging.getLogger(__name__)

_EMPTY: Mapping[Any, Any] = MappingProxyType({})


def _empty() -> Mapping[Any, Any]:
    return _EMPTY


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespaceObjects:
    """Every object of one namespace (plus the Namespace object itself, if known)."""

    name: str
    namespace: Namespace | None = None
    pods: Mapping[str, Pod] = field(default_factory=_empty)
    services: Mapping[str, KubeService] = field(default_factory=_empty)
    slices: Mapping[str, EndpointSlice] = field(default_factory=_empty)
    service_accounts: Mapping[str, ServiceAccount] = field(default_factory=_empty)
    authorization_policies: Mapping[str, AuthorizationPolicy] = field(default_factory=_empty)
    peer_authentications: Mapping[str, PeerAuthentication] = field(default_factory=_empty)
    stored: Mapping[str, StoredObject] = field(default_factory=_empty)
    """Stored-only kinds, keyed ``Kind/name``."""

    def is_empty(self) -> bool:
        return self.namespace is None and not any(
            (
                self.pods,
                self.services,
                self.slices,
                self.service_accounts,
                self.authorization_policies,
                self.peer_authentications,
                self.stored,
            )
        )

    def count(self) -> int:
        return (
            (self.namespace is not None)
            + len(self.pods)
            + len(self.services)
            + len(self.slices)
            + len(self.service_accounts)
            + len(self.authorization_policies)
            + len(self.peer_authentications)
            + len(self.stored)
        )


_FIELD_BY_TYPE: dict[type, str] = {
    Pod: "pods",
    KubeService: "services",
    EndpointSlice: "slices",
    ServiceAccount: "service_accounts",
    AuthorizationPolicy: "authorization_policies",
    PeerAuthentication: "peer_authentications",
    StoredObject: "stored",
}
_FIELD_BY_KIND = {
    "Pod": "pods",
    "Service": "services",
    "EndpointSlice": "slices",
    "ServiceAccount": "service_accounts",
    "AuthorizationPolicy": "authorization_policies",
    "PeerAuthentication": "peer_authentications",
}


def _slot(key: ObjectKey) -> tuple[str, str, str]:
    """(namespace, NamespaceObjects field, name within that field) of an object key."""
    if key.kind == "Namespace":
        return key.name, "namespace", key.name
    fld = _FIELD_BY_KIND.get(key.kind)
    if fld is None:
        return key.namespace, "stored", f"{key.kind}/{key.name}"
    return key.namespace, fld, key.name


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSnapshot:
    """All objects, grouped by namespace. `version` increases with every applied update."""

    version: int = 0
    namespaces: Mapping[str, NamespaceObjects] = field(default_factory=_empty)

    def get(self, key: ObjectKey) -> KubeObject | None:
        ns, fld, name = _slot(key)
        objs = self.namespaces.get(ns)
        if objs is None:
            return None
        if fld == "namespace":
            return objs.namespace
        found: KubeObject | None = getattr(objs, fld).get(name)
        return found

    def count(self) -> int:
        return sum(n.count() for n in self.namespaces.values())


class ConfigStore:
    """Holds the current `StoreSnapshot`; sources call `apply` / `replace_source`."""

    def __init__(self) -> None:
        self._snapshot = StoreSnapshot()
        self._owner: dict[ObjectKey, str] = {}
        self._subscribers: list[Callable[[StoreSnapshot], None]] = []
        self._warnings: dict[str, dict[str, str]] = {}  # source -> object ref -> message

    @property
    def snapshot(self) -> StoreSnapshot:
        return self._snapshot

    def subscribe(self, callback: Callable[[StoreSnapshot], None]) -> None:
        self._subscribers.append(callback)

    # ---- warnings of sources (parse errors), per object reference

    def set_source_warnings(self, source: str, warnings: Mapping[str, str]) -> None:
        """Replace `source`'s parse warnings (object reference -> message)."""
        self._warnings[source] = dict(warnings)

    def add_source_warning(self, source: str, ref: str, message: str) -> None:
        self._warnings.setdefault(source, {})[ref] = message

    def clear_source_warning(self, source: str, ref: str) -> None:
        self._warnings.get(source, {}).pop(ref, None)

    def source_warnings(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for source in sorted(self._warnings):
            for ref, msg in self._warnings[source].items():
                out[ref] = f"[{source}] {msg}"
        return out

    # ---- updates

    def owned_by(self, source: str) -> set[ObjectKey]:
        return {k for k, s in self._owner.items() if s == source}

    def replace_source(self, source: str, objects: Iterable[KubeObject]) -> StoreSnapshot:
        """Make `objects` the complete set owned by `source` (full list / re-list)."""
        objs = list(objects)
        keep = {object_key(o) for o in objs}
        gone = [k for k in self.owned_by(source) if k not in keep]
        return self.apply(source, objs, gone)

    def apply(
        self, source: str, upserts: Iterable[KubeObject], deletes: Iterable[ObjectKey] = ()
    ) -> StoreSnapshot:
        """Upsert and delete objects for `source`; publish one new snapshot if anything
        changed. Deleting a key another source owns is ignored."""
        edits: dict[str, dict[str, dict[str, KubeObject | None]]] = {}
        changed = False
        for key in deletes:
            if self._owner.get(key) != source:
                continue
            del self._owner[key]
            ns, fld, name = _slot(key)
            edits.setdefault(ns, {}).setdefault(fld, {})[name] = None
            changed = True
        for obj in upserts:
            key = object_key(obj)
            if self._snapshot.get(key) == obj and self._owner.get(key) == source:
                continue
            self._owner[key] = source
            ns, fld, name = _slot(key)
            edits.setdefault(ns, {}).setdefault(fld, {})[name] = obj
            changed = True
        if not changed:
            return self._snapshot
        namespaces = dict(self._snapshot.namespaces)
        for ns, by_field in edits.items():
            cur = namespaces.get(ns) or NamespaceObjects(name=ns)
            updates: dict[str, Any] = {}
            for fld, items in by_field.items():
                if fld == "namespace":
                    updates["namespace"] = items[ns]
                    continue
                m = dict(getattr(cur, fld))
                for name, item in items.items():
                    if item is None:
                        m.pop(name, None)
                    else:
                        m[name] = item
                updates[fld] = MappingProxyType(m)
            new = replace(cur, **updates)
            if new.is_empty():
                namespaces.pop(ns, None)
            else:
                namespaces[ns] = new
        self._snapshot = StoreSnapshot(
            version=self._snapshot.version + 1, namespaces=MappingProxyType(namespaces)
        )
        for cb in list(self._subscribers):
            try:
                cb(self._snapshot)
            except Exception:
                log.exception("store subscriber failed")
        return self._snapshot


def field_for(obj: KubeObject) -> str:
    """The NamespaceObjects field an object lives in (for tests and debug output)."""
    if isinstance(obj, Namespace):
        return "namespace"
    return _FIELD_BY_TYPE[type(obj)]
