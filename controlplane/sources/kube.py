"""Kubernetes source: list+watch of every kind the control plane reads (kubernetes_asyncio).

Owns: API discovery (which groups/versions the server serves), one list+watch loop per kind,
and feeding the store as source ``kubernetes/<Kind>``.

Protocol (Kubernetes API concepts, "Efficient detection of changes"):
- List (``GET <collection>``) gives the items and a collection ``resourceVersion``; the watch
  (``?watch=1&resourceVersion=<rv>&allowWatchBookmarks=true&timeoutSeconds=N``) streams
  ADDED/MODIFIED/DELETED events after it. Every event's object carries the new resourceVersion;
  BOOKMARK events only advance it. A watch that ends (timeout, connection closed) is restarted
  from the last resourceVersion seen, without a list.
- ``410 Gone`` (HTTP status, or an ERROR event with a Status of code 410: the version was
  compacted) means events were lost: the kind is re-listed and the store is given the complete
  new set (`ConfigStore.replace_source`), so deletions missed meanwhile are applied.
- Kinds whose API group is not served (CRDs not installed) are skipped with a warning and
  re-discovered every `rediscover_interval`.

Invariants: a malformed object is reported (warning naming object and field) and its update
skipped; it never stops the watch. Objects are read as plain JSON (no generated models).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from controlplane.errors import SourceError
from controlplane.objects import ObjectKey, parse_object
from controlplane.store import ConfigStore
from meshcore.errors import ConfigError
from meshcore.kubeapi import KubeApi, json_lines

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class KindSpec:
    kind: str
    group: str
    """"" for the core group."""
    version: str
    plural: str
    namespaced: bool = True

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/{self.plural}"


KINDS = (
    KindSpec(kind="Namespace", group="", version="v1", plural="namespaces", namespaced=False),
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


class Gone(SourceError):
    """410 Gone: the resourceVersion is too old; re-list."""


class KubernetesSource:
    """List+watch every kind of `KINDS` into `store`."""

    def __init__(
        self,
        store: ConfigStore,
        *,
        kubeconfig: Path | None = None,
        configuration: client.Configuration | None = None,
        watch_timeout: int = 300,
        rediscover_interval: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.kubeconfig = kubeconfig
        self.configuration = configuration
        self.watch_timeout = watch_timeout
        self.rediscover_interval = rediscover_interval
        self.rng = rng or random.Random()
        self.synced = asyncio.Event()
        self._kube = KubeApi(kubeconfig=kubeconfig, configuration=configuration)
        self.resource_versions: dict[str, str] = {}
        self.lists: dict[str, int] = {}
        """Number of full lists per kind (1 + re-lists after 410 Gone)."""
        self.watches: dict[str, int] = {}
        """Number of watch requests per kind (restarts included)."""
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
        attempt = 0
        while True:
            try:
                self._served = await self.discover()
                break
            except Exception as exc:
                delay = min(10.0, 0.5 * 2**attempt)
                attempt += 1
                log.warning("Kubernetes discovery failed (%s); retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        tasks = [asyncio.create_task(self._kind_loop(spec)) for spec in KINDS]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await self._kube.close()

    def _mark_listed(self, kind: str) -> None:
        self._listed.add(kind)
        if self._listed >= {k.kind for k in KINDS}:
            self.synced.set()

    async def _kind_loop(self, spec: KindSpec) -> None:
        source = f"kubernetes/{spec.kind}"
        while spec.group_version not in self._served:
            self.store.add_source_warning(
                source, spec.kind, f"API {spec.group_version} is not served; {spec.kind} skipped"
            )
            self._mark_listed(spec.kind)
            await asyncio.sleep(self.rediscover_interval)
            try:
                self._served = await self.discover()
            except Exception as exc:
                log.debug("re-discovery failed: %s", exc)
        self.store.clear_source_warning(source, spec.kind)
        rv: str | None = None
        attempt = 0
        while True:
            try:
                if rv is None:
                    rv = await self._list(spec, source)
                    self._mark_listed(spec.kind)
                rv = await self._watch(spec, source, rv)
                attempt = 0
            except Gone:
                log.info("%s: resourceVersion %s is gone (410); re-listing", spec.kind, rv)
                rv = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = min(10.0, 0.2 * 2**attempt) * (1 + self.rng.uniform(-0.2, 0.2))
                attempt += 1
                log.warning("%s watch failed (%s); retry in %.1fs", spec.kind, exc, delay)
                await asyncio.sleep(delay)

    async def _list(self, spec: KindSpec, source: str) -> str:
        data = await self._get_json(spec.path)
        objects = []
        warnings: dict[str, str] = {}
        for item in data.get("items", []) or []:
            if isinstance(item, dict):
                item = {"kind": spec.kind, "apiVersion": spec.group_version, **item}
            try:
                objects.append(parse_object(item))
            except ConfigError as exc:
                warnings[_ref(spec, item)] = f"skipped: {exc}"
        self.store.set_source_warnings(source, warnings)
        self.store.replace_source(source, objects)
        self.lists[spec.kind] = self.lists.get(spec.kind, 0) + 1
        rv = str((data.get("metadata") or {}).get("resourceVersion", ""))
        self.resource_versions[spec.kind] = rv
        return rv

    async def _events(self, spec: KindSpec, rv: str) -> AsyncIterator[Mapping[str, Any]]:
        query: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", self.watch_timeout),
        ]
        if rv:
            query.append(("resourceVersion", rv))
        self.watches[spec.kind] = self.watches.get(spec.kind, 0) + 1
        resp = await self._get(spec.path, query, self.watch_timeout + 30)
        try:
            if resp.status == 410:
                raise Gone(f"watch {spec.kind} at {rv}: HTTP 410")
            if resp.status != 200:
                raise SourceError(f"watch {spec.kind}: HTTP {resp.status}")
            async for event in json_lines(resp):
                yield event
        finally:
            resp.release()

    async def _watch(self, spec: KindSpec, source: str, rv: str) -> str:
        async for event in self._events(spec, rv):
            etype = event.get("type")
            obj = event.get("object") or {}
            if etype == "ERROR":
                if obj.get("code") == 410:
                    raise Gone(f"watch {spec.kind}: {obj.get('message', 'Gone')}")
                raise SourceError(f"watch {spec.kind}: error event {obj.get('message')}")
            new_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if new_rv:
                rv = str(new_rv)
                self.resource_versions[spec.kind] = rv
            if etype == "BOOKMARK":
                continue
            item = {"kind": spec.kind, "apiVersion": spec.group_version, **obj}
            ref = _ref(spec, item)
            if etype == "DELETED":
                meta = obj.get("metadata") or {}
                self.store.apply(
                    source,
                    (),
                    [
                        ObjectKey(
                            kind=spec.kind,
                            namespace=str(meta.get("namespace", "")) if spec.namespaced else "",
                            name=str(meta.get("name", "")),
                        )
                    ],
                )
                self.store.clear_source_warning(source, ref)
            elif etype in ("ADDED", "MODIFIED"):
                try:
                    parsed = parse_object(item)
                except ConfigError as exc:
                    self.store.add_source_warning(source, ref, f"update skipped: {exc}")
                    continue
                self.store.clear_source_warning(source, ref)
                self.store.apply(source, [parsed])
        return rv


def _ref(spec: KindSpec, item: Any) -> str:
    meta = item.get("metadata") if isinstance(item, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    ns, name = meta.get("namespace", ""), meta.get("name", "?")
    return f"{spec.kind} {ns}/{name}" if ns else f"{spec.kind} {name}"
