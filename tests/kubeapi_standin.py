"""A STAND-IN for the Kubernetes API server, served over real HTTP on loopback by the tests.

This is not Kubernetes: it implements only the protocol the control plane's Kubernetes source
relies on, faithfully enough to exercise it (Kubernetes API concepts, "Efficient detection of
changes" and "Watch bookmarks"):
- discovery: ``GET /api`` (APIVersions) and ``GET /apis`` (APIGroupList) listing only the
  groups given to the constructor (so "CRD not installed" can be tested), and
  ``GET /apis/<group>/<version>`` (APIResourceList: the plurals served there);
- list: ``GET /api/v1/pods``, ``GET /apis/<group>/<version>/<plural>`` (cluster-wide), with a
  collection ``metadata.resourceVersion``;
- watch: ``?watch=true&resourceVersion=<rv>&allowWatchBookmarks=true&timeoutSeconds=N``: a
  chunked stream of JSON lines ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object"}``,
  replaying events after ``rv``; a resourceVersion older than the compaction point yields one
  ERROR event whose object is a Status with ``code: 410`` (reason Expired), as the real API
  server does; BOOKMARK events carry only ``metadata.resourceVersion``;
- resourceVersion is one global counter, every write increments it.
- field selector ``spec.nodeName=<node>`` on pod lists and watches (the node agent's);
- get: ``GET /api/v1/namespaces/<ns>/pods/<name>`` (404 Status when absent);
- TokenReview: ``POST /apis/authentication.k8s.io/v1/tokenreviews`` answers 201 with the
  review's ``status``: tokens registered with `add_token` are authenticated (when the requested
  ``spec.audiences`` intersect the token's), with ``user.extra`` carrying the bound pod
  (``authentication.kubernetes.io/pod-name``/``pod-uid``) and, when given, the node
  (``authentication.kubernetes.io/node-name``, Kubernetes 1.30+); other tokens get
  ``authenticated: false`` and an ``error``, as the real API server does.
- writes (namespaced, for the waypoint controller): ``POST <collection under
  /namespaces/<ns>>`` (201; 409 AlreadyExists), ``PATCH <item>`` with
  ``application/merge-patch+json`` (RFC 7386; 404 when absent), ``DELETE <item>`` (200 with the
  object; 404 when absent), ``GET <item>`` for any served kind, and the ``status`` subresource of
  the kinds in `SUBRESOURCES` (``PATCH .../<plural>/<name>/status`` changes only ``status``, a
  PATCH of the main resource leaves ``status`` alone); every write bumps the
  object's resourceVersion and emits a watch event; a create sets ``metadata.uid``. A PATCH that
  changes nothing keeps the resourceVersion (as the API server does for a no-op);
- ``labelSelector`` of equality terms (``k=v,k2=v2``) on lists;
- ``apps/v1`` deployments (writes only; no controller runs them: tests set ``status``).
Test controls: `upsert`, `delete`, `compact` (forget history: older watches get 410),
`close_watches` (end every open watch stream, as an API server restart or timeout would),
`available = False` (answer 503: an outage during which history can be compacted).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from typing import Any

from aiohttp import web

CORE = {"namespaces", "nodes", "pods", "services", "serviceaccounts", "configmaps"}
GROUPS = {
    "discovery.k8s.io/v1": {"endpointslices"},
    "security.istio.io/v1": {
        "authorizationpolicies",
        "peerauthentications",
        "requestauthentications",
    },
    "networking.istio.io/v1": {"virtualservices", "destinationrules", "serviceentries", "sidecars"},
    "telemetry.istio.io/v1": {"telemetries"},
    "gateway.networking.k8s.io/v1": {"gateways", "httproutes", "grpcroutes"},
    "apps/v1": {"deployments"},
}
SUBRESOURCES = {
    (plural, "status")
    for plural in (
        "gateways",
        "httproutes",
        "authorizationpolicies",
        "peerauthentications",
        "requestauthentications",
        "virtualservices",
        "destinationrules",
        "serviceentries",
        "sidecars",
        "telemetries",
        "grpcroutes",
    )
}
"""Kinds with a ``status`` subresource (all the CRDs the control plane reports on)."""


class KubeApiStandIn:
    def __init__(self, *, groups: set[str] | None = None, bookmark_interval: float = 0.2) -> None:
        self.groups = set(GROUPS) if groups is None else groups
        self.bookmark_interval = bookmark_interval
        self.rv = 100
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # rv, plural, type, obj
        self.compacted = 0
        self.requests: list[str] = []
        self._changed = asyncio.Condition()
        self._watch_generation = 0
        self.available = True
        """False: every request is answered 503 (an API server outage)."""
        self.tokens: dict[str, dict[str, Any]] = {}
        """token -> {"username", "audiences", "pod": (ns, name, uid) | None, "node"}"""
        self.reviews: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._uids = 0
        self.port = 0

    # ---- test controls

    async def upsert(self, plural: str, obj: dict[str, Any]) -> int:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        kind = "MODIFIED" if key in self.objects.setdefault(plural, {}) else "ADDED"
        self.objects[plural][key] = obj
        self.events.append((self.rv, plural, kind, obj))
        async with self._changed:
            self._changed.notify_all()
        return self.rv

    async def delete(self, plural: str, namespace: str, name: str) -> int:
        obj = self.objects.get(plural, {}).pop((namespace, name))
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, plural, "DELETED", obj))
        async with self._changed:
            self._changed.notify_all()
        return self.rv

    def compact(self) -> None:
        """Forget all history up to now: a watch from an older resourceVersion gets 410."""
        self.compacted = self.rv
        self.events.clear()

    def add_token(
        self,
        token: str,
        username: str,
        *,
        pod: tuple[str, str, str] | None = None,
        node: str = "",
        audiences: tuple[str, ...] = ("https://kubernetes.default.svc.cluster.local",),
    ) -> None:
        """Register a service account token; `pod` = (namespace, name, uid) it is bound to."""
        self.tokens[token] = {
            "username": username,
            "audiences": list(audiences),
            "pod": pod,
            "node": node,
        }

    async def close_watches(self) -> None:
        self._watch_generation += 1
        async with self._changed:
            self._changed.notify_all()

    # ---- HTTP

    async def start(self, host: str = "127.0.0.1") -> None:
        app = web.Application()
        app.router.add_get("/api", self._api)
        app.router.add_get("/apis", self._apis)
        app.router.add_get("/api/v1/{plural}", self._collection)
        app.router.add_get("/api/v1/namespaces/{namespace}/{plural}/{name}", self._get_one)
        app.router.add_post("/api/v1/namespaces/{namespace}/{plural}", self._create)
        app.router.add_patch("/api/v1/namespaces/{namespace}/{plural}/{name}", self._patch)
        app.router.add_delete("/api/v1/namespaces/{namespace}/{plural}/{name}", self._delete)
        ns_prefix = "/apis/{group}/{version}/namespaces/{namespace}/{plural}"
        app.router.add_post(ns_prefix, self._create)
        app.router.add_get(ns_prefix + "/{name}", self._get_one)
        app.router.add_patch(ns_prefix + "/{name}", self._patch)
        app.router.add_patch(ns_prefix + "/{name}/{subresource}", self._patch)
        app.router.add_delete(ns_prefix + "/{name}", self._delete)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_get("/apis/{group}/{version}/{plural}", self._collection)
        app.router.add_get("/apis/{group}/{version}", self._resources)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _get_one(self, request: web.Request) -> web.Response:
        if not self.available:
            raise web.HTTPServiceUnavailable()
        plural = self._served(request)
        key = (request.match_info["namespace"], request.match_info["name"])
        self.requests.append(f"get {plural} {key[0]}/{key[1]}")
        obj = self.objects.get(plural, {}).get(key)
        if obj is None:
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": f'{plural} "{key[1]}" not found',
                "reason": "NotFound",
                "code": 404,
            }
            return web.json_response(status, status=404)
        return web.json_response(copy.deepcopy(obj))

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        return web.json_response(body, status=code)

    async def _create(self, request: web.Request) -> web.Response:
        if not self.available:
            raise web.HTTPServiceUnavailable()
        plural = self._served(request)
        ns = request.match_info["namespace"]
        obj = await request.json()
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = ns
        self.requests.append(f"create {plural} {ns}/{meta.get('name')}")
        if (ns, meta.get("name")) in self.objects.get(plural, {}):
            return self._status(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        self._uids += 1
        meta["uid"] = f"uid-{self._uids}"
        meta.pop("resourceVersion", None)
        await self.upsert(plural, obj)
        return web.json_response(
            copy.deepcopy(self.objects[plural][(ns, meta["name"])]), status=201
        )

    async def _patch(self, request: web.Request) -> web.Response:
        if not self.available:
            raise web.HTTPServiceUnavailable()
        plural = self._served(request)
        sub = request.match_info.get("subresource")
        if sub is not None and (plural, sub) not in SUBRESOURCES:
            raise web.HTTPNotFound()
        key = (request.match_info["namespace"], request.match_info["name"])
        self.requests.append(f"patch {plural}{'/' + sub if sub else ''} {key[0]}/{key[1]}")
        if request.content_type != "application/merge-patch+json":
            raise web.HTTPUnsupportedMediaType()
        live = self.objects.get(plural, {}).get(key)
        if live is None:
            return self._status(404, "NotFound", f'{plural} "{key[1]}" not found')
        patch = await request.json()
        if sub == "status":
            patch = {"status": patch.get("status")}
        elif isinstance(patch, dict) and plural in {p for p, _ in SUBRESOURCES}:
            patch.pop("status", None)  # the main resource ignores status (subresource enabled)
        new = _merge(live, patch)
        new["metadata"]["uid"] = live["metadata"].get("uid")
        new["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        if new != live:
            await self.upsert(plural, new)
        return web.json_response(copy.deepcopy(self.objects[plural][key]))

    async def _delete(self, request: web.Request) -> web.Response:
        if not self.available:
            raise web.HTTPServiceUnavailable()
        plural = self._served(request)
        ns, name = request.match_info["namespace"], request.match_info["name"]
        self.requests.append(f"delete {plural} {ns}/{name}")
        obj = self.objects.get(plural, {}).get((ns, name))
        if obj is None:
            return self._status(404, "NotFound", f'{plural} "{name}" not found')
        await self.delete(plural, ns, name)
        return web.json_response(copy.deepcopy(obj))

    async def _token_review(self, request: web.Request) -> web.Response:
        if not self.available:
            raise web.HTTPServiceUnavailable()
        body = await request.json()
        spec = body.get("spec") or {}
        self.reviews.append(copy.deepcopy(body))
        token = str(spec.get("token", ""))
        wanted = list(spec.get("audiences") or ["https://kubernetes.default.svc.cluster.local"])
        known = self.tokens.get(token)
        status: dict[str, Any]
        if known is None:
            status = {"authenticated": False, "error": "invalid bearer token"}
        elif not set(wanted) & set(known["audiences"]):
            status = {
                "authenticated": False,
                "error": "token audiences "
                f"{known['audiences']} is invalid for the target audiences {wanted}",
            }
        else:
            extra: dict[str, list[str]] = {}
            if known["pod"] is not None:
                ns, name, uid = known["pod"]
                extra["authentication.kubernetes.io/pod-name"] = [name]
                extra["authentication.kubernetes.io/pod-uid"] = [uid]
                live = self.objects.get("pods", {}).get((ns, name))
                if live is None or live["metadata"].get("uid") != uid:
                    # The API server refuses tokens whose bound object is gone.
                    status = {"authenticated": False, "error": "pod bound to the token is gone"}
                    return self._review_answer(body, status)
            if known["node"]:
                extra["authentication.kubernetes.io/node-name"] = [known["node"]]
            status = {
                "authenticated": True,
                "user": {
                    "username": known["username"],
                    "uid": "uid-" + known["username"],
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                    "extra": extra,
                },
                "audiences": [a for a in wanted if a in known["audiences"]],
            }
        return self._review_answer(body, status)

    @staticmethod
    def _review_answer(body: dict[str, Any], status: dict[str, Any]) -> web.Response:
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": body.get("spec") or {},
            "status": status,
        }
        return web.json_response(answer, status=201)

    async def _api(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def _apis(self, request: web.Request) -> web.Response:
        groups: dict[str, list[dict[str, str]]] = {}
        for gv in sorted(self.groups):
            g, v = gv.split("/")
            groups.setdefault(g, []).append({"groupVersion": gv, "version": v})
        return web.json_response(
            {
                "kind": "APIGroupList",
                "groups": [
                    {"name": g, "versions": vs, "preferredVersion": vs[0]}
                    for g, vs in groups.items()
                ],
            }
        )

    async def _resources(self, request: web.Request) -> web.Response:
        gv = f"{request.match_info['group']}/{request.match_info['version']}"
        if gv not in self.groups:
            raise web.HTTPNotFound()
        resources = [{"name": p, "namespaced": True} for p in sorted(GROUPS.get(gv, set()))]
        return web.json_response(
            {"kind": "APIResourceList", "groupVersion": gv, "resources": resources}
        )

    def _served(self, request: web.Request) -> str:
        plural = request.match_info["plural"]
        if "group" in request.match_info:
            gv = f"{request.match_info['group']}/{request.match_info['version']}"
            if gv not in self.groups or plural not in GROUPS.get(gv, set()):
                raise web.HTTPNotFound()
        elif plural not in CORE:
            raise web.HTTPNotFound()
        return plural

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        if not self.available:
            raise web.HTTPServiceUnavailable()
        plural = self._served(request)
        q = request.query
        self.requests.append(f"{plural}?{request.query_string}")
        if q.get("watch") in ("true", "1"):
            return await self._watch(request, plural)
        items = [
            copy.deepcopy(o)
            for _, o in sorted(self.objects.get(plural, {}).items())
            if _selected(request, o)
        ]
        return web.json_response(
            {"kind": "List", "metadata": {"resourceVersion": str(self.rv)}, "items": items}
        )

    async def _watch(self, request: web.Request, plural: str) -> web.StreamResponse:
        q = request.query
        since = int(q.get("resourceVersion") or self.rv)
        bookmarks = q.get("allowWatchBookmarks") == "true"
        timeout = float(q.get("timeoutSeconds") or 300)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            await resp.write(json.dumps(event).encode() + b"\n")

        if since < self.compacted:
            await send(
                {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": f"too old resource version: {since} ({self.compacted})",
                        "reason": "Expired",
                        "code": 410,
                    },
                }
            )
            return resp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        generation = self._watch_generation
        sent_rv = since
        try:
            while loop.time() < deadline and generation == self._watch_generation:
                for rv, p, etype, obj in list(self.events):
                    if rv > sent_rv and p == plural and _selected(request, obj):
                        await send({"type": etype, "object": obj})
                        sent_rv = rv
                if bookmarks and self.rv > sent_rv:
                    sent_rv = self.rv
                    await send(
                        {
                            "type": "BOOKMARK",
                            "object": {"metadata": {"resourceVersion": str(self.rv)}},
                        }
                    )
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), self.bookmark_interval)
        except ConnectionResetError:
            pass
        return resp


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON Merge Patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _selected(request: web.Request, obj: dict[str, Any]) -> bool:
    """``fieldSelector``: only ``spec.nodeName=<node>`` (what the node agent uses);
    ``labelSelector``: equality terms only."""
    labels_wanted = request.query.get("labelSelector")
    if labels_wanted:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for term in labels_wanted.split(","):
            k, eq, v = term.partition("=")
            if not eq or k.endswith("!"):
                raise web.HTTPBadRequest(text=f"label selector not supported: {term}")
            if labels.get(k.strip()) != v.strip():
                return False
    selector = request.query.get("fieldSelector")
    if not selector:
        return True
    field, _, value = selector.partition("=")
    if field != "spec.nodeName":
        raise web.HTTPBadRequest(text=f"field label not supported: {field}")
    return bool((obj.get("spec") or {}).get("nodeName") == value)
