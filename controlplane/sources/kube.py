"""Kubernetes source: list+watch of every kind the control plane reads (kubernetes_asyncio).

Owns: API discovery (which groups/versions the server serves), one list+watch loop per kind,
and feeding the store as source ``kubernetes/<Kind>``.

List+watch (resumption from the resourceVersion, bookmarks, 410 Gone -> re-list with the
store given the complete new set via `ConfigStore.replace_source`, so deletions missed
meanwhile are applied) is `meshcore.reflector`'s; this module owns what the objects mean.
- Kinds whose API group is not served (CRDs not installed) are skipped with a warning and
  re-discovered every `rediscover_interval`.
- Optional kinds (`UNIMPLEMENTED`: the kinds the mesh does not implement, ServiceEntry,
  Telemetry, Istio's Gateway...; and, implemented but with optional CRDs, the Gateway API route
  kinds GRPCRoute, TCPRoute and TLSRoute and Linkerd's HTTPLocalRateLimitPolicy) are watched
  only when their resource is served (the group/version's APIResourceList,
  ``GET /apis/<group>/<version>``, first served version of the kind wins), and stored as
  `controlplane.objects.parse_unimplemented` records (StoredObjects under their kind: the route
  and rate-limit kinds are served to waypoints like manifests' ones; the others are reported,
  AMB0204 on /debug/warnings and in their status); no CRD: nothing watched, nothing said,
  looked for again every `rediscover_interval`. They never hold the first sync.

Invariants: a malformed object is reported (warning naming object and field) and its update
skipped; it never stops the watch. Objects are read as plain JSON (no generated models).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from controlplane.errors import SourceError
from controlplane.objects import KubeObject, ObjectKey, parse_object, parse_unimplemented
from controlplane.store import ConfigStore
from meshcore.backoff import Backoff, Retry
from meshcore.errors import ConfigError
from meshcore.kubeapi import KubeApi
from meshcore.reflector import WATCH_BACKOFF, Collection, Reflector, ReflectorCounters

log = logging.getLogger(__name__)

DISCOVERY_BACKOFF = Backoff(initial=0.5, cap=10.0, jitter=0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class KindSpec:
    kind: str
    group: str
    """"" for the core group."""
    version: str
    plural: str
    namespaced: bool = True
    unimplemented: str = ""
    """A `controlplane.objects.UNIMPLEMENTED_KINDS` name: optional, stored only to be reported."""
    alt_versions: tuple[str, ...] = ()
    """Other versions to look for (unimplemented kinds), in order of preference."""

    @property
    def key(self) -> str:
        """Unique among `KINDS` + `UNIMPLEMENTED` (Istio's and Gateway API's Gateway differ)."""
        return self.unimplemented or self.kind

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/{self.plural}"


KINDS = (
    KindSpec(kind="Namespace", group="", version="v1", plural="namespaces", namespaced=False),
    KindSpec(kind="Node", group="", version="v1", plural="nodes", namespaced=False),
    KindSpec(kind="Pod", group="", version="v1", plural="pods"),
    KindSpec(kind="Service", group="", version="v1", plural="services"),
    KindSpec(kind="ServiceAccount", group="", version="v1", plural="serviceaccounts"),
    KindSpec(kind="EndpointSlice", group="discovery.k8s.io", version="v1", plural="endpointslices"),
    KindSpec(
        kind="AuthorizationPolicy",
        group="security.istio.io",
        version="v1",
        plural="authorizationpolicies",
    ),
    KindSpec(
        kind="PeerAuthentication",
        group="security.istio.io",
        version="v1",
        plural="peerauthentications",
    ),
    KindSpec(
        kind="RequestAuthentication",
        group="security.istio.io",
        version="v1",
        plural="requestauthentications",
    ),
    KindSpec(
        kind="VirtualService", group="networking.istio.io", version="v1", plural="virtualservices"
    ),
    KindSpec(
        kind="DestinationRule",
        group="networking.istio.io",
        version="v1",
        plural="destinationrules",
    ),
    KindSpec(kind="Gateway", group="gateway.networking.k8s.io", version="v1", plural="gateways"),
    KindSpec(
        kind="HTTPRoute", group="gateway.networking.k8s.io", version="v1", plural="httproutes"
    ),
)


def _unimplemented(
    kind: str, group: str, plural: str, versions: tuple[str, ...], name: str = ""
) -> KindSpec:
    return KindSpec(
        kind=kind,
        group=group,
        version=versions[0],
        plural=plural,
        unimplemented=name or kind,
        alt_versions=versions[1:],
    )


_ISTIO_NET = ("v1", "v1beta1", "v1alpha3")
UNIMPLEMENTED = (
    _unimplemented("ServiceEntry", "networking.istio.io", "serviceentries", _ISTIO_NET),
    _unimplemented("WorkloadEntry", "networking.istio.io", "workloadentries", _ISTIO_NET),
    _unimplemented("Sidecar", "networking.istio.io", "sidecars", _ISTIO_NET),
    _unimplemented("EnvoyFilter", "networking.istio.io", "envoyfilters", ("v1alpha3",)),
    _unimplemented(
        "Gateway", "networking.istio.io", "gateways", _ISTIO_NET, "Gateway.networking.istio.io"
    ),
    _unimplemented("Telemetry", "telemetry.istio.io", "telemetries", ("v1", "v1alpha1")),
    _unimplemented("WasmPlugin", "extensions.istio.io", "wasmplugins", ("v1alpha1",)),
    _unimplemented("GRPCRoute", "gateway.networking.k8s.io", "grpcroutes", ("v1", "v1alpha2")),
    _unimplemented("TCPRoute", "gateway.networking.k8s.io", "tcproutes", ("v1alpha2",)),
    _unimplemented("TLSRoute", "gateway.networking.k8s.io", "tlsroutes", ("v1alpha3", "v1alpha2")),
    # Local rate limits (the chart's CRD, or Linkerd's own): served to waypoints.
    _unimplemented(
        "HTTPLocalRateLimitPolicy", "policy.linkerd.io", "httplocalratelimitpolicies", ("v1alpha1",)
    ),
)


class KubernetesSource(ReflectorCounters):
    """List+watch every kind of `KINDS` into `store`."""

    def __init__(
        self,
        store: ConfigStore,
        *,
        kube: KubeApi | None = None,
        watch_timeout: int = 300,
        rediscover_interval: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        """`kube`: the API client (default: in-cluster service account)."""
        self.store = store
        self.watch_timeout = watch_timeout
        self.rediscover_interval = rediscover_interval
        self.rng = rng or random.Random()
        self.synced = asyncio.Event()
        self._kube = kube or KubeApi()
        self._reflectors: dict[str, Reflector] = {}
        self._listed: set[str] = set()
        self._served: set[str] = set()

    async def _get(self, path: str, query: list[tuple[str, Any]], timeout: float | None) -> Any:
        return await self._kube.open("GET", path, query=query, timeout=timeout)

    async def discover(self) -> set[str]:
        """group/versions the API server serves (``/api`` + ``/apis``)."""
        served: set[str] = set()
        core = await self._get_json("/api")
        served.update(core.get("versions", []))
        groups = await self._get_json("/apis")
        for g in groups.get("groups", []):
            for v in g.get("versions", []):
                served.add(v.get("groupVersion", ""))
        return served

    async def _get_json(self, path: str) -> Mapping[str, Any]:
        resp = await self._get(path, [], 30)
        try:
            if resp.status != 200:
                raise SourceError(f"GET {path}: HTTP {resp.status}")
            data = await resp.json(content_type=None)
        finally:
            resp.release()
        if not isinstance(data, Mapping):
            raise SourceError(f"GET {path}: not a JSON object")
        return data

    async def run(self) -> None:
        """Discover, then list+watch every served kind forever (cancel to stop)."""
        retry = Retry(DISCOVERY_BACKOFF, rng=self.rng)
        while True:
            try:
                self._served = await self.discover()
                break
            except Exception as exc:
                delay = retry.next_delay()
                log.warning("Kubernetes discovery failed (%s); retry in %.1fs", exc, delay)
                await retry.wait(delay)
        tasks = [asyncio.create_task(self._kind_loop(spec)) for spec in KINDS + UNIMPLEMENTED]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await self._kube.close()

    def _mark_listed(self, kind: str) -> None:
        self._listed.add(kind)
        if self._listed >= {k.key for k in KINDS + UNIMPLEMENTED}:
            self.synced.set()

    async def _resources(self, group_version: str) -> set[str]:
        """Resource names the API serves in `group_version` (APIResourceList)."""
        data = await self._get_json(f"/apis/{group_version}")
        return {
            str(r.get("name", "")) for r in data.get("resources") or () if isinstance(r, Mapping)
        }

    async def _resolve(self, spec: KindSpec) -> KindSpec | None:
        """`spec` at the first of its versions whose resource is served, else None."""
        for version in (spec.version, *spec.alt_versions):
            found = replace(spec, version=version, alt_versions=())
            if found.group_version not in self._served:
                continue
            try:
                if spec.plural in await self._resources(found.group_version):
                    return found
            except Exception as exc:
                log.debug("discovery of %s failed: %s", found.group_version, exc)
        return None

    async def _kind_loop(self, spec: KindSpec) -> None:
        source = f"kubernetes/{spec.key}"
        if spec.unimplemented:
            while (resolved := await self._resolve(spec)) is None:
                self._mark_listed(spec.key)  # no CRD: nothing to watch, nothing to say
                await asyncio.sleep(self.rediscover_interval)
                with contextlib.suppress(Exception):
                    self._served = await self.discover()
            spec = resolved
            # Only reported, never translated: the first sync does not wait for them (a list
            # refused by an older ClusterRole is retried and logged, it does not hold xDS).
            self._mark_listed(spec.key)
        while spec.group_version not in self._served:
            self.store.add_source_warning(
                source, spec.kind, f"API {spec.group_version} is not served; {spec.kind} skipped"
            )
            self._mark_listed(spec.key)
            await asyncio.sleep(self.rediscover_interval)
            try:
                self._served = await self.discover()
            except Exception as exc:
                log.debug("re-discovery failed: %s", exc)
        self.store.clear_source_warning(source, spec.kind)
        reflector = Reflector(
            self._kube,
            Collection(path=spec.path, name=spec.key, watch_timeout=self.watch_timeout),
            replace=lambda items: self._replace(spec, source, items),
            event=lambda etype, obj: self._event(spec, source, etype, obj),
            retry=Retry(WATCH_BACKOFF, rng=self.rng),
        )
        self._reflectors[spec.key] = reflector
        await reflector.run()

    def _replace(self, spec: KindSpec, source: str, items: list[Mapping[str, Any]]) -> None:
        objects = []
        warnings: dict[str, str] = {}
        for raw in items:
            item = {"kind": spec.kind, "apiVersion": spec.group_version, **raw}
            try:
                objects.append(_parse(spec, item))
            except ConfigError as exc:
                warnings[_ref(spec, item)] = f"skipped: {exc}"
        self.store.set_source_warnings(source, warnings)
        self.store.replace_source(source, objects)
        self._mark_listed(spec.key)

    def _event(self, spec: KindSpec, source: str, etype: str, obj: Mapping[str, Any]) -> None:
        item = {"kind": spec.kind, "apiVersion": spec.group_version, **obj}
        ref = _ref(spec, item)
        if etype == "DELETED":
            meta = obj.get("metadata") or {}
            namespace = str(meta.get("namespace", "")) if spec.namespaced else ""
            key = ObjectKey(kind=spec.key, namespace=namespace, name=str(meta.get("name", "")))
            self.store.apply(source, (), [key])
            self.store.clear_source_warning(source, ref)
            return
        try:
            parsed = _parse(spec, item)
        except ConfigError as exc:
            self.store.add_source_warning(source, ref, f"update skipped: {exc}")
            return
        self.store.clear_source_warning(source, ref)
        self.store.apply(source, [parsed])


def _parse(spec: KindSpec, item: Mapping[str, Any]) -> KubeObject:
    if spec.unimplemented:
        return parse_unimplemented(item, spec.unimplemented)
    return parse_object(item)


def _ref(spec: KindSpec, item: Any) -> str:
    meta = item.get("metadata") if isinstance(item, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    ns, name = meta.get("namespace", ""), meta.get("name", "?")
    return f"{spec.kind} {ns}/{name}" if ns else f"{spec.kind} {name}"
