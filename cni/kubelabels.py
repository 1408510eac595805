"""The node agent's Kubernetes label source: Namespaces and THIS node's Pods, by list+watch.

Owns: `KubeLabels`, a `cni.labels.LabelSource` (and the agent's pod inventory) fed by two
list+watch loops against the Kubernetes API (kubernetes_asyncio, plain JSON, no generated
models):
- ``GET /api/v1/namespaces`` (cluster-scoped; only their labels are kept);
- ``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>``: only the pods scheduled on this
  node (the API server filters; an agent never holds the whole cluster's pods).

Protocol (Kubernetes API concepts, "Efficient detection of changes", "Watch bookmarks"): list,
then ``watch=true&resourceVersion=<rv>&allowWatchBookmarks=true&timeoutSeconds=N``; each
event's object advances the resourceVersion, BOOKMARK events only advance it; a watch that ends
is resumed from the last resourceVersion without a list; ``410 Gone`` (HTTP status or an ERROR
event carrying a Status with code 410) re-lists and REPLACES the kind's whole cache, so
deletions missed meanwhile are applied. Other failures back off (0.2 s doubling, cap 10 s,
jitter 0.2) and retry.

Credentials: the in-cluster service account (token and CA under
/var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST/PORT; kubernetes_asyncio
re-reads the rotated token), or a kubeconfig (tests, out-of-cluster runs).

Invariants:
- Until both kinds have been listed once, `labels()` raises `TryAgainLater` (CNI code 11): an
  ambient pod's ADD is failed and retried by the runtime rather than started un-captured, and
  the agent's reconcile never releases enrolled pods because of a cache that is still empty.
- `version()` changes on every applied change (list, event), never on bookmarks, so the agent
  re-reconciles exactly when labels or this node's pods may have changed.
- The caches are written from the event loop and read from the agent's worker thread: every
  access holds `_lock`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from cni.errors import CniError, TryAgainLater
from meshcore.kubeapi import KubeApi, json_lines

log = logging.getLogger("ambient.agent.kube")


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalPod:
    """A pod the API server says is scheduled on this node."""

    uid: str
    namespace: str
    name: str
    ips: tuple[str, ...]
    labels: Mapping[str, str]
    host_network: bool = False
    phase: str = ""


class Gone(CniError):
    """410 Gone: the resourceVersion was compacted; re-list."""


class WatchFailed(CniError):
    """The API server answered a list/watch with an error."""


def _labels(meta: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}


def parse_pod(obj: Mapping[str, Any]) -> LocalPod | None:
    """The fields the agent needs from a Pod object; None when it has no uid/name."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    uid, name = meta.get("uid"), meta.get("name")
    if not uid or not name:
        return None
    ips = [str(p.get("ip")) for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return LocalPod(
        uid=str(uid),
        namespace=str(meta.get("namespace", "default")),
        name=str(name),
        ips=tuple(ips),
        labels=_labels(meta),
        host_network=bool(spec.get("hostNetwork")),
        phase=str(status.get("phase", "")),
    )


class KubeLabels:
    """Namespace labels + this node's pods from the Kubernetes API. `run()` in the event loop."""

    def __init__(
        self,
        node: str,
        *,
        kubeconfig: Path | None = None,
        configuration: client.Configuration | None = None,
        watch_timeout: int = 300,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.kubeconfig = kubeconfig
        self.configuration = configuration
        self.watch_timeout = watch_timeout
        self.rng = rng or random.Random()
        self._kube = KubeApi(kubeconfig=kubeconfig, configuration=configuration)
        self._lock = threading.Lock()
        self._namespaces: dict[str, dict[str, str]] = {}
        self._pods: dict[str, LocalPod] = {}  # uid -> pod
        self._listed: set[str] = set()
        self._version = 0
        self.lists: dict[str, int] = {}
        """Full lists per kind (1 + re-lists after 410 Gone)."""
        self.watches: dict[str, int] = {}
        """Watch requests per kind (resumptions included)."""
        self.resource_versions: dict[str, str] = {}

    # -- LabelSource / inventory (agent worker thread) -------------------------------------
    @property
    def synced(self) -> bool:
        with self._lock:
            return self._listed >= {"namespaces", "pods"}

    def labels(self, namespace: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
        with self._lock:
            if not self._listed >= {"namespaces", "pods"}:
                raise TryAgainLater(
                    "node agent has not synced labels from the Kubernetes API yet",
                    f"listed so far: {sorted(self._listed) or 'nothing'}",
                )
            ns = dict(self._namespaces.get(namespace, {}))
            pod: dict[str, str] = {}
            for p in self._pods.values():
                if p.namespace == namespace and p.name == name:
                    pod = dict(p.labels)
            return ns, pod

    def version(self) -> object:
        with self._lock:
            return self._version if self._listed >= {"namespaces", "pods"} else None

    def local_pods(self) -> dict[str, LocalPod]:
        """uid -> pod for every pod scheduled on this node (empty until synced)."""
        with self._lock:
            if not self._listed >= {"namespaces", "pods"}:
                return {}
            return dict(self._pods)

    # -- cache updates (event loop) ---------------------------------------------------------
    def _replace(self, kind: str, items: list[Mapping[str, Any]]) -> None:
        with self._lock:
            if kind == "namespaces":
                self._namespaces = {
                    str((o.get("metadata") or {}).get("name")): _labels(o.get("metadata") or {})
                    for o in items
                }
            else:
                pods = (parse_pod(o) for o in items)
                self._pods = {p.uid: p for p in pods if p is not None}
            self._listed.add(kind)
            self._version += 1

    def _event(self, kind: str, etype: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        with self._lock:
            if kind == "namespaces":
                name = str(meta.get("name"))
                if etype == "DELETED":
                    self._namespaces.pop(name, None)
                else:
                    self._namespaces[name] = _labels(meta)
            else:
                pod = parse_pod(obj)
                if pod is None:
                    return
                # A pod that left this node's selector arrives as DELETED (watch semantics
                # of field selectors); a finished pod no longer needs capture either.
                if etype == "DELETED" or pod.phase in ("Succeeded", "Failed"):
                    self._pods.pop(pod.uid, None)
                else:
                    self._pods[pod.uid] = pod
            self._version += 1

    # -- list+watch -------------------------------------------------------------------------
    async def _get(self, path: str, query: list[tuple[str, Any]], timeout: float) -> Any:
        return await self._kube.open("GET", path, query=query, timeout=timeout)

    def _selector(self, kind: str) -> list[tuple[str, Any]]:
        return [("fieldSelector", f"spec.nodeName={self.node}")] if kind == "pods" else []

    async def _list(self, kind: str) -> str:
        resp = await self._get(f"/api/v1/{kind}", self._selector(kind), 60)
        try:
            if resp.status != 200:
                raise WatchFailed(f"list {kind}: HTTP {resp.status}")
            data = await resp.json(content_type=None)
        finally:
            resp.release()
        items = [o for o in data.get("items") or [] if isinstance(o, Mapping)]
        if kind == "pods":
            items = [o for o in items if (o.get("status") or {}).get("phase") not in
                     ("Succeeded", "Failed")]  # fmt: skip
        self._replace(kind, items)
        self.lists[kind] = self.lists.get(kind, 0) + 1
        rv = str((data.get("metadata") or {}).get("resourceVersion", ""))
        self.resource_versions[kind] = rv
        log.info("listed %d %s (resourceVersion %s)", len(items), kind, rv)
        return rv

    async def _events(self, kind: str, rv: str) -> AsyncIterator[Mapping[str, Any]]:
        query: list[tuple[str, Any]] = [
            *self._selector(kind),
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", self.watch_timeout),
        ]
        if rv:
            query.append(("resourceVersion", rv))
        self.watches[kind] = self.watches.get(kind, 0) + 1
        resp = await self._get(f"/api/v1/{kind}", query, self.watch_timeout + 30)
        try:
            if resp.status == 410:
                raise Gone(f"watch {kind} at {rv}: HTTP 410")
            if resp.status != 200:
                raise WatchFailed(f"watch {kind}: HTTP {resp.status}")
            async for event in json_lines(resp):
                yield event
        finally:
            resp.release()

    async def _watch(self, kind: str, rv: str) -> str:
        async for event in self._events(kind, rv):
            etype = str(event.get("type"))
            obj = event.get("object") or {}
            if etype == "ERROR":
                if obj.get("code") == 410:
                    raise Gone(f"watch {kind}: {obj.get('message', 'Gone')}")
                raise WatchFailed(f"watch {kind}: error event {obj.get('message')}")
            new_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if new_rv:
                rv = str(new_rv)
                self.resource_versions[kind] = rv
            if etype in ("ADDED", "MODIFIED", "DELETED"):
                self._event(kind, etype, obj)
        return rv

    async def _loop(self, kind: str, sleep: Callable[[float], Awaitable[None]]) -> None:
        rv: str | None = None
        attempt = 0
        while True:
            try:
                if rv is None:
                    rv = await self._list(kind)
                rv = await self._watch(kind, rv)
                attempt = 0
            except Gone:
                log.info("%s: resourceVersion %s is gone (410); re-listing", kind, rv)
                rv = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = min(10.0, 0.2 * 2**attempt) * (1 + self.rng.uniform(-0.2, 0.2))
                attempt += 1
                log.warning("%s list/watch failed (%s); retry in %.1fs", kind, exc, delay)
                await sleep(delay)

    async def run(self) -> None:
        """List+watch namespaces and this node's pods forever (cancel to stop)."""
        tasks = [asyncio.create_task(self._loop(k, asyncio.sleep)) for k in ("namespaces", "pods")]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await self._kube.close()
