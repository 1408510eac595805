"""Incremental translation: the `Translator` memoises each namespace's `translate_namespace`
result and reports what changed since the previous snapshot (a `Delta`).

Invariant: a namespace is re-translated only when its objects (the same `NamespaceObjects`
instance means unchanged) or the mesh-wide inputs changed, and only its policies when nothing
else of it changed and they select the same pods (`retranslate_policies`: a policy edit then
translates no pod; figures in bench/README.md); the delta is exactly the records added, changed
or removed since the last `update`. The `Translator` only caches: its result equals
`controlplane.translate.translate_namespace` from scratch (`retranslate_policies` included: it
returns that result or None).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from controlplane.store import NamespaceObjects, StoreSnapshot
from controlplane.translate import (
    ConfigWarning,
    MeshWide,
    NamespaceResult,
    Record,
    TranslateOptions,
    mesh_wide,
    namespace_authorizations,
    peer_authn_policy_name,
    translate_namespace,
)
from meshcore.identity import SpiffeId

_POLICY_INDEPENDENT = (
    "name",
    "namespace",
    "pods",
    "services",
    "slices",
    "service_accounts",
    "peer_authentications",
    "stored",
)
"""The `NamespaceObjects` fields other than ``authorization_policies`` (``stored`` carries
RequestAuthentications, read by `namespace_policies` too: unchanged, they translate the same)."""


def retranslate_policies(
    old_objs: NamespaceObjects,
    old: NamespaceResult,
    objs: NamespaceObjects,
    mesh: MeshWide,
    opts: TranslateOptions,
) -> NamespaceResult | None:
    """`translate_namespace(objs, mesh, opts)` without translating a pod again, when `objs`
    differs from `old_objs` (translated to `old` against this same `mesh`) only in its
    AuthorizationPolicies and those select the same pods under the same keys (a policy's rules
    edited, the common change); None when that does not hold (translate the namespace).

    Why the workloads and services stay: they read the policies only through the
    (selector, key) pairs (`_pod_authorizations`). A pod's port-level PeerAuthentication DENY
    policies (added to the policies while its pod is translated; their keys derived from the
    unchanged PeerAuthentications by `peer_authn_policy_name`) are kept from `old`: the only
    records of `old` not from `namespace_authorizations`. Reserved names keep an
    AuthorizationPolicy's key from ever being one of them; should one be anyway (old or new),
    it declines (the record under that key would depend on translation order).
    """
    if any(getattr(objs, f) is not getattr(old_objs, f) for f in _POLICY_INDEPENDENT):
        return None
    old_notes: list[ConfigWarning] = []
    old_policies, old_selectors = namespace_authorizations(old_objs, mesh, opts, old_notes)
    notes: list[ConfigWarning] = []
    policies, selectors = namespace_authorizations(objs, mesh, opts, notes)
    if selectors != old_selectors:
        return None
    pa_keys = {
        f"{objs.name}/{peer_authn_policy_name(pa)}"
        for pa in objs.peer_authentications.values()
        if pa.selector is not None and pa.port_modes
    }
    if any(k in pa_keys for k in (*old_policies, *policies)):
        return None
    from_pods = {k: v for k, v in old.policies.items() if k in pa_keys}
    # The policies' warnings replaced; every other warning is about an unchanged object.
    warnings = (Counter(old.warnings) - Counter(old_notes)) + Counter(notes)
    return NamespaceResult(
        workloads=old.workloads,
        services=old.services,
        policies=MappingProxyType({**policies, **from_pods}),
        warnings=tuple(sorted(warnings.elements())),
        node_identities=old.node_identities,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Delta:
    """What changed between two translations."""

    upserts: tuple[Record, ...] = ()
    removed_addresses: tuple[str, ...] = ()
    """Workload uids and service keys no longer present."""
    removed_policies: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removed_addresses or self.removed_policies)


def _diff(old: Mapping[str, Record], new: Mapping[str, Record]) -> tuple[list[Record], list[str]]:
    ups = [r for k, r in new.items() if old.get(k) != r]
    gone = [k for k in old if k not in new]
    return ups, gone


class Translator:
    """Translates snapshots, re-translating only namespaces whose objects (or the mesh-wide
    inputs) changed, and reports the delta since the previous call."""

    def __init__(self, opts: TranslateOptions) -> None:
        self.opts = opts
        self._mesh = MeshWide()
        self._inputs: dict[str, NamespaceObjects] = {}
        self._results: dict[str, NamespaceResult] = {}

    @property
    def results(self) -> Mapping[str, NamespaceResult]:
        return self._results

    def update(self, snapshot: StoreSnapshot) -> Delta:
        mesh = mesh_wide(snapshot, self.opts)
        mesh_changed = mesh != self._mesh
        self._mesh = mesh
        ups: list[Record] = []
        gone_addr: list[str] = []
        gone_pol: list[str] = []
        names = set(snapshot.namespaces) | set(self._results)
        if self.opts.root_namespace not in snapshot.namespaces:
            names.add(self.opts.root_namespace)  # the static STRICT policy always exists
        for ns in sorted(names):
            objs = snapshot.namespaces.get(ns) or (
                NamespaceObjects(name=ns) if ns == self.opts.root_namespace else None
            )
            old = self._results.get(ns, NamespaceResult())
            if objs is None:
                new = NamespaceResult()
                self._inputs.pop(ns, None)
                self._results.pop(ns, None)
            elif self._inputs.get(ns) is objs and not mesh_changed and ns in self._results:
                continue
            else:
                before = self._inputs.get(ns)
                short = (
                    retranslate_policies(before, old, objs, mesh, self.opts)
                    if before is not None and not mesh_changed and ns in self._results
                    else None
                )
                new = translate_namespace(objs, mesh, self.opts) if short is None else short
                self._inputs[ns] = objs
                self._results[ns] = new
            for old_map, new_map in (
                (old.workloads, new.workloads),
                (old.services, new.services),
            ):
                u, g = _diff(old_map, new_map)
                ups.extend(u)
                gone_addr.extend(g)
            u, g = _diff(old.policies, new.policies)
            ups.extend(u)
            gone_pol.extend(g)
        return Delta(
            upserts=tuple(ups), removed_addresses=tuple(gone_addr), removed_policies=tuple(gone_pol)
        )

    def records(self) -> list[Record]:
        out: list[Record] = []
        for r in self._results.values():
            out.extend(r.workloads.values())
            out.extend(r.services.values())
            out.extend(r.policies.values())
        return out

    def warnings(self) -> list[ConfigWarning]:
        return [w for r in self._results.values() for w in r.warnings]

    def may_impersonate(self, node: str, identity: SpiffeId) -> bool:
        """True if a pod of `identity`'s service account runs on `node` (CA check)."""
        if identity.trust_domain != self.opts.trust_domain:
            return False
        r = self._results.get(identity.namespace)
        return r is not None and (node, identity.service_account) in r.node_identities
