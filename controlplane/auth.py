"""Who is calling: node-proxy authentication for the xDS and CA gRPC services.

Owns: `NodeCredentials` (lab: a shared-secret token per node, read from a YAML file
``{node-name: token}``), the bearer-token extraction from gRPC metadata, and the in-cluster
`ServiceAccountTokenReview` (Kubernetes TokenReview of the node proxy's service account token)
with the gRPC interceptor that runs the review before a handler (`auth_interceptors`).

Invariants:
- Tokens are compared in constant time (`hmac.compare_digest`) against every known token, so
  timing does not reveal which node's token a guess is close to.
- A caller without a valid credential is refused (`Unauthenticated`); nothing is granted by
  default. The authenticated node name is the only node identity the services trust; a node
  name claimed in xDS metadata must equal it.
- TokenReview (authentication.k8s.io/v1 ``POST tokenreviews``, "Authenticating" and
  "Service account tokens" in the Kubernetes docs): the caller's bearer token must be
  authenticated by the API server, for the configured audiences if any; its user must be one
  of the node proxy's service accounts (``system:serviceaccount:<ns>:<sa>``, else
  PERMISSION_DENIED); it must be bound to a pod (projected token: ``user.extra``
  ``authentication.kubernetes.io/pod-name``/``pod-uid``). The node is
  ``authentication.kubernetes.io/node-name`` when the API server sets it (Kubernetes 1.30+),
  else the bound pod's ``spec.nodeName`` read from the API (its uid must equal the token's).
- Reviews are asynchronous HTTP; `authenticate()` is synchronous (the CA and xDS services call
  it inside their handlers). The interceptor therefore reviews every call's token first and
  caches the outcome (positive for `cache_ttl`, refusals for `negative_ttl`, keyed by the
  token's SHA-256, one review in flight per token); `authenticate()` only reads that cache.
  API failures are not cached: the next call reviews again.
- Waypoints (``TokenReviewSettings.waypoints``, the in-cluster waypoint controller,
  controlplane/waypoints.py): a token of another service account ``<ns>:<sa>`` is accepted only
  if bound to a pod (same uid) in ``<ns>`` labelled
  ``gateway.networking.k8s.io/gateway-name=<gw>`` whose Gateway ``<ns>/<gw>`` is of class
  ``istio-waypoint`` and runs as ``<sa>`` (its ``gateway.istio.io/service-account`` annotation,
  else its name). Such a caller's node (for xDS) is its pod's; for certificates its principal is
  `waypoint_principal` (``<ns>/<sa>`` behind a prefix no node name has), which
  `restrict_waypoints` allows exactly its own identity: a waypoint never obtains another service
  account's certificate.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import yaml

from controlplane.errors import ControlPlaneError, PermissionDenied, Unauthenticated
from meshcore.errors import ConfigError
from meshcore.kubeapi import KubeApi

log = logging.getLogger(__name__)

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
NODE_NAME = "authentication.kubernetes.io/node-name"
SA_PREFIX = "system:serviceaccount:"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class Authenticator(Protocol):
    def authenticate(self, token: str | None) -> str:
        """The node name the token belongs to; raise Unauthenticated otherwise."""
        ...


class NodeCredentials:
    """Shared-secret node credentials (the lab's node identity)."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        for node, token in tokens.items():
            if not node or len(token) < 16:
                raise ConfigError(f"node-credentials.{node}", "token must be >= 16 characters")
        self._tokens = {node: token.encode() for node, token in tokens.items()}

    @classmethod
    def load(cls, path: Path) -> NodeCredentials:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(str(path), f"cannot read node credentials: {exc}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise ConfigError(str(path), "expected a mapping of node name -> token")
        return cls(data)

    def authenticate(self, token: str | None) -> str:
        if token is None:
            raise Unauthenticated("no credential: send 'authorization: Bearer <node token>'")
        given = token.encode()
        found = None
        for node, secret in self._tokens.items():
            if hmac.compare_digest(given, secret):
                found = node
        if found is None:
            raise Unauthenticated("unknown node credential")
        return found


@dataclass(frozen=True, slots=True, kw_only=True)
class BoundPod:
    """What a TokenReview says about the caller (status.user)."""

    username: str
    namespace: str
    pod_name: str
    pod_uid: str
    node: str
    """From ``authentication.kubernetes.io/node-name``; "" when the API server omits it."""


def _first(extra: Mapping[str, Any], key: str) -> str:
    values = extra.get(key) or []
    return str(values[0]) if isinstance(values, list) and values else ""


def read_review(status: Mapping[str, Any], accounts: Sequence[str]) -> BoundPod:
    """The caller from a TokenReview ``status``; raises Unauthenticated / PermissionDenied."""
    if not status.get("authenticated"):
        reason = status.get("error") or "not authenticated"
        raise Unauthenticated(f"token rejected by the Kubernetes API: {reason}")
    user = status.get("user") or {}
    username = str(user.get("username", ""))
    if username not in accounts:
        raise PermissionDenied(
            f"{username or 'an unnamed user'} is not the node proxy's service account "
            f"(allowed: {', '.join(accounts)})"
        )
    extra = user.get("extra") or {}
    pod_name, pod_uid = _first(extra, POD_NAME), _first(extra, POD_UID)
    if not pod_name:
        raise PermissionDenied(
            f"the token of {username} is not bound to a pod: give the node proxy a projected "
            "service account token (its node is the bound pod's node)"
        )
    namespace = username[len(SA_PREFIX) :].split(":", 1)[0]
    return BoundPod(
        username=username,
        namespace=namespace,
        pod_name=pod_name,
        pod_uid=pod_uid,
        node=_first(extra, NODE_NAME),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Outcome:
    node: str | None
    error: ControlPlaneError | None
    at: float
    waypoint: tuple[str, str] | None = None
    """(namespace, service account) when the caller is a waypoint (certificates: only its own)."""


WAYPOINT_PREFIX = "waypoint\x00"
"""Certificate principals of waypoints; NUL never occurs in a Kubernetes node name."""


def waypoint_principal(namespace: str, service_account: str) -> str:
    return f"{WAYPOINT_PREFIX}{namespace}/{service_account}"


def restrict_waypoints(
    may_impersonate: Callable[[str, Any], bool],
) -> Callable[[str, Any], bool]:
    """`may_impersonate` for the CA: a waypoint principal may have only its own identity (a
    `meshcore.identity.SpiffeId`); node principals are decided by `may_impersonate`."""

    def decide(principal: str, identity: Any) -> bool:
        if principal.startswith(WAYPOINT_PREFIX):
            ns, _, sa = principal[len(WAYPOINT_PREFIX) :].partition("/")
            return bool(identity.namespace == ns and identity.service_account == sa)
        return may_impersonate(principal, identity)

    return decide


class CertificatePrincipals:
    """The CA's view of a `ServiceAccountTokenReview`: waypoints as `waypoint_principal`."""

    def __init__(self, reviewer: ServiceAccountTokenReview) -> None:
        self.reviewer = reviewer

    def authenticate(self, token: str | None) -> str:
        return self.reviewer.certificate_principal(token)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenReviewSettings:
    """Who a `ServiceAccountTokenReview` accepts and how long it remembers an outcome."""

    accounts: tuple[str, ...] = ()
    """The node proxy's service accounts (``system:serviceaccount:<ns>:<sa>``); none: disabled."""
    audiences: tuple[str, ...] = ()
    """Audiences the token must be valid for (none: the API server's default)."""
    waypoints: bool = False
    """Accept waypoint pods' tokens too (see the module doc)."""
    cache_ttl: float = 10.0
    """Seconds a positive outcome is reused."""
    negative_ttl: float = 2.0
    """Seconds a refusal is reused."""
    max_entries: int = 10_000
    """Bound of the outcome cache (expired entries go first, then the oldest)."""


class ServiceAccountTokenReview:
    """In-cluster node-proxy authentication by Kubernetes TokenReview (see module doc)."""

    def __init__(
        self,
        settings: TokenReviewSettings | None = None,
        *,
        kubeconfig: Path | None = None,
        configuration: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or TokenReviewSettings()
        """Replaceable (tests shorten the cache TTL this way)."""
        self.clock = clock
        self.reviews = 0
        """TokenReview requests sent (tests: the cache works)."""
        self._cache: dict[str, _Outcome] = {}
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._kube = KubeApi(kubeconfig=kubeconfig, configuration=configuration)

    @property
    def enabled(self) -> bool:
        return bool(self.settings.accounts)

    # -- the synchronous side (inside gRPC handlers) ----------------------------------------
    def authenticate(self, token: str | None) -> str:
        if not self.settings.accounts:
            raise Unauthenticated(
                "no node authentication configured: start the control plane with "
                "--node-credentials or --token-review-account"
            )
        if token is None:
            raise Unauthenticated(
                "no credential: send 'authorization: Bearer <node proxy service account token>'"
            )
        outcome = self._cache.get(_key(token))
        # The interceptor reviewed this call's token just before; the grace covers the gap.
        if outcome is None or self.clock() - outcome.at > self.settings.cache_ttl + 5.0:
            raise Unauthenticated("token not reviewed (the TokenReview interceptor is missing)")
        if outcome.error is not None:
            raise outcome.error
        assert outcome.node is not None
        return outcome.node

    def certificate_principal(self, token: str | None) -> str:
        """`authenticate`, but a waypoint's token yields its `waypoint_principal`."""
        node = self.authenticate(token)
        assert token is not None
        outcome = self._cache[_key(token)]
        return waypoint_principal(*outcome.waypoint) if outcome.waypoint else node

    # -- the asynchronous side (interceptor) ------------------------------------------------
    async def review(self, token: str) -> None:
        """Make sure a fresh outcome for `token` is cached (one review in flight per token)."""
        key = _key(token)
        while True:
            cached = self._cache.get(key)
            if cached is not None:
                cfg = self.settings
                ttl = cfg.cache_ttl if cached.error is None else cfg.negative_ttl
                if self.clock() - cached.at < ttl:
                    return
            pending = self._inflight.get(key)
            if pending is None:
                break
            # Another call is reviewing this token; if it was cancelled before storing an
            # outcome, the loop reviews again rather than refusing on a missing entry.
            await asyncio.shield(pending)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            outcome = await self._review(token)
            if outcome is not None:
                self._store(key, outcome)
            else:
                # This call is refused with the reason; stored already expired, so the next call
                # asks the API again.
                self._store(
                    key,
                    _Outcome(
                        node=None,
                        error=Unauthenticated(
                            "cannot verify the token: the Kubernetes API did not answer the "
                            "TokenReview (see the control plane's log)"
                        ),
                        at=self.clock() - self.settings.negative_ttl,  # expired for the next call
                    ),
                )
        finally:
            del self._inflight[key]
            fut.set_result(None)

    def _store(self, key: str, outcome: _Outcome) -> None:
        if len(self._cache) >= self.settings.max_entries:
            now = self.clock()
            ttl = self.settings.cache_ttl
            self._cache = {k: o for k, o in self._cache.items() if now - o.at < ttl}
            while len(self._cache) >= self.settings.max_entries:
                self._cache.pop(next(iter(self._cache)))
        self._cache[key] = outcome

    async def _call(self, path: str, method: str, body: Any = None) -> tuple[int, Any]:
        return await self._kube.call(method, path, body, timeout=10)

    async def _review(self, token: str) -> _Outcome | None:
        """The outcome for `token`, or None when the API could not be asked (not cached)."""
        spec: dict[str, Any] = {"token": token}
        if self.settings.audiences:
            spec["audiences"] = list(self.settings.audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        self.reviews += 1
        try:
            status, data = await self._call(
                "/apis/authentication.k8s.io/v1/tokenreviews", "POST", body
            )
            if status != 201 and status != 200:
                log.error("TokenReview: HTTP %d %s", status, data)
                return None
            review = (data or {}).get("status") or {}
            user = str((review.get("user") or {}).get("username", ""))
            if (
                self.settings.waypoints
                and review.get("authenticated")
                and user.startswith(SA_PREFIX)
                and user not in self.settings.accounts
            ):
                return await self._waypoint(read_review(review, [user]))
            bound = read_review(review, self.settings.accounts)
            node = bound.node or await self._pod_node(bound)
            log.info("node proxy %s authenticated: node %s", bound.pod_name, node)
            return _Outcome(node=node, error=None, at=self.clock())
        except ControlPlaneError as err:
            log.warning("node proxy refused: %s", err)
            return _Outcome(node=None, error=err, at=self.clock())
        except Exception as exc:  # network, TLS, JSON: not the caller's fault; not cached
            log.error("TokenReview failed: %s", exc)
            return None

    async def _waypoint(self, bound: BoundPod) -> _Outcome:
        """A waypoint's token (see module doc); raises PermissionDenied if it is not one."""
        sa = bound.username[len(SA_PREFIX) :].split(":", 1)[1]
        pod = await self._bound_pod(bound)
        labels = (pod.get("metadata") or {}).get("labels") or {}
        gw_name = str(labels.get(GATEWAY_NAME_LABEL, ""))
        if not gw_name:
            raise PermissionDenied(
                f"{bound.username} is neither a node proxy's service account nor a waypoint's "
                f"(pod {bound.namespace}/{bound.pod_name} has no {GATEWAY_NAME_LABEL} label)"
            )
        path = f"/apis/gateway.networking.k8s.io/v1/namespaces/{bound.namespace}/gateways/{gw_name}"
        status, gw = await self._call(path, "GET")
        if status == 404:
            raise PermissionDenied(f"waypoint Gateway {bound.namespace}/{gw_name} does not exist")
        if status != 200 or not isinstance(gw, Mapping):
            raise RuntimeError(f"GET {path}: HTTP {status}")
        if (gw.get("spec") or {}).get("gatewayClassName") != "istio-waypoint":
            raise PermissionDenied(f"Gateway {bound.namespace}/{gw_name} is not a waypoint")
        annotations = (gw.get("metadata") or {}).get("annotations") or {}
        runs_as = str(annotations.get("gateway.istio.io/service-account") or gw_name)
        if runs_as != sa:
            raise PermissionDenied(
                f"waypoint {bound.namespace}/{gw_name} runs as {runs_as}, not {sa}"
            )
        node = bound.node or str((pod.get("spec") or {}).get("nodeName") or "")
        if not node:
            raise PermissionDenied(f"pod {bound.namespace}/{bound.pod_name} is not on a node")
        log.info("waypoint %s/%s (pod %s) authenticated", bound.namespace, gw_name, bound.pod_name)
        return _Outcome(node=node, error=None, at=self.clock(), waypoint=(bound.namespace, sa))

    async def _bound_pod(self, bound: BoundPod) -> Mapping[str, Any]:
        path = f"/api/v1/namespaces/{bound.namespace}/pods/{bound.pod_name}"
        status, pod = await self._call(path, "GET")
        if status == 404:
            raise Unauthenticated(f"the token's pod {bound.namespace}/{bound.pod_name} is gone")
        if status != 200 or not isinstance(pod, Mapping):
            raise RuntimeError(f"GET {path}: HTTP {status}")
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        if bound.pod_uid and uid != bound.pod_uid:
            raise Unauthenticated(
                f"the token's pod {bound.namespace}/{bound.pod_name} was replaced (uid {uid})"
            )
        return pod

    async def _pod_node(self, bound: BoundPod) -> str:
        """The bound pod's node (API servers before 1.30 do not put it in the review)."""
        path = f"/api/v1/namespaces/{bound.namespace}/pods/{bound.pod_name}"
        status, pod = await self._call(path, "GET")
        if status == 404:
            raise Unauthenticated(f"the token's pod {bound.namespace}/{bound.pod_name} is gone")
        if status != 200 or not isinstance(pod, Mapping):
            raise RuntimeError(f"GET {path}: HTTP {status}")
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        if bound.pod_uid and uid != bound.pod_uid:
            raise Unauthenticated(
                f"the token's pod {bound.namespace}/{bound.pod_name} was replaced (uid {uid})"
            )
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if not node:
            raise PermissionDenied(f"pod {bound.namespace}/{bound.pod_name} is not on a node")
        return node

    async def close(self) -> None:
        await self._kube.close()


def _key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _ReviewInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Reviews each call's bearer token before its handler runs (then `authenticate` reads the
    cached outcome). Calls without a token pass through: the handler refuses them."""

    def __init__(self, reviewer: ServiceAccountTokenReview) -> None:
        self.reviewer = reviewer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = handler_call_details.invocation_metadata
        token = bearer_token(metadata)
        if token is not None:
            await self.reviewer.review(token)
        return await continuation(handler_call_details)


def auth_interceptors(authenticator: Authenticator) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors `authenticator` needs (TokenReview's asynchronous review)."""
    if isinstance(authenticator, ServiceAccountTokenReview) and authenticator.enabled:
        return [_ReviewInterceptor(authenticator)]
    return []
