"""The node agent's Kubernetes label source: Namespaces and THIS node's Pods, by list+watch.

Owns: `KubeLabels`, a `cni.labels.LabelSource` (and the agent's pod inventory) fed by two
list+watch loops against the Kubernetes API (kubernetes_asyncio, plain JSON, no generated
models):
- ``GET /api/v1/namespaces`` (cluster-scoped; only their labels are kept);
- ``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>``: only the pods scheduled on this
  node (the API server filters; an agent never holds the whole cluster's pods).

List+watch, resumption from the resourceVersion, bookmarks and the 410 Gone re-list (which
REPLACES the kind's whole cache, so deletions missed meanwhile are applied) are
`meshcore.reflector`'s; this module owns what the objects mean to the agent.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from cni.errors import TryAgainLater
from meshcore.backoff import Retry, Sleep
from meshcore.kubeapi import KubeApi
from meshcore.reflector import WATCH_BACKOFF, Collection, Reflector, ReflectorCounters

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


class KubeLabels(ReflectorCounters):
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
        self._reflectors: dict[str, Reflector] = {}

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
                # A finished pod no longer needs capture.
                finished = ("Succeeded", "Failed")
                live = [o for o in items if (o.get("status") or {}).get("phase") not in finished]
                pods = (parse_pod(o) for o in live)
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
    def _reflector(self, kind: str, sleep: Sleep) -> Reflector:
        collection = Collection(
            path=f"/api/v1/{kind}",
            name=kind,
            query=(("fieldSelector", f"spec.nodeName={self.node}"),) if kind == "pods" else (),
            watch_timeout=self.watch_timeout,
            list_timeout=60,
        )
        return Reflector(
            self._kube,
            collection,
            replace=lambda items: self._replace(kind, items),
            event=lambda etype, obj: self._event(kind, etype, obj),
            retry=Retry(WATCH_BACKOFF, rng=self.rng, sleep=sleep),
        )

    async def run(self, sleep: Sleep = asyncio.sleep) -> None:
        """List+watch namespaces and this node's pods forever (cancel to stop)."""
        self._reflectors = {k: self._reflector(k, sleep) for k in ("namespaces", "pods")}
        tasks = [asyncio.create_task(r.run()) for r in self._reflectors.values()]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await self._kube.close()
