"""Translation: store snapshot -> the xDS records node proxies consume (sans-I/O, pure).

Owns: ambient enrollment, Workload and Service records, waypoint binding, AuthorizationPolicy
-> L4 `Authorization`, PeerAuthentication -> L4 `Authorization`, the names of the converted
policies (reserved), per-object warnings, as pure functions of one namespace's objects
(`translate_namespace`); `controlplane.translator` keeps the per-namespace results, produces
deltas and owns the policy-only re-translation (`retranslate_policies`).

Rules (Istio ambient, see docs/reference/ambient-facts.md "Enrollment, labels, waypoints"):
- Enrollment: a pod is in the mesh when its label ``istio.io/dataplane-mode`` is ``ambient``, or
  its namespace's is and the pod's is not ``none``. Every pod with an IP (not host-network, not
  finished) becomes a Workload; mesh pods get ``tunnel_protocol = HBONE``, the others NONE
  (reached in plaintext).
- Workload uid ``<cluster>//Pod/<ns>/<name>``; identity = trust domain + namespace + pod's
  ``serviceAccountName``; locality = its Node's ``topology.kubernetes.io/region``/``zone`` and
  ``topology.istio.io/subzone`` labels (Nodes are cluster-scoped: stored under namespace "");
  services = each Service of the namespace whose selector matches the pod's labels (or whose
  EndpointSlices name the pod), with per-port targets (named target ports resolved against the
  pod's container ports; unresolvable ports are left out).
- Waypoints: ``istio.io/use-waypoint`` (+ optional ``istio.io/use-waypoint-namespace``) on the
  pod, else its ServiceAccount (a waypoint per service account), else its namespace, binds a
  mesh workload; on the Service, else its namespace, binds a service. ``none`` stops
  inheritance. A binding applies only if the waypoint Gateway's ``istio.io/waypoint-for``
  (default ``service``) covers that kind (``workload``/``service``/``all``). Waypoint pods
  themselves (label ``gateway.networking.k8s.io/gateway-name``) never get a waypoint.
- AuthorizationPolicy: root namespace without selector -> GLOBAL; other namespaces without
  selector -> NAMESPACE; with selector -> WORKLOAD_SELECTOR, listed in the matching workloads'
  ``authorization_policies`` (a root-namespace selector policy matches pods of every namespace).
  Policies with targetRef(s) are for waypoints and are not sent to node proxies; AUDIT and
  CUSTOM are not enforced by node proxies (warning).
- L7 attributes in a policy a node proxy enforces (requestPrincipals, remoteIpBlocks, hosts,
  methods, paths, request.* conditions, ...) raise a warning and take the SAFE reading:
  an ALLOW rule with an L7 attribute is dropped (it matches nothing, so it cannot widen access;
  if no rule is left the policy allows nothing); in a DENY rule the L7 attributes are ignored
  (the rule matches on its L4 attributes alone, so it denies more, never less). This is
  Istio's own ztunnel translation.
- Malformed AuthorizationPolicy (rules unreadable): fail closed, i.e. an ALLOW policy with no
  rules in the policy's scope (allows nothing) plus a warning, until it is fixed.
- Malformed PeerAuthentication: fail closed, i.e. STRICT for its scope, plus a warning.
- PeerAuthentication: effective mode per workload = its selector policy, else namespace policy,
  else mesh policy (root namespace, no selector), UNSET inheriting; default PERMISSIVE. STRICT at
  L4 is a DENY of connections without a principal (plaintext) (docs/reference/ambient-facts.md).
  DISABLE is treated like PERMISSIVE by node proxies (they never originate plaintext inside the
  mesh).
  Port-level modes (selector policies only) become per-policy DENY records with port lists.
- Reserved names: the records we convert (``istio_converted_static_strict``, a PeerAuthentication
  ``<name>``'s ``istio_converted_peer_authn_<name>``, a RequestAuthentication's
  ``istio_requestauthn_<name>``) share the xDS key space with AuthorizationPolicies. An
  AuthorizationPolicy named with one of those prefixes would replace one of them or be replaced
  by one (silently): it is enforced fail-closed instead (allows nothing / denies everything,
  the malformed-policy rule above), under the name ``istio_converted_rejected_<name>``, with a
  warning, until it is renamed. The converted records are never displaced.

Invariants: every function here is pure (input records -> output records); equal inputs give
equal outputs. The `Translator` only caches: its result equals translating from scratch.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from controlplane.objects import (
    HTTP3_ANNOTATION,
    KubeService,
    Labels,
    PeerAuthentication,
    Pod,
)
from controlplane.store import NamespaceObjects, StoreSnapshot
from meshcore.config.authorization import (
    REQUEST_AUTHN_PREFIX,
    AuthzPolicy,
    parse_policy,
    to_l4,
)
from meshcore.config.labels import selector_matches, wants_ambient
from meshcore.errors import ConfigError
from meshcore.identity import SpiffeId
from meshcore.model import (
    Action,
    AppProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    Http3Endpoint,
    Locality,
    Match,
    MatchKind,
    NamespacedHostname,
    NetworkAddress,
    Port,
    Rule,
    Scope,
    Service,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    WorkloadType,
)
from meshcore.telemetry import canonical_revision, canonical_service

USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NS = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR = "istio.io/waypoint-for"
# Locality of a pod = its node's labels (Istio: the well-known Kubernetes topology labels and
# Istio's own sub-zone label).
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_CLASS = "istio-waypoint"
HBONE_PORT = 15008
CONVERTED_PREFIX = "istio_converted_"
"""Prefix of the names of the policies we convert (reserved: see "Reserved names" above)."""
STATIC_STRICT = CONVERTED_PREFIX + "static_strict"
"""Name of the shared "STRICT mTLS" DENY policy (in the root namespace)."""
PEER_AUTHN_PREFIX = CONVERTED_PREFIX + "peer_authn_"
"""A port-level PeerAuthentication's DENY policy: this prefix + the PeerAuthentication's name."""
REJECTED_PREFIX = CONVERTED_PREFIX + "rejected_"
"""An AuthorizationPolicy named with a reserved prefix: its fail-closed record's name prefix."""
RESERVED_PREFIXES = (CONVERTED_PREFIX, REQUEST_AUTHN_PREFIX)

Record = Workload | Service | Authorization


@dataclass(frozen=True, slots=True, kw_only=True)
class TranslateOptions:
    cluster_id: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    domain_suffix: str = "cluster.local"
    root_namespace: str = "istio-system"
    network: str = ""


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class ConfigWarning:
    """A problem with one object that did not stop translation."""

    ref: str
    """``Kind ns/name``."""
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshWide:
    """Inputs of every namespace's translation that come from outside the namespace."""

    mesh_mtls: str = "UNSET"
    root_selector_policies: tuple[AuthzPolicy, ...] = ()
    waypoint_for: tuple[tuple[tuple[str, str], str], ...] = ()
    """((namespace, gateway name), istio.io/waypoint-for) of known Gateways."""
    node_localities: tuple[tuple[str, Locality], ...] = ()
    """(node name, locality) of Nodes with topology labels."""

    def locality(self, node: str) -> Locality | None:
        return next((loc for n, loc in self.node_localities if n == node), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespaceResult:
    workloads: Mapping[str, Workload] = field(default_factory=dict)
    services: Mapping[str, Service] = field(default_factory=dict)
    policies: Mapping[str, Authorization] = field(default_factory=dict)
    warnings: tuple[ConfigWarning, ...] = ()
    node_identities: frozenset[tuple[str, str]] = frozenset()
    """(node, service account) of every published workload (running, with an IP, not
    hostNetwork): the CA's impersonation check (controlplane/ca.py)."""


# --------------------------------------------------------------------------------- mesh-wide


def mesh_wide(snapshot: StoreSnapshot, opts: TranslateOptions) -> MeshWide:
    root = snapshot.namespaces.get(opts.root_namespace)
    mode = "UNSET"
    selector_policies: tuple[AuthzPolicy, ...] = ()
    if root is not None:
        mesh_pas = sorted(
            (p for p in root.peer_authentications.values() if p.selector is None),
            key=lambda p: p.name,
        )
        if mesh_pas:
            mode = mesh_pas[0].mode
        selector_policies = tuple(
            p for p in namespace_policies(root) if p.selector is not None and not p.targeted
        )
    gateways = []
    for ns, objs in snapshot.namespaces.items():
        for obj in objs.stored.values():
            if obj.kind == "Gateway":
                gateways.append(((ns, obj.name), dict(obj.labels).get(WAYPOINT_FOR, "service")))
    localities = []
    cluster_scoped = snapshot.namespaces.get("")
    for obj in cluster_scoped.stored.values() if cluster_scoped is not None else ():
        if obj.kind == "Node":
            lab = dict(obj.labels)
            loc = Locality(
                region=lab.get(REGION_LABEL, ""),
                zone=lab.get(ZONE_LABEL, ""),
                subzone=lab.get(SUBZONE_LABEL, ""),
            )
            if loc != Locality():
                localities.append((obj.name, loc))
    return MeshWide(
        mesh_mtls=mode,
        root_selector_policies=selector_policies,
        waypoint_for=tuple(sorted(gateways)),
        node_localities=tuple(sorted(localities, key=lambda x: x[0])),
    )


# --------------------------------------------------------------------------------- helpers


def hostname(name: str, namespace: str, opts: TranslateOptions) -> str:
    return f"{name}.{namespace}.svc.{opts.domain_suffix}"


def _label(labels: Labels, key: str) -> str | None:
    for k, v in labels:
        if k == key:
            return v
    return None


def is_ambient(pod: Pod, ns_labels: Labels) -> bool:
    """Enrollment: `meshcore.config.labels.wants_ambient` (the node agent's rule too)."""
    return wants_ambient(ns_labels, pod.labels)


def _waypoint_ref(labels: Labels, own_ns: str) -> tuple[str, str] | bool | None:
    """(namespace, name) named by the labels; False = explicit "none"; None = not set."""
    name = _label(labels, USE_WAYPOINT)
    if name is None or name == "":
        return None
    if name == "none":
        return False
    return (_label(labels, USE_WAYPOINT_NS) or own_ns, name)


def _resolve_waypoint(
    chain: Iterable[tuple[Labels, str]], kind: str, mesh: MeshWide, opts: TranslateOptions
) -> tuple[GatewayAddress | None, str | None]:
    """First binding in `chain` (most specific first) that is set: (address, None); (None, None)
    if opted out or nothing is set; (None, why) if the waypoint does not serve `kind`."""
    for labels, ns in chain:
        target = _waypoint_ref(labels, ns)
        if target is None:
            continue
        if target is False:
            return None, None
        assert isinstance(target, tuple)
        wns, wname = target
        serves = dict(mesh.waypoint_for).get((wns, wname), "service")
        if serves not in (kind, "all"):
            return None, (
                f"waypoint {wns}/{wname} is for {serves!r} traffic, not {kind}; binding ignored"
            )
        return GatewayAddress(
            hostname=NamespacedHostname(namespace=wns, hostname=hostname(wname, wns, opts))
        ), None
    return None, None


def _app_protocol(port_name: str, app_protocol: str) -> AppProtocol:
    p = (app_protocol or port_name.split("-", 1)[0]).lower()
    if p in ("http", "http1", "http11"):
        return AppProtocol.HTTP11
    if p in ("http2", "h2c", "kubernetes.io/h2c"):
        return AppProtocol.HTTP2
    if p == "grpc":
        return AppProtocol.GRPC
    return AppProtocol.UNKNOWN


def _workload_type(pod: Pod) -> tuple[WorkloadType, str]:
    if pod.owner_kind == "ReplicaSet":
        # Deployment pods are owned by a ReplicaSet named <deployment>-<pod-template-hash>.
        base, dash, _ = pod.owner_name.rpartition("-")
        return WorkloadType.DEPLOYMENT, base if dash else pod.owner_name
    if pod.owner_kind == "Job":
        return WorkloadType.JOB, pod.owner_name
    if pod.owner_kind in ("StatefulSet", "DaemonSet", "Deployment"):
        return WorkloadType.DEPLOYMENT, pod.owner_name
    return WorkloadType.POD, pod.name


def _http3_endpoint(pod: Pod, ref: str, warnings: list[ConfigWarning]) -> Http3Endpoint | None:
    """Our ``ambient-mesh.io/hbone-http3`` annotation -> where the pod's node proxy takes HBONE
    over HTTP/3 (the node's address, status.hostIP). A value we cannot honour is warned about and
    publishes nothing: peers keep HTTP/2 (issue 16)."""
    value = pod.http3.strip()
    if not value or value == "false":
        return None
    port = 15008 if value == "true" else int(value) if value.isdigit() else 0
    if not 0 < port < 65536:
        warnings.append(
            ConfigWarning(ref=ref, message=f"{HTTP3_ANNOTATION}={value!r}: not 'true' or a port")
        )
        return None
    if not pod.host_ip:
        warnings.append(
            ConfigWarning(ref=ref, message=f"{HTTP3_ANNOTATION}: no status.hostIP yet: HTTP/2")
        )
        return None
    return Http3Endpoint(address=ipaddress.ip_address(pod.host_ip), port=port)


def _target_for(pod: Pod, target: int | str) -> int | None:
    if isinstance(target, int):
        return target
    for cp in pod.container_ports:
        if cp.name == target:
            return cp.port
    return None


# --------------------------------------------------------------------------------- services


def translate_service(
    svc: KubeService,
    ns_labels: Labels,
    mesh: MeshWide,
    opts: TranslateOptions,
    warnings: list[ConfigWarning],
) -> Service | None:
    if svc.type == "ExternalName":
        return None
    ref = f"Service {svc.namespace}/{svc.name}"
    ports = []
    seen: set[int] = set()
    for p in svc.ports:
        if p.protocol not in ("TCP", ""):
            continue  # node proxies carry TCP only
        if p.port in seen:
            warnings.append(ConfigWarning(ref=ref, message=f"duplicate port {p.port} ignored"))
            continue
        seen.add(p.port)
        ports.append(
            Port(
                service_port=p.port,
                target_port=p.target_port if isinstance(p.target_port, int) else 0,
                app_protocol=_app_protocol(p.name, p.app_protocol),
            )
        )
    waypoint, problem = _resolve_waypoint(
        ((svc.labels, svc.namespace), (ns_labels, svc.namespace)), "service", mesh, opts
    )
    if problem is not None:
        warnings.append(ConfigWarning(ref=ref, message=problem))
    return Service(
        name=svc.name,
        namespace=svc.namespace,
        hostname=hostname(svc.name, svc.namespace, opts),
        addresses=tuple(
            NetworkAddress(network=opts.network, address=ipaddress.ip_address(ip))
            for ip in svc.cluster_ips
        ),
        ports=tuple(ports),
        waypoint=waypoint,
    )


# --------------------------------------------------------------------------------- policies


def namespace_policies(objs: NamespaceObjects) -> list[AuthzPolicy]:
    """The namespace's AuthorizationPolicies and RequestAuthentications, parsed by the one
    parser (`meshcore.config.authorization`), in name order."""
    out = [ap.policy for ap in objs.authorization_policies.values()]
    for obj in objs.stored.values():
        if obj.kind == "RequestAuthentication" and obj.raw_json:
            try:
                out.append(parse_policy(json.loads(obj.raw_json)))
            except ConfigError:  # metadata was read when the object was stored
                continue
    return sorted(out, key=lambda p: (p.kind, p.name))


def translate_authorization_policy(
    ap: AuthzPolicy, opts: TranslateOptions, warnings: list[ConfigWarning]
) -> Authorization | None:
    """The L4 Authorization a node proxy enforces for `ap` (`to_l4`), or None if node proxies
    do not enforce it (targetRef policies, AUDIT); its warnings are added to `warnings`."""
    ref = f"{ap.kind} {ap.namespace}/{ap.name}"
    name = l4_name(ap)
    if name.startswith(REJECTED_PREFIX):
        # A reserved name (module docstring): fail closed by the malformed-policy rule, under a
        # name no converted record takes.
        reason = f"the name prefix {_reserved_prefix(ap)!r} is reserved for converted policies"
        ap = replace(ap, fail_closed_l4=(*ap.fail_closed_l4, reason))
    pol, notes = to_l4(ap, root_namespace=opts.root_namespace)
    for f in ap.findings:
        warnings.append(ConfigWarning(ref=ref, message=f"[{f.code}] {f.render()}"))
    warnings.extend(ConfigWarning(ref=ref, message=n) for n in notes)
    return pol if pol is None or pol.name == name else replace(pol, name=name)


_NO_PRINCIPAL = Match(not_principals=(StringMatch(kind=MatchKind.PRESENCE),))


def static_strict_policy(opts: TranslateOptions) -> Authorization:
    """DENY of plaintext (no principal): STRICT mTLS at L4."""
    return Authorization(
        name=STATIC_STRICT,
        namespace=opts.root_namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=(Rule(clauses=(Clause(matches=(_NO_PRINCIPAL,)),)),),
    )


def _port_level_policy(pa: PeerAuthentication, base_strict: bool) -> Authorization | None:
    """A DENY of plaintext on exactly the ports where `pa` makes the mode STRICT."""
    strict_ports = tuple(p for p, m in pa.port_modes if m == "STRICT")
    open_ports = tuple(p for p, m in pa.port_modes if m in ("PERMISSIVE", "DISABLE"))
    if base_strict:
        match = Match(not_principals=_NO_PRINCIPAL.not_principals, not_destination_ports=open_ports)
    elif strict_ports:
        match = Match(not_principals=_NO_PRINCIPAL.not_principals, destination_ports=strict_ports)
    else:
        return None
    return Authorization(
        name=peer_authn_policy_name(pa),
        namespace=pa.namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=(Rule(clauses=(Clause(matches=(match,)),)),),
    )


def _effective(*modes: str) -> str:
    for m in modes:
        if m != "UNSET":
            return m
    return "PERMISSIVE"


# --------------------------------------------------------------------------------- namespace


def peer_authn_policy_name(pa: PeerAuthentication) -> str:
    """Name of the DENY record of a port-level (selector) PeerAuthentication."""
    return PEER_AUTHN_PREFIX + pa.name


def reserved_prefix(name: str) -> str | None:
    """The reserved prefix an AuthorizationPolicy's `name` takes (None: not reserved)."""
    return next((p for p in RESERVED_PREFIXES if name.startswith(p)), None)


def _reserved_prefix(ap: AuthzPolicy) -> str | None:
    return reserved_prefix(ap.name) if ap.kind == "AuthorizationPolicy" else None


def l4_name(ap: AuthzPolicy) -> str:
    """Name of the L4 record of `ap`: a RequestAuthentication's is prefixed (see `to_l4`), an
    AuthorizationPolicy with a reserved name is renamed (enforced fail-closed, see "Reserved
    names")."""
    if ap.kind == "RequestAuthentication":
        return REQUEST_AUTHN_PREFIX + ap.name
    return REJECTED_PREFIX + ap.name if _reserved_prefix(ap) is not None else ap.name


@dataclass(frozen=True, slots=True, kw_only=True)
class _PodContext:
    """What every pod of one namespace is translated against (built once per namespace)."""

    objs: NamespaceObjects
    mesh: MeshWide
    opts: TranslateOptions
    ns_labels: Labels
    waypoint_hosts: Mapping[str, str]
    """Waypoint Gateway name -> key of the Service fronting its pods."""
    selector_policies: tuple[tuple[Labels, str], ...]
    """(selector, policy key) of every selector policy that applies in this namespace."""
    ns_mode: str
    """The namespace-wide PeerAuthentication mode (UNSET if none)."""
    pa_selectors: tuple[PeerAuthentication, ...]
    """Selector PeerAuthentications, in name order (the first match wins)."""
    selected: tuple[KubeService, ...]
    """Services with a selector (pods join them by label)."""
    slice_members: Mapping[str, tuple[KubeService, ...]]
    """Pod name -> selector-less Services whose EndpointSlices name the pod."""


def _namespace_services(
    objs: NamespaceObjects,
    ns_labels: Labels,
    mesh: MeshWide,
    opts: TranslateOptions,
    warnings: list[ConfigWarning],
) -> tuple[dict[str, Service], dict[str, str]]:
    """The namespace's Service records, and waypoint Gateway name -> its Service key.

    Waypoint Gateways get a Service <name>.<ns>.svc.<suffix> fronting the waypoint pods (label
    gateway.networking.k8s.io/gateway-name), which node proxies resolve GatewayAddress
    hostnames to (Istio's waypoint Deployment comes with such a Service). A user Service of the
    same name takes precedence."""
    services: dict[str, Service] = {}
    for svc in objs.services.values():
        rec = translate_service(svc, ns_labels, mesh, opts, warnings)
        if rec is not None:
            services[rec.key] = rec
    waypoint_hosts: dict[str, str] = {}
    for obj in objs.stored.values():
        if obj.kind != "Gateway" or obj.gateway_class != WAYPOINT_CLASS:
            continue
        wp = Service(
            name=obj.name,
            namespace=objs.name,
            hostname=hostname(obj.name, objs.name, opts),
            ports=(Port(service_port=HBONE_PORT, target_port=HBONE_PORT),),
        )
        waypoint_hosts[obj.name] = wp.key
        if obj.name not in objs.services:
            services[wp.key] = wp
    return services, waypoint_hosts


def namespace_authorizations(
    objs: NamespaceObjects, mesh: MeshWide, opts: TranslateOptions, warnings: list[ConfigWarning]
) -> tuple[dict[str, Authorization], tuple[tuple[Labels, str], ...]]:
    """The namespace's L4 policies (plus the shared STRICT policy in the root namespace), and
    (selector, policy key) of the selector policies its pods are matched against."""
    root = objs.name == opts.root_namespace
    policies: dict[str, Authorization] = {}
    selector_policies: list[tuple[Labels, str]] = []
    for ap in namespace_policies(objs):
        pol = translate_authorization_policy(ap, opts, warnings)
        if pol is None:
            continue
        policies[pol.key] = pol
        if pol.scope is Scope.WORKLOAD_SELECTOR and ap.selector is not None and not root:
            selector_policies.append((ap.selector, pol.key))
    for ap in mesh.root_selector_policies:  # root-namespace selector policies: every namespace
        if ap.selector is not None:
            selector_policies.append((ap.selector, f"{ap.namespace}/{l4_name(ap)}"))
    if root:
        strict = static_strict_policy(opts)
        policies[strict.key] = strict
    return policies, tuple(selector_policies)


def _namespace_peer_authentication(
    objs: NamespaceObjects, warnings: list[ConfigWarning]
) -> tuple[str, tuple[PeerAuthentication, ...]]:
    """(namespace-wide mode, selector policies in name order); warns about invalid policies
    and extra namespace-wide ones (the first by name wins)."""
    ns = objs.name
    ns_pas = sorted(
        (p for p in objs.peer_authentications.values() if p.selector is None), key=lambda p: p.name
    )
    for peer in objs.peer_authentications.values():
        if peer.error is not None:
            warnings.append(
                ConfigWarning(
                    ref=f"PeerAuthentication {ns}/{peer.name}",
                    message=f"invalid, enforced fail-closed as STRICT until fixed: {peer.error}",
                )
            )
    for extra in ns_pas[1:]:
        warnings.append(
            ConfigWarning(
                ref=f"PeerAuthentication {ns}/{extra.name}",
                message=f"ignored: namespace already has PeerAuthentication {ns_pas[0].name}",
            )
        )
    pa_selectors = sorted(
        (p for p in objs.peer_authentications.values() if p.selector is not None),
        key=lambda p: p.name,
    )
    return (ns_pas[0].mode if ns_pas else "UNSET"), tuple(pa_selectors)


def _slice_members(objs: NamespaceObjects) -> dict[str, tuple[KubeService, ...]]:
    """Pod name -> the selector-less Services whose EndpointSlices name it."""
    members: dict[str, list[KubeService]] = {}
    for sl in objs.slices.values():
        backing = objs.services.get(sl.service_name)
        if backing is None or backing.selector is not None:
            continue
        for ep in sl.endpoints:
            if ep.pod_name:
                members.setdefault(ep.pod_name, []).append(backing)
    return {pod: tuple(svcs) for pod, svcs in members.items()}


def _pod_services(ctx: _PodContext, pod: Pod) -> dict[str, tuple[Port, ...]]:
    """Service key -> per-port targets of every Service `pod` backs (selector, EndpointSlice,
    or the Service fronting its waypoint Gateway)."""
    ns = ctx.objs.name
    svc_ports: dict[str, tuple[Port, ...]] = {}
    members = [s for s in ctx.selected if s.selector and selector_matches(s.selector, pod.labels)]
    for svc in [*members, *ctx.slice_members.get(pod.name, ())]:
        ports = []
        for p in svc.ports:
            target = _target_for(pod, p.target_port)
            if target is not None and p.protocol in ("TCP", ""):
                ports.append(Port(service_port=p.port, target_port=target))
        svc_ports[f"{ns}/{hostname(svc.name, ns, ctx.opts)}"] = tuple(ports)
    gw_name = _label(pod.labels, GATEWAY_NAME)
    if gw_name is not None and gw_name in ctx.waypoint_hosts:
        svc_ports.setdefault(
            ctx.waypoint_hosts[gw_name], (Port(service_port=HBONE_PORT, target_port=HBONE_PORT),)
        )
    return svc_ports


def _pod_waypoint(
    ctx: _PodContext, pod: Pod, ref: str, warnings: list[ConfigWarning]
) -> GatewayAddress | None:
    """The waypoint of a mesh pod: pod, else ServiceAccount, else namespace binding. Waypoint
    pods themselves never get one."""
    if _label(pod.labels, GATEWAY_NAME) is not None:
        return None
    ns = ctx.objs.name
    sa = ctx.objs.service_accounts.get(pod.service_account)
    chain = [(pod.labels, ns)]
    if sa is not None:
        chain.append((sa.labels, ns))
    chain.append((ctx.ns_labels, ns))
    waypoint, problem = _resolve_waypoint(chain, "workload", ctx.mesh, ctx.opts)
    # Namespace-level bindings apply to workloads only if the waypoint serves them; a mismatch
    # there is normal (service waypoints), so it is not warned about.
    explicit = _waypoint_ref(pod.labels, ns) is not None or (
        sa is not None and _waypoint_ref(sa.labels, ns) is not None
    )
    if problem is not None and explicit:
        warnings.append(ConfigWarning(ref=ref, message=problem))
    return waypoint


def _pod_authorizations(
    ctx: _PodContext, pod: Pod, policies: dict[str, Authorization]
) -> tuple[str, ...]:
    """Keys of the selector policies and PeerAuthentication DENY policy that apply to `pod`; a
    port-level PeerAuthentication's DENY policy is added to `policies`."""
    authz = [key for sel, key in ctx.selector_policies if selector_matches(sel, pod.labels)]
    pa = next(
        (
            p
            for p in ctx.pa_selectors
            if p.selector is not None and selector_matches(p.selector, pod.labels)
        ),
        None,
    )
    base = _effective(pa.mode if pa else "UNSET", ctx.ns_mode, ctx.mesh.mesh_mtls)
    if pa is not None and pa.port_modes:
        pol = _port_level_policy(pa, base == "STRICT")
        if pol is not None:
            policies[pol.key] = pol
            authz.append(pol.key)
    elif base == "STRICT":
        authz.append(f"{ctx.opts.root_namespace}/{STATIC_STRICT}")
    return tuple(sorted(set(authz)))


def _pod_status(pod: Pod) -> WorkloadStatus:
    if pod.ready is False or pod.terminating or pod.phase not in ("", "Running"):
        return WorkloadStatus.UNHEALTHY
    return WorkloadStatus.HEALTHY


def _translate_pod(
    ctx: _PodContext, pod: Pod, policies: dict[str, Authorization], warnings: list[ConfigWarning]
) -> Workload | None:
    """The Workload of one running pod with an IP (None, with a warning, if its identity is
    invalid); port-level PeerAuthentication policies it needs are added to `policies`."""
    ns = ctx.objs.name
    opts = ctx.opts
    ref = f"Pod {ns}/{pod.name}"
    ambient = is_ambient(pod, ctx.ns_labels)
    svc_ports = _pod_services(ctx, pod)
    waypoint = _pod_waypoint(ctx, pod, ref, warnings) if ambient else None
    authz = _pod_authorizations(ctx, pod, policies)
    wtype, wname = _workload_type(pod)
    try:
        SpiffeId(trust_domain=opts.trust_domain, namespace=ns, service_account=pod.service_account)
    except Exception as exc:
        warnings.append(ConfigWarning(ref=ref, message=f"skipped: invalid identity: {exc}"))
        return None
    return Workload(
        uid=f"{opts.cluster_id}//Pod/{ns}/{pod.name}",
        name=pod.name,
        namespace=ns,
        addresses=tuple(ipaddress.ip_address(ip) for ip in pod.ips),
        network=opts.network,
        tunnel_protocol=TunnelProtocol.HBONE if ambient else TunnelProtocol.NONE,
        trust_domain=opts.trust_domain,
        service_account=pod.service_account,
        waypoint=waypoint,
        node=pod.node,
        canonical_name=canonical_service(pod.labels, wname),
        canonical_revision=canonical_revision(pod.labels),
        workload_type=wtype,
        workload_name=wname,
        authorization_policies=authz,
        status=_pod_status(pod),
        cluster_id=opts.cluster_id,
        services=tuple(sorted(svc_ports.items())),
        http3=_http3_endpoint(pod, ref, warnings) if ambient else None,
        locality=ctx.mesh.locality(pod.node) if ctx.mesh.node_localities else None,
    )


def translate_namespace(
    objs: NamespaceObjects, mesh: MeshWide, opts: TranslateOptions
) -> NamespaceResult:
    """Every record contributed by one namespace (pure): its Services, its policies, then one
    Workload per running pod with an IP (not host-network)."""
    warnings: list[ConfigWarning] = []
    ns_labels = objs.namespace.labels if objs.namespace is not None else ()
    services, waypoint_hosts = _namespace_services(objs, ns_labels, mesh, opts, warnings)
    policies, selector_policies = namespace_authorizations(objs, mesh, opts, warnings)
    ns_mode, pa_selectors = _namespace_peer_authentication(objs, warnings)
    ctx = _PodContext(
        objs=objs,
        mesh=mesh,
        opts=opts,
        ns_labels=ns_labels,
        waypoint_hosts=waypoint_hosts,
        selector_policies=selector_policies,
        ns_mode=ns_mode,
        pa_selectors=pa_selectors,
        selected=tuple(
            s for s in objs.services.values() if s.selector and s.type != "ExternalName"
        ),
        slice_members=_slice_members(objs),
    )
    workloads: dict[str, Workload] = {}
    node_identities: set[tuple[str, str]] = set()
    for pod in objs.pods.values():
        if pod.host_network or not pod.ips or pod.phase in ("Succeeded", "Failed"):
            continue
        w = _translate_pod(ctx, pod, policies, warnings)
        if w is None:
            continue
        workloads[w.uid] = w
        if pod.node:  # a pod its node proxy serves (the filter above): the CA's check
            node_identities.add((pod.node, pod.service_account))
    return NamespaceResult(
        workloads=MappingProxyType(workloads),
        services=MappingProxyType(services),
        policies=MappingProxyType(policies),
        warnings=tuple(sorted(warnings)),
        node_identities=frozenset(node_identities),
    )
