"""In-cluster waypoint controller: a ServiceAccount, Deployment and Service per waypoint Gateway.

Owns: the desired objects for a Gateway of class ``istio-waypoint`` (`desired_objects`, pure),
its status (`gateway_status`, pure, clock injected), and `WaypointController`, which reconciles
them against the Kubernetes API (create, merge-patch, delete; kubernetes_asyncio, plain JSON).

Rules (Istio ambient "waypoint" deployment, docs/reference/ambient-facts.md "Enrollment, labels,
waypoints"):
- Objects are named after the Gateway, in its namespace; the ServiceAccount is ``<gw>`` unless
  the Gateway annotates ``gateway.istio.io/service-account: <sa>`` (then that account is used and
  not created by us). Every object carries ``gateway.networking.k8s.io/gateway-name=<gw>`` and
  ``app.kubernetes.io/managed-by=ambient-controlplane`` and an ownerReference to the Gateway
  (controller=true, blockOwnerDeletion=true) so the garbage collector removes them with it.
- With a TLS control plane its roots go to a ConfigMap ``<gw>-controlplane-roots`` (same
  labels and owner) that the pods mount (ConfigMaps are namespaced; the control plane's own
  Secret is not readable from the Gateway's namespace).
- The pods are labelled ``istio.io/dataplane-mode=none`` (never captured) and the gateway-name
  label (translate.py: the waypoint Service fronts them), run ``waypoint --xds-address``, ready
  on the admin ``/healthz/ready``; the Service exposes HBONE 15008. Metrics and readiness
  listen on the pod IP (``--admin 0.0.0.0:15020``, Prometheus annotations on the pod); the
  debug views (every route and policy) on 127.0.0.1:15000 only (``--debug-listen``).
- The pods get ``CLUSTER_ID`` (the control plane's ``--cluster-id``: the ``*_cluster`` labels of
  Istio's metrics and the workload uid prefix ``<cluster>//Pod/...``, as istiod sets it in
  the proxies it injects) and, when tracing is configured, the OpenTelemetry exporter and
  sampler variables (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_TRACES_SAMPLER=
  parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG``: Istio's sampling percent / 100).
- Status (Gateway API v1 ``GatewayStatus``): Accepted=True once seen; Programmed=True when the
  Deployment reports an available replica, else False (reason Pending); addresses = the
  Service's hostname. A Gateway with an Error field finding (the control plane's, e.g.
  ``spec.addresses``) has Accepted and Programmed False (`controlplane.status.
  gateway_acceptance`); warnings are named in Accepted's message. Conditions keep their
  lastTransitionTime unless their status changes.

Invariants: reconciling is idempotent: an object is patched (RFC 7386 JSON merge patch of the
desired fields) only when it does not already contain them (`contains`: server-defaulted extra
fields are not drift); objects we manage whose Gateway is gone
are deleted (GC may be absent); nothing we did not label as managed is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from controlplane.errors import SourceError
from controlplane.status import gateway_acceptance
from meshcore.bootstrap import Bootstrap
from meshcore.config.findings import Finding
from meshcore.kubeapi import KubeApi

log = logging.getLogger(__name__)

WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "ambient-controlplane"
SA_ANNOTATION = "gateway.istio.io/service-account"
HBONE_PORT = 15008
ADMIN_PORT = 15020
DEBUG_PORT = 15000
TOKEN_DIR = "/var/run/secrets/ambient"
ROOTS_DIR = "/etc/ambient/controlplane-roots"
GATEWAY_API = "/apis/gateway.networking.k8s.io/v1"

Json = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointSettings:
    """What the chart passes the control plane for the waypoints it starts."""

    image: str = "ghcr.io/ambient-mesh/waypoint:latest"
    xds_address: str = "ambient-controlplane.istio-system.svc:15012"
    controlplane_server_name: str = "ambient-controlplane.istio-system.svc"
    token_audience: str = "ambient-controlplane"
    roots_pem: str = ""
    """The control plane's TLS roots (PEM), published to the waypoint as a ConfigMap
    ``<gw>-controlplane-roots`` in its namespace; "" = plaintext control plane (lab only)."""
    trust_domain: str = "cluster.local"
    image_pull_policy: str = "IfNotPresent"
    extra_args: tuple[str, ...] = ()
    cluster_id: str = "Kubernetes"
    """This cluster's id (``CLUSTER_ID`` of the waypoint pods)."""
    tracing_address: str = ""
    """OTLP gRPC collector host:port for the waypoints' spans ("" = no tracing)."""
    tracing_sampling: float = 1.0
    """Percent of new traces the waypoints sample (Istio's ``tracing.sampling``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointObjects:
    """The desired objects of one waypoint Gateway (plain API JSON)."""

    namespace: str
    gateway: str
    service_account_name: str
    service_account: Json | None
    """None when the Gateway names an existing account (not ours to create)."""
    deployment: Json
    service: Json
    roots: Json | None = None
    """ConfigMap of the control plane's roots (None: plaintext)."""


def is_waypoint(gw: Mapping[str, Any]) -> bool:
    return bool((gw.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS)


def waypoint_service_account(gw: Mapping[str, Any]) -> tuple[str, bool]:
    """(service account name, whether we create it)."""
    meta = gw.get("metadata") or {}
    named = str((meta.get("annotations") or {}).get(SA_ANNOTATION, ""))
    return (named, False) if named else (str(meta["name"]), True)


def _owner(gw: Mapping[str, Any]) -> Json:
    meta = gw["metadata"]
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def desired_objects(gw: Mapping[str, Any], settings: WaypointSettings) -> WaypointObjects:
    """The ServiceAccount/Deployment/Service for waypoint Gateway `gw` (pure)."""
    meta = gw["metadata"]
    name, ns = str(meta["name"]), str(meta.get("namespace", "default"))
    sa, ours = waypoint_service_account(gw)
    labels = {GATEWAY_NAME: name, MANAGED_BY: MANAGER}

    def metadata() -> Json:
        return {
            "name": name,
            "namespace": ns,
            "labels": dict(labels),
            "ownerReferences": [_owner(gw)],
        }

    args = [
        "--name",
        name,
        "--namespace",
        ns,
        "--service-account",
        sa,
        "--workload-uid",
        f"{settings.cluster_id}//Pod/$(POD_NAMESPACE)/$(POD_NAME)",
        "--node",
        "$(NODE_NAME)",
        "--trust-domain",
        settings.trust_domain,
        "--admin",
        f"0.0.0.0:{ADMIN_PORT}",
        "--debug-listen",
        f"127.0.0.1:{DEBUG_PORT}",
    ]
    mounts: list[Json] = [{"name": "token", "mountPath": TOKEN_DIR, "readOnly": True}]
    volumes: list[Json] = [
        {
            "name": "token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": settings.token_audience,
                            "expirationSeconds": 3600,
                            "path": "token",
                        }
                    }
                ]
            },
        }
    ]
    roots: Json | None = None
    if settings.roots_pem:
        roots = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {**metadata(), "name": f"{name}-controlplane-roots"},
            "data": {"root-cert.pem": settings.roots_pem},
        }
        mounts.append({"name": "controlplane-roots", "mountPath": ROOTS_DIR, "readOnly": True})
        volumes.append(
            {"name": "controlplane-roots", "configMap": {"name": f"{name}-controlplane-roots"}}
        )
    args += Bootstrap(
        xds_address=settings.xds_address,
        token_file=Path(TOKEN_DIR, "token"),
        roots_file=Path(ROOTS_DIR, "root-cert.pem") if roots is not None else None,
        server_name=settings.controlplane_server_name,
    ).argv()
    args += list(settings.extra_args)

    def field_env(var: str, path: str) -> Json:
        return {"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    env: list[Json] = [
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        {"name": "CLUSTER_ID", "value": settings.cluster_id},
    ]
    if settings.tracing_address:
        env += [
            {"name": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "value": settings.tracing_address},
            {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"},
            {"name": "OTEL_TRACES_SAMPLER_ARG", "value": f"{settings.tracing_sampling / 100:g}"},
        ]
    pod_labels = {GATEWAY_NAME: name, "istio.io/dataplane-mode": "none"}
    deployment: Json = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME: name}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ADMIN_PORT),
                        "prometheus.io/path": "/stats/prometheus",
                    },
                },
                "spec": {
                    "serviceAccountName": sa,
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "waypoint",
                            "image": settings.image,
                            "imagePullPolicy": settings.image_pull_policy,
                            "command": ["waypoint"],
                            "args": args,
                            "env": env,
                            "ports": [
                                {"name": "hbone", "containerPort": HBONE_PORT},
                                {"name": "admin", "containerPort": ADMIN_PORT},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz/ready", "port": ADMIN_PORT},
                                "periodSeconds": 2,
                            },
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }
    service: Json = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(),
        "spec": {
            "selector": {GATEWAY_NAME: name},
            "ports": [
                {
                    "name": "mesh",
                    "port": HBONE_PORT,
                    "targetPort": HBONE_PORT,
                    "protocol": "TCP",
                    "appProtocol": "all",
                }
            ],
        },
    }
    account: Json | None = (
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata()} if ours else None
    )
    return WaypointObjects(
        namespace=ns,
        gateway=name,
        service_account_name=sa,
        service_account=account,
        deployment=deployment,
        service=service,
        roots=roots,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _StatusUpdate:
    """A Gateway status being rewritten: its previous status, generation and the time now."""

    old: Mapping[str, Any]
    generation: int
    stamp: str

    def condition(self, ctype: str, status: bool, reason: str, message: str) -> Json:
        """Condition `ctype`; lastTransitionTime is kept while the status does not change."""
        prev = next((c for c in self.old.get("conditions") or () if c.get("type") == ctype), None)
        text = "True" if status else "False"
        since = prev["lastTransitionTime"] if prev and prev.get("status") == text else self.stamp
        return {
            "type": ctype,
            "status": text,
            "reason": reason,
            "message": message,
            "observedGeneration": self.generation,
            "lastTransitionTime": since,
        }


def gateway_status(
    gw: Mapping[str, Any],
    *,
    available: int,
    domain_suffix: str,
    now: datetime,
    findings: Sequence[Finding] = (),
) -> Json:
    """The Gateway's ``status`` (GatewayStatus) given its Deployment's available replicas and
    its field findings (`controlplane.status.gateway_acceptance`: an Error finding makes
    Accepted and Programmed False, warnings are named in Accepted's message)."""
    meta = gw["metadata"]
    update = _StatusUpdate(
        old=gw.get("status") or {},
        generation=int(meta.get("generation") or 0),
        stamp=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    host = f"{meta['name']}.{meta.get('namespace', 'default')}.svc.{domain_suffix}"
    programmed = available > 0
    accepted, reason, text = gateway_acceptance(findings)
    if not accepted:
        return {
            "addresses": [{"type": "Hostname", "value": host}],
            "conditions": [
                update.condition("Accepted", False, reason, text),
                update.condition("Programmed", False, "Invalid", text),
            ],
        }
    created = "waypoint resources created" + (f"; {text}" if text else "")
    return {
        "addresses": [{"type": "Hostname", "value": host}],
        "conditions": [
            update.condition("Accepted", True, "Accepted", created),
            update.condition(
                "Programmed",
                programmed,
                "Programmed" if programmed else "Pending",
                f"{available} waypoint replica(s) available"
                if programmed
                else "waiting for the waypoint Deployment to be available",
            ),
        ],
    }


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON Merge Patch (section 2): `patch` applied to `target` (new value)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out: Json = dict(target) if isinstance(target, Mapping) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def contains(live: Any, desired: Any) -> bool:
    """Whether `live` already holds `desired`: every key of a desired object present with a
    contained value, lists of equal length element-wise contained, scalars equal. Fields the
    API server defaults (inside containers, ports...) therefore do not count as drift."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and contains(live[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    return bool(live == desired)


def needs_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether `current` lacks any field of `desired` (then it is merge-patched)."""
    return not contains(current, desired)


# ---- I/O


@dataclass(frozen=True, slots=True, kw_only=True)
class _Kind:
    prefix: str
    plural: str

    def collection(self, ns: str | None = None) -> str:
        return (
            f"{self.prefix}/namespaces/{ns}/{self.plural}"
            if ns
            else (f"{self.prefix}/{self.plural}")
        )

    def item(self, ns: str, name: str) -> str:
        return f"{self.collection(ns)}/{name}"


SERVICE_ACCOUNTS = _Kind(prefix="/api/v1", plural="serviceaccounts")
DEPLOYMENTS = _Kind(prefix="/apis/apps/v1", plural="deployments")
SERVICES = _Kind(prefix="/api/v1", plural="services")
CONFIG_MAPS = _Kind(prefix="/api/v1", plural="configmaps")
GATEWAYS = _Kind(prefix=GATEWAY_API, plural="gateways")
MANAGED = (DEPLOYMENTS, SERVICES, SERVICE_ACCOUNTS, CONFIG_MAPS)


@dataclass(slots=True)
class ReconcileStats:
    created: int = 0
    patched: int = 0
    deleted: int = 0
    status_updates: int = 0
    errors: list[str] = field(default_factory=list)


class WaypointController:
    """Reconcile waypoint Gateways against the API every `interval` (or when `kick()`ed)."""

    def __init__(
        self,
        settings: WaypointSettings,
        *,
        domain_suffix: str = "cluster.local",
        kube: KubeApi | None = None,
        interval: float = 10.0,
        findings: Callable[[], Mapping[str, Sequence[Finding]]] | None = None,
    ) -> None:
        self.settings = settings
        self.findings = findings or dict
        """``Gateway ns/name`` -> field findings (the control plane's), for the status."""
        self.domain_suffix = domain_suffix
        self.interval = interval
        self._kube = kube or KubeApi()
        """The API client (default: in-cluster service account)."""
        self.passes = 0
        self.stats = ReconcileStats()
        self._kick = asyncio.Event()

    def kick(self) -> None:
        self._kick.set()

    @property
    def api(self) -> client.ApiClient | None:
        """The open API client, if any (tests close it)."""
        return self._kube.api

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: list[tuple[str, Any]] | None = None,
    ) -> tuple[int, Any]:
        return await self._kube.call(method, path, body, query=query)

    async def _ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, data = await self._call(method, path, body, **kw)
        if status >= 300:
            msg = data.get("message") if isinstance(data, Mapping) else data
            raise SourceError(f"{method} {path}: HTTP {status} {msg}")
        return data

    async def _ensure(self, kind: _Kind, obj: Json) -> Json:
        """Create `obj`, or merge-patch it onto the live object if that changes anything."""
        meta = obj["metadata"]
        path = kind.item(meta["namespace"], meta["name"])
        status, live = await self._call("GET", path)
        if status == 404:
            status, created = await self._call("POST", kind.collection(meta["namespace"]), obj)
            if status in (200, 201):
                self.stats.created += 1
                return dict(created)
            if status != 409:  # 409: created meanwhile; patch below
                raise SourceError(f"POST {kind.plural} {meta['name']}: HTTP {status}")
            live = await self._ok("GET", path)
        elif status != 200:
            raise SourceError(f"GET {path}: HTTP {status}")
        if not needs_patch(live, obj):
            return dict(live)
        patched = await self._ok("PATCH", path, obj)
        self.stats.patched += 1
        return dict(patched)

    async def reconcile(self, *, now: datetime) -> None:
        """One pass: every waypoint Gateway's objects and status; orphans deleted."""
        gateways = (await self._ok("GET", GATEWAYS.collection())).get("items") or []
        wanted: set[tuple[str, str]] = set()
        for gw in gateways:
            if not is_waypoint(gw):
                continue
            meta = gw.get("metadata") or {}
            key = (str(meta.get("namespace", "default")), str(meta.get("name", "")))
            wanted.add(key)
            try:
                await self._reconcile_one(gw, now=now)
            except Exception as exc:
                log.warning("waypoint %s/%s: %s", *key, exc)
                self.stats.errors.append(f"{key[0]}/{key[1]}: {exc}")
        selector = f"{MANAGED_BY}={MANAGER}"
        for kind in MANAGED:
            listed = await self._ok("GET", kind.collection(), query=[("labelSelector", selector)])
            for obj in listed.get("items") or []:
                meta = obj.get("metadata") or {}
                owner = (
                    str(meta.get("namespace", "")),
                    (meta.get("labels") or {}).get(GATEWAY_NAME, ""),
                )
                if owner in wanted:
                    continue
                status, _ = await self._call("DELETE", kind.item(owner[0], str(meta.get("name"))))
                if status in (200, 202):
                    self.stats.deleted += 1
                elif status != 404:
                    self.stats.errors.append(f"delete {kind.plural} {meta.get('name')}: {status}")
        self.passes += 1

    async def _reconcile_one(self, gw: Mapping[str, Any], *, now: datetime) -> None:
        objs = desired_objects(gw, self.settings)
        if objs.service_account is not None:
            await self._ensure(SERVICE_ACCOUNTS, objs.service_account)
        if objs.roots is not None:
            await self._ensure(CONFIG_MAPS, objs.roots)
        deployment = await self._ensure(DEPLOYMENTS, objs.deployment)
        await self._ensure(SERVICES, objs.service)
        available = int((deployment.get("status") or {}).get("availableReplicas") or 0)
        found = self.findings().get(f"Gateway {objs.namespace}/{objs.gateway}", ())
        status = gateway_status(
            gw, available=available, domain_suffix=self.domain_suffix, now=now, findings=found
        )
        if status != (gw.get("status") or {}):
            await self._ok(
                "PATCH",
                GATEWAYS.item(objs.namespace, objs.gateway) + "/status",
                {"status": status},
            )
            self.stats.status_updates += 1

    async def run(self) -> None:
        """Reconcile forever (cancel to stop); failures are logged and retried next pass."""
        from meshcore.certs import utcnow

        try:
            while True:
                try:
                    await self.reconcile(now=utcnow())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("waypoint reconcile failed: %s", exc)
                    self.stats.errors.append(str(exc))
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self.interval)
        finally:
            await self._kube.close()
