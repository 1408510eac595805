# ruff: noqa: E501
# (the field table rows are data: one row per line)
"""The field table: every field of every kind the mesh reads, and what we do with it.

Owns: `FIELDS` (kind -> field path -> `FieldSpec`), `UNSUPPORTED_KINDS` (whole kinds we do not
implement), `CONDITION_KEYS` (AuthorizationPolicy ``when`` keys) and `LABELS` (labels and
annotations read). Objects are checked against it by `meshcore.config.findings`, and
``docs/config-fields.md`` is rendered from it by `meshcore.config.fielddoc` (``python -m
meshcore.config.fielddoc`` rewrites it, a unit test checks the committed file is current). This
table is the single source both for the warnings and for the documentation: a field is never
implemented, refused or ignored without a row here.

Statuses:
- ``implemented``: read with Istio's / Gateway API's semantics.
- ``warned``: accepted, not implemented; the object is applied without it and a finding says so.
  Only fields whose absence cannot widen access are ``warned``.
- ``refused``: not implemented. A security object (AuthorizationPolicy) that uses one fails
  closed (its ALLOW rules match nothing, its DENY rules match everything); a routing object
  that uses one is not applied. Always reported.
- an unknown field (no row) is treated as ``refused`` (a misspelt key is never skipped).
AuthorizationPolicy rows also say how node proxies (L4) treat the field: ``l4`` = enforced,
``l7-only`` = Istio's ztunnel rule (an ALLOW rule using it matches nothing; a DENY rule is
enforced on its L4 attributes alone, so it denies more, never less).

Finding codes (`meshcore.config.findings`; ``ambientctl analyze`` prints them; the control plane
serves them on /debug and writes them into the object's status):
- AMB0201 Error: unknown field.
- AMB0202 Error: field refused (not implemented).
- AMB0203 Warning: field accepted but not implemented (ignored).
- AMB0204 Warning/Error: kind not implemented (Error for security kinds, which deny).
- AMB0205 Error: a value the field cannot take (the parser's ConfigError).
- AMB0206 Warning: a value that makes (part of) the object not apply where it is read (for
  example a VirtualService whose gateways do not include ``mesh``).

Invariants: pure data; rows are sorted per kind in the generated table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class Status(enum.Enum):
    IMPLEMENTED = "implemented"
    WARNED = "warned"
    REFUSED = "refused"


class L4(enum.Enum):
    """How node proxies treat an AuthorizationPolicy field."""

    NA = ""
    ENFORCED = "l4"
    L7_ONLY = "l7-only"


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldSpec:
    kind: str
    path: str
    """``spec.rules[].from[].source.principals`` (``[]`` = every list item)."""
    status: Status
    free: bool = False
    """A map with user-chosen keys (labels, headers): keys below are not checked."""
    l4: L4 = L4.NA
    note: str = ""


# ------------------------------------------------------------------------------ the table
#
# One row per line: ``path status [map] [l4|l7-only] -- note``. Paths are relative to the
# object (``spec....``). A `@name` line expands a shared block (see _BLOCKS) under a prefix.

_STRING_MATCH = """
exact implemented
prefix implemented
regex implemented -- full match (RE2 syntax as Envoy; Python re here)
"""

_HEADER_OPS = """
set implemented map
add implemented map
remove implemented
"""

_TRAFFIC_POLICY = """
loadBalancer implemented
loadBalancer.simple implemented -- ROUND_ROBIN, LEAST_REQUEST (LEAST_CONN), RANDOM, PASSTHROUGH
loadBalancer.consistentHash implemented -- a ring of virtual nodes (the first usable endpoint clockwise from the key) or a Maglev table
loadBalancer.consistentHash.httpHeaderName implemented
loadBalancer.consistentHash.httpCookie implemented
loadBalancer.consistentHash.httpCookie.name implemented
loadBalancer.consistentHash.httpCookie.path implemented -- Path of the generated cookie
loadBalancer.consistentHash.httpCookie.ttl implemented -- set: a request without the cookie gets one generated (Set-Cookie name="<hex>"; Max-Age; HttpOnly; 0s: a session cookie), as Envoy
loadBalancer.consistentHash.httpCookie.attributes implemented -- added to the generated cookie (RFC 6265 syntax checked)
loadBalancer.consistentHash.httpCookie.attributes[].name implemented
loadBalancer.consistentHash.httpCookie.attributes[].value implemented -- absent: a bare attribute (Secure)
loadBalancer.consistentHash.useSourceIp implemented -- the downstream peer's IP
loadBalancer.consistentHash.httpQueryParameterName implemented
loadBalancer.consistentHash.ringHash implemented
loadBalancer.consistentHash.ringHash.minimumRingSize implemented -- default 1024; above 65537 served with 65537 (a value warning says so)
loadBalancer.consistentHash.maglev implemented -- a Maglev lookup table (NSDI 2016); an ejected or tried entry re-hashes the key
loadBalancer.consistentHash.maglev.tableSize implemented -- a prime (as Envoy), default 65537, at most 65537
loadBalancer.consistentHash.minimumRingSize implemented -- deprecated form of ringHash.minimumRingSize
loadBalancer.localityLbSetting implemented -- the waypoint's locality (its node's topology labels) is the client's; failover priorities need outlierDetection (as Istio)
loadBalancer.localityLbSetting.enabled implemented -- default true (Istio's mesh default)
loadBalancer.localityLbSetting.distribute implemented -- locality weights x availability (Envoy's 1.4 overprovisioning); excludes failover
loadBalancer.localityLbSetting.distribute[].from implemented -- region[/zone[/subzone]]; '*' or a missing segment matches any (Istio)
loadBalancer.localityLbSetting.distribute[].to implemented map -- weights sum to 100; unlisted localities get none
loadBalancer.localityLbSetting.failover implemented -- priorities: same zone+subzone, zone, region, the failover region, others; Envoy's health spill-over
loadBalancer.localityLbSetting.failover[].from implemented -- region
loadBalancer.localityLbSetting.failover[].to implemented -- region
loadBalancer.localityLbSetting.failoverPriority implemented -- ordered labels (topology.kubernetes.io/region|zone, topology.istio.io/subzone|network, pod labels); label=value: the endpoint's label must have that value (not the client's); with failover: label priority x 5 + locality priority (Istio), region/zone/subzone labels then invalid (Istio validation)
loadBalancer.warmupDurationSecs warned -- slow start is not implemented
loadBalancer.warmup warned -- slow start is not implemented
connectionPool implemented
connectionPool.tcp implemented
connectionPool.tcp.maxConnections implemented
connectionPool.tcp.connectTimeout implemented
connectionPool.tcp.tcpKeepalive warned -- TCP keepalive settings are not applied
connectionPool.tcp.maxConnectionDuration warned -- connections are not closed after a maximum duration
connectionPool.tcp.idleTimeout warned -- TCP idle timeout is not applied
connectionPool.http implemented
connectionPool.http.http1MaxPendingRequests implemented
connectionPool.http.http2MaxRequests implemented
connectionPool.http.maxRequestsPerConnection implemented -- HTTP/1.1 upstream connections
connectionPool.http.maxRetries warned -- the cluster-wide retry budget is not enforced
connectionPool.http.idleTimeout implemented -- idle HTTP/1.1 upstream connections
connectionPool.http.h2UpgradePolicy warned -- HTTP/1.1 upstream connections are not upgraded
connectionPool.http.useClientProtocol warned -- the upstream protocol is chosen by the waypoint
connectionPool.http.maxConcurrentStreams warned -- not applied
outlierDetection implemented
outlierDetection.consecutiveErrors implemented -- deprecated alias of consecutive5xxErrors
outlierDetection.consecutive5xxErrors implemented
outlierDetection.consecutiveGatewayErrors implemented
outlierDetection.consecutiveLocalOriginFailures warned -- local-origin failures are not split
outlierDetection.interval implemented
outlierDetection.baseEjectionTime implemented
outlierDetection.maxEjectionPercent implemented
outlierDetection.minHealthPercent warned -- ejection is not disabled below a healthy percentage
outlierDetection.splitExternalLocalOriginErrors warned -- local-origin failures are not split
tls warned -- the mesh always uses HBONE mTLS between proxies
tunnel refused -- tunnel settings are not implemented
proxyProtocol refused -- PROXY protocol to upstreams is not implemented
"""

_BLOCKS = {
    "string_match": _STRING_MATCH,
    "header_ops": _HEADER_OPS,
    "traffic_policy": _TRAFFIC_POLICY,
}

_POLICY_TARGET = """
group implemented
kind implemented -- Gateway (waypoint), Service, GatewayClass istio-waypoint
name implemented
namespace implemented
"""
_BLOCKS["policy_target"] = _POLICY_TARGET

_BLOCKS["service_parents"] = """
[].group implemented
[].kind implemented -- Service parents (mesh); others are not served by waypoints
[].namespace implemented
[].name implemented
[].port implemented -- GAMMA: only that service port (one port for all Service parents)
[].sectionName refused -- per-listener attachment is not implemented
"""
_BLOCKS["gw_backend"] = """
group implemented
kind implemented -- Service
name implemented
namespace implemented
port implemented
"""
_BLOCKS["gw_header_mod"] = """
set implemented
set[].name implemented
set[].value implemented
add implemented
add[].name implemented
add[].value implemented
remove implemented
"""

_SOURCES = {
    "AuthorizationPolicy": """
spec implemented
spec.selector implemented -- workloads (node proxies) or waypoints (istio.io/gateway-name)
spec.selector.matchLabels implemented map
spec.targetRef implemented
@policy_target spec.targetRef
spec.targetRefs implemented
@policy_target spec.targetRefs[]
spec.action implemented -- ALLOW, DENY; CUSTOM denies what it matches (fail closed); AUDIT never decides
spec.provider implemented -- only with CUSTOM (external authorization is not implemented: denies)
spec.provider.name implemented
spec.rules implemented
spec.rules[].from implemented
spec.rules[].from[].source implemented
spec.rules[].from[].source.principals implemented l4
spec.rules[].from[].source.notPrincipals implemented l4
spec.rules[].from[].source.requestPrincipals implemented l7-only -- <iss>/<sub> of the JWT a RequestAuthentication verified at the waypoint
spec.rules[].from[].source.notRequestPrincipals implemented l7-only -- requests without a verified JWT have no request principal
spec.rules[].from[].source.namespaces implemented l4
spec.rules[].from[].source.notNamespaces implemented l4
spec.rules[].from[].source.serviceAccounts implemented l4 -- <namespace>/<name>, exact
spec.rules[].from[].source.notServiceAccounts implemented l4 -- <namespace>/<name>, exact
spec.rules[].from[].source.ipBlocks implemented l4 -- the peer's source IP; ANDed with remoteIpBlocks
spec.rules[].from[].source.notIpBlocks implemented l4
spec.rules[].from[].source.remoteIpBlocks implemented l7-only -- the original client IP (no trusted X-Forwarded-For hops: the peer IP)
spec.rules[].from[].source.notRemoteIpBlocks implemented l7-only
spec.rules[].to implemented
spec.rules[].to[].operation implemented
spec.rules[].to[].operation.hosts implemented l7-only -- case-insensitive
spec.rules[].to[].operation.notHosts implemented l7-only
spec.rules[].to[].operation.ports implemented l4
spec.rules[].to[].operation.notPorts implemented l4
spec.rules[].to[].operation.methods implemented l7-only
spec.rules[].to[].operation.notMethods implemented l7-only
spec.rules[].to[].operation.paths implemented l7-only -- wildcards and {*}/{**} templates
spec.rules[].to[].operation.notPaths implemented l7-only
spec.rules[].when implemented -- keys: see "Authorization Policy Conditions" below
spec.rules[].when[].key implemented
spec.rules[].when[].values implemented
spec.rules[].when[].notValues implemented
""",
    "RequestAuthentication": """
spec implemented
spec.selector implemented -- a waypoint it selects (istio.io/gateway-name) validates JWTs; other selected workloads are DENIED at L4 (node proxies cannot read HTTP)
spec.selector.matchLabels implemented map
spec.targetRef implemented -- the waypoint validates JWTs for the target
@policy_target spec.targetRef
spec.targetRefs implemented -- the waypoint validates JWTs for the targets
@policy_target spec.targetRefs[]
spec.jwtRules implemented -- an invalid token is 401; a request without token passes (an AuthorizationPolicy with requestPrincipals can require one)
spec.jwtRules[].issuer implemented -- required; a token whose iss has no rule is 401
spec.jwtRules[].audiences implemented -- the token's aud must contain one (none listed: any)
spec.jwtRules[].jwksUri implemented -- fetched by the waypoint (http/https, 256 KiB, cached 20 min; unreachable: tokens of this issuer are 401); neither jwksUri nor jwks: OpenID Connect discovery from <issuer>/.well-known/openid-configuration (as Istio)
spec.jwtRules[].jwks implemented -- RS/PS/ES 256-512, EdDSA; HMAC (oct) keys are never used
spec.jwtRules[].fromHeaders implemented
spec.jwtRules[].fromHeaders[].name implemented
spec.jwtRules[].fromHeaders[].prefix implemented -- must be present
spec.jwtRules[].fromParams implemented -- the parameter stays in the query (as Envoy)
spec.jwtRules[].fromCookies implemented
spec.jwtRules[].outputPayloadToHeader implemented -- base64url payload as sent; a client's own copy is removed
spec.jwtRules[].outputClaimToHeaders implemented -- string, number, boolean claims; a client's own copy is removed
spec.jwtRules[].outputClaimToHeaders[].header implemented
spec.jwtRules[].outputClaimToHeaders[].claim implemented
spec.jwtRules[].forwardOriginalToken implemented -- default false: the token's header is removed upstream
spec.jwtRules[].timeout implemented -- JWKS fetch timeout (default 5s)
""",
    "PeerAuthentication": """
spec implemented
spec.selector implemented
spec.selector.matchLabels implemented map
spec.mtls implemented
spec.mtls.mode implemented -- STRICT denies plaintext at L4; DISABLE acts as PERMISSIVE
spec.portLevelMtls implemented map
""",
    "VirtualService": """
spec implemented
spec.hosts implemented
spec.gateways implemented -- only the mesh (waypoints) is served
spec.exportTo warned -- visibility is not restricted: every waypoint sees the object
spec.http implemented
spec.http[].name implemented
spec.http[].match implemented
spec.http[].match[].name implemented
spec.http[].match[].uri implemented
@string_match spec.http[].match[].uri
spec.http[].match[].scheme implemented
@string_match spec.http[].match[].scheme
spec.http[].match[].method implemented
@string_match spec.http[].match[].method
spec.http[].match[].authority implemented
@string_match spec.http[].match[].authority
spec.http[].match[].headers implemented map
spec.http[].match[].withoutHeaders implemented map
spec.http[].match[].queryParams implemented map
spec.http[].match[].port implemented
spec.http[].match[].sourceLabels implemented map
spec.http[].match[].sourceNamespace implemented
spec.http[].match[].ignoreUriCase implemented
spec.http[].match[].gateways implemented
spec.http[].match[].statPrefix warned -- per-route stats are not emitted
spec.http[].route implemented
spec.http[].route[].destination implemented
spec.http[].route[].destination.host implemented
spec.http[].route[].destination.subset implemented
spec.http[].route[].destination.port implemented
spec.http[].route[].destination.port.number implemented
spec.http[].route[].weight implemented
spec.http[].route[].headers implemented
spec.http[].route[].headers.request implemented
@header_ops spec.http[].route[].headers.request
spec.http[].route[].headers.response implemented
@header_ops spec.http[].route[].headers.response
spec.http[].redirect implemented
spec.http[].redirect.uri implemented
spec.http[].redirect.authority implemented
spec.http[].redirect.port implemented
spec.http[].redirect.derivePort refused -- derivePort is not implemented
spec.http[].redirect.scheme implemented
spec.http[].redirect.redirectCode implemented
spec.http[].directResponse implemented
spec.http[].directResponse.status implemented
spec.http[].directResponse.body implemented
spec.http[].directResponse.body.string implemented
spec.http[].directResponse.body.bytes refused -- only string bodies are implemented
spec.http[].delegate refused -- delegate VirtualServices are not implemented
spec.http[].rewrite implemented
spec.http[].rewrite.uri implemented
spec.http[].rewrite.authority implemented
spec.http[].rewrite.uriRegexRewrite implemented
spec.http[].rewrite.uriRegexRewrite.match implemented
spec.http[].rewrite.uriRegexRewrite.rewrite implemented
spec.http[].timeout implemented
spec.http[].retries implemented
spec.http[].retries.attempts implemented
spec.http[].retries.perTryTimeout implemented
spec.http[].retries.retryOn implemented
spec.http[].retries.retryRemoteLocalities implemented -- a retry leaves the locality priorities already tried (Envoy previous_priorities)
spec.http[].retries.retryIgnorePreviousHosts warned -- a retry may pick the same endpoint
spec.http[].retries.backoff warned -- Envoy's default backoff (25 ms base) is used
spec.http[].fault implemented
spec.http[].fault.delay implemented
spec.http[].fault.delay.fixedDelay implemented
spec.http[].fault.delay.percentage implemented
spec.http[].fault.delay.percentage.value implemented
spec.http[].fault.delay.percent implemented
spec.http[].fault.delay.exponentialDelay refused -- not implemented
spec.http[].fault.abort implemented
spec.http[].fault.abort.httpStatus implemented
spec.http[].fault.abort.grpcStatus refused -- only httpStatus aborts are implemented
spec.http[].fault.abort.http2Error refused -- only httpStatus aborts are implemented
spec.http[].fault.abort.percentage implemented
spec.http[].fault.abort.percentage.value implemented
spec.http[].mirror implemented
spec.http[].mirror.host implemented
spec.http[].mirror.subset implemented
spec.http[].mirror.port implemented
spec.http[].mirror.port.number implemented
spec.http[].mirrorPercent implemented
spec.http[].mirrorPercentage implemented
spec.http[].mirrorPercentage.value implemented
spec.http[].mirrors implemented
spec.http[].mirrors[].destination implemented
spec.http[].mirrors[].destination.host implemented
spec.http[].mirrors[].destination.subset implemented
spec.http[].mirrors[].destination.port implemented
spec.http[].mirrors[].destination.port.number implemented
spec.http[].mirrors[].percentage implemented
spec.http[].mirrors[].percentage.value implemented
spec.http[].corsPolicy implemented -- Envoy's CORS filter: allowed preflights answered by the waypoint
spec.http[].corsPolicy.allowOrigins implemented
@string_match spec.http[].corsPolicy.allowOrigins[]
spec.http[].corsPolicy.allowOrigin implemented -- deprecated: exact origins
spec.http[].corsPolicy.allowMethods implemented
spec.http[].corsPolicy.allowHeaders implemented
spec.http[].corsPolicy.exposeHeaders implemented
spec.http[].corsPolicy.maxAge implemented
spec.http[].corsPolicy.allowCredentials implemented
spec.http[].corsPolicy.unmatchedPreflights implemented -- FORWARD (default) or IGNORE
spec.http[].headers implemented
spec.http[].headers.request implemented
@header_ops spec.http[].headers.request
spec.http[].headers.response implemented
@header_ops spec.http[].headers.response
spec.tcp warned -- TCP routes are not applied by the waypoint
spec.tls warned -- TLS routes are not applied by the waypoint
""",
    "DestinationRule": """
spec implemented
spec.host implemented
spec.exportTo warned -- visibility is not restricted: every waypoint sees the object
spec.workloadSelector refused -- workload-scoped DestinationRules are not implemented
spec.trafficPolicy implemented
@traffic_policy spec.trafficPolicy
spec.trafficPolicy.portLevelSettings implemented
spec.trafficPolicy.portLevelSettings[].port implemented
spec.trafficPolicy.portLevelSettings[].port.number implemented
@traffic_policy spec.trafficPolicy.portLevelSettings[]
spec.subsets implemented
spec.subsets[].name implemented
spec.subsets[].labels implemented map
spec.subsets[].trafficPolicy implemented
@traffic_policy spec.subsets[].trafficPolicy
spec.subsets[].trafficPolicy.portLevelSettings implemented
spec.subsets[].trafficPolicy.portLevelSettings[].port implemented
spec.subsets[].trafficPolicy.portLevelSettings[].port.number implemented
@traffic_policy spec.subsets[].trafficPolicy.portLevelSettings[]
""",
    "HTTPRoute": """
spec implemented
spec.parentRefs implemented
spec.parentRefs[].group implemented
spec.parentRefs[].kind implemented -- Service parents (mesh); others are not served by waypoints
spec.parentRefs[].namespace implemented
spec.parentRefs[].name implemented
spec.parentRefs[].port implemented -- GAMMA: only that service port (one port for all Service parents)
spec.parentRefs[].sectionName refused -- per-listener attachment is not implemented
spec.hostnames warned -- ignored for Service parents (the Service decides)
spec.rules implemented
spec.rules[].name implemented
spec.rules[].matches implemented
spec.rules[].matches[].path implemented
spec.rules[].matches[].path.type implemented
spec.rules[].matches[].path.value implemented
spec.rules[].matches[].headers implemented
spec.rules[].matches[].headers[].type implemented
spec.rules[].matches[].headers[].name implemented
spec.rules[].matches[].headers[].value implemented
spec.rules[].matches[].queryParams implemented
spec.rules[].matches[].queryParams[].type implemented
spec.rules[].matches[].queryParams[].name implemented
spec.rules[].matches[].queryParams[].value implemented
spec.rules[].matches[].method implemented
spec.rules[].filters implemented
spec.rules[].filters[].type implemented
spec.rules[].filters[].requestHeaderModifier implemented
spec.rules[].filters[].requestHeaderModifier.set implemented
spec.rules[].filters[].requestHeaderModifier.set[].name implemented
spec.rules[].filters[].requestHeaderModifier.set[].value implemented
spec.rules[].filters[].requestHeaderModifier.add implemented
spec.rules[].filters[].requestHeaderModifier.add[].name implemented
spec.rules[].filters[].requestHeaderModifier.add[].value implemented
spec.rules[].filters[].requestHeaderModifier.remove implemented
spec.rules[].filters[].responseHeaderModifier implemented
spec.rules[].filters[].responseHeaderModifier.set implemented
spec.rules[].filters[].responseHeaderModifier.set[].name implemented
spec.rules[].filters[].responseHeaderModifier.set[].value implemented
spec.rules[].filters[].responseHeaderModifier.add implemented
spec.rules[].filters[].responseHeaderModifier.add[].name implemented
spec.rules[].filters[].responseHeaderModifier.add[].value implemented
spec.rules[].filters[].responseHeaderModifier.remove implemented
spec.rules[].filters[].urlRewrite implemented
spec.rules[].filters[].urlRewrite.hostname implemented
spec.rules[].filters[].urlRewrite.path implemented
spec.rules[].filters[].urlRewrite.path.type implemented
spec.rules[].filters[].urlRewrite.path.replaceFullPath implemented
spec.rules[].filters[].urlRewrite.path.replacePrefixMatch implemented
spec.rules[].filters[].requestRedirect implemented
spec.rules[].filters[].requestRedirect.scheme implemented
spec.rules[].filters[].requestRedirect.hostname implemented
spec.rules[].filters[].requestRedirect.path implemented
spec.rules[].filters[].requestRedirect.path.type implemented
spec.rules[].filters[].requestRedirect.path.replaceFullPath implemented
spec.rules[].filters[].requestRedirect.path.replacePrefixMatch implemented
spec.rules[].filters[].requestRedirect.port implemented
spec.rules[].filters[].requestRedirect.statusCode implemented
spec.rules[].filters[].requestMirror implemented
spec.rules[].filters[].requestMirror.backendRef implemented
spec.rules[].filters[].requestMirror.backendRef.group implemented
spec.rules[].filters[].requestMirror.backendRef.kind implemented
spec.rules[].filters[].requestMirror.backendRef.name implemented
spec.rules[].filters[].requestMirror.backendRef.namespace implemented
spec.rules[].filters[].requestMirror.backendRef.port implemented
spec.rules[].filters[].requestMirror.percent implemented
spec.rules[].filters[].requestMirror.fraction implemented -- numerator/denominator (default 100); exclusive with percent
spec.rules[].filters[].requestMirror.fraction.numerator implemented
spec.rules[].filters[].requestMirror.fraction.denominator implemented
spec.rules[].filters[].extensionRef refused -- extension filters are not implemented
spec.rules[].filters[].cors implemented -- Envoy's CORS filter: allowed preflights answered by the waypoint
spec.rules[].filters[].cors.allowOrigins implemented -- *, exact, or scheme://*.host
spec.rules[].filters[].cors.allowMethods implemented
spec.rules[].filters[].cors.allowHeaders implemented
spec.rules[].filters[].cors.exposeHeaders implemented
spec.rules[].filters[].cors.maxAge implemented -- seconds (default 5)
spec.rules[].filters[].cors.allowCredentials implemented
spec.rules[].backendRefs implemented
spec.rules[].backendRefs[].group implemented
spec.rules[].backendRefs[].kind implemented
spec.rules[].backendRefs[].name implemented
spec.rules[].backendRefs[].namespace implemented
spec.rules[].backendRefs[].port implemented
spec.rules[].backendRefs[].weight implemented
spec.rules[].backendRefs[].filters refused -- per-backend filters are not implemented
spec.rules[].timeouts implemented
spec.rules[].timeouts.request implemented
spec.rules[].timeouts.backendRequest implemented
spec.rules[].retry implemented -- GEP-1731; connection failures are always retried
spec.rules[].retry.attempts implemented
spec.rules[].retry.codes implemented -- 400..599
spec.rules[].retry.backoff implemented -- base interval (Envoy: full jitter, x2, cap 10x)
spec.rules[].sessionPersistence warned -- session persistence is not implemented (no stickiness)
""",
    "GRPCRoute": """
spec implemented
spec.parentRefs implemented
@service_parents spec.parentRefs
spec.hostnames warned -- ignored for Service parents (the Service decides)
spec.rules implemented
spec.rules[].name implemented
spec.rules[].matches implemented
spec.rules[].matches[].method implemented -- :path /service/method
spec.rules[].matches[].method.type implemented -- Exact, RegularExpression
spec.rules[].matches[].method.service implemented
spec.rules[].matches[].method.method implemented
spec.rules[].matches[].headers implemented
spec.rules[].matches[].headers[].type implemented
spec.rules[].matches[].headers[].name implemented
spec.rules[].matches[].headers[].value implemented
spec.rules[].filters implemented
spec.rules[].filters[].type implemented
spec.rules[].filters[].requestHeaderModifier implemented
@gw_header_mod spec.rules[].filters[].requestHeaderModifier
spec.rules[].filters[].responseHeaderModifier implemented
@gw_header_mod spec.rules[].filters[].responseHeaderModifier
spec.rules[].filters[].requestMirror implemented
spec.rules[].filters[].requestMirror.backendRef implemented
@gw_backend spec.rules[].filters[].requestMirror.backendRef
spec.rules[].filters[].requestMirror.percent implemented
spec.rules[].filters[].requestMirror.fraction implemented -- numerator/denominator (default 100); exclusive with percent
spec.rules[].filters[].requestMirror.fraction.numerator implemented
spec.rules[].filters[].requestMirror.fraction.denominator implemented
spec.rules[].filters[].extensionRef refused -- extension filters are not implemented
spec.rules[].backendRefs implemented
@gw_backend spec.rules[].backendRefs[]
spec.rules[].backendRefs[].weight implemented
spec.rules[].backendRefs[].filters refused -- per-backend filters are not implemented
spec.rules[].sessionPersistence warned -- session persistence is not implemented (no stickiness)
""",
    "TCPRoute": """
spec implemented -- connections to the parent Services are carried L4 through the waypoint
spec.parentRefs implemented
@service_parents spec.parentRefs
spec.rules implemented -- one rule (Gateway API)
spec.rules[].name implemented
spec.rules[].backendRefs implemented -- weighted; all weights 0: connections are refused
@gw_backend spec.rules[].backendRefs[]
spec.rules[].backendRefs[].weight implemented
""",
    "TLSRoute": """
spec implemented -- passthrough: routed by the ClientHello's SNI, never terminated
spec.parentRefs implemented
@service_parents spec.parentRefs
spec.hostnames implemented -- exact or *.suffix SNI; none: any
spec.rules implemented
spec.rules[].name implemented
spec.rules[].backendRefs implemented -- weighted
@gw_backend spec.rules[].backendRefs[]
spec.rules[].backendRefs[].weight implemented
""",
    "HTTPLocalRateLimitPolicy": """
spec implemented -- Linkerd's policy.linkerd.io/v1alpha1 shape (see meshcore/config/ratelimit.py); CRD in the chart, watched in Kubernetes; 429 and admitted responses carry x-ratelimit-* (Envoy DRAFT_VERSION_03)
spec.targetRef implemented -- Service (per service), HTTPRoute (per route), Gateway (the waypoint)
spec.targetRef.group implemented
spec.targetRef.kind implemented
spec.targetRef.name implemented
spec.targetRef.namespace implemented -- the policy's own
spec.targetRef.sectionName implemented -- HTTPRoute rule name
spec.total implemented
spec.total.requestsPerSecond implemented -- one token bucket for all clients (burst = 1 s)
spec.identity implemented
spec.identity.requestsPerSecond implemented -- one bucket per verified client identity
spec.overrides implemented
spec.overrides[].requestsPerSecond implemented -- instead of identity for the listed clients
spec.overrides[].clientRefs implemented
spec.overrides[].clientRefs[].group implemented
spec.overrides[].clientRefs[].kind implemented -- ServiceAccount
spec.overrides[].clientRefs[].name implemented
spec.overrides[].clientRefs[].namespace implemented
""",
    "Gateway": """
spec implemented
spec.gatewayClassName implemented -- istio-waypoint only (ingress gateways are not implemented)
spec.listeners implemented
spec.listeners[].name implemented
spec.listeners[].port implemented -- 15008 HBONE
spec.listeners[].protocol implemented -- HBONE
spec.listeners[].hostname warned -- not used by waypoints
spec.listeners[].allowedRoutes warned -- not used by waypoints
spec.listeners[].tls refused -- waypoints terminate HBONE only
spec.addresses refused -- waypoints get their address from their Service
spec.infrastructure implemented
spec.infrastructure.labels implemented map
spec.infrastructure.annotations implemented map
spec.infrastructure.parametersRef refused -- not implemented
""",
}

UNSUPPORTED_KINDS: Mapping[str, tuple[str, str]] = {
    # kind -> (level, what happens)
    "ServiceEntry": ("Warning", "ServiceEntry is not implemented by ambient-mesh: ignored"),
    "Telemetry": (
        "Warning",
        "Telemetry is not implemented by ambient-mesh: ignored (standard metrics are kept)",
    ),
    "Gateway.networking.istio.io": (
        "Warning",
        "Istio Gateway is not implemented by ambient-mesh: ignored",
    ),
    "Gateway.ingress": (
        "Warning",
        "only waypoint Gateways (class istio-waypoint) are implemented by ambient-mesh: ignored",
    ),
    "WorkloadEntry": ("Warning", "WorkloadEntry is not implemented by ambient-mesh: ignored"),
    "Sidecar": ("Warning", "Sidecar is not implemented by ambient-mesh (ambient): ignored"),
    "EnvoyFilter": ("Warning", "EnvoyFilter is not implemented by ambient-mesh: ignored"),
    "WasmPlugin": ("Warning", "WasmPlugin is not implemented by ambient-mesh: ignored"),
}


def _expand(kind: str, text: str, prefix: str = "") -> list[FieldSpec]:
    rows: list[FieldSpec] = []
    for raw in text.strip().splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("@"):
            block, where = line[1:].split()
            rows += _expand(kind, _BLOCKS[block], f"{prefix}{where}.")
            continue
        head, _, note = line.partition(" -- ")
        parts = head.split()
        path, status, flags = parts[0], Status(parts[1]), parts[2:]
        if path.startswith("[") and prefix.endswith("."):
            path = prefix[:-1] + path  # a block of list items: ``spec.parentRefs[].name``
            prefix_used = ""
        else:
            prefix_used = prefix
        l4 = L4.NA
        if "l4" in flags:
            l4 = L4.ENFORCED
        elif "l7-only" in flags:
            l4 = L4.L7_ONLY
        rows.append(
            FieldSpec(
                kind=kind,
                path=prefix_used + path,
                status=status,
                free="map" in flags,
                l4=l4,
                note=note.strip(),
            )
        )
    return rows


def _build() -> dict[str, dict[str, FieldSpec]]:
    out: dict[str, dict[str, FieldSpec]] = {}
    for kind, text in _SOURCES.items():
        rows = _expand(kind, text)
        table: dict[str, FieldSpec] = {}
        for row in rows:
            assert row.path not in table, f"duplicate row {kind} {row.path}"
            table[row.path] = row
        out[kind] = table
    return out


FIELDS: Mapping[str, Mapping[str, FieldSpec]] = _build()

# Istio "Authorization Policy Conditions" (istio.io/latest/docs/reference/config/security/
# conditions/), and for L4 istio.io "Ambient: Layer 4 authorization policy" (ztunnel evaluates
# source.ip, source.namespace, source.principal, destination.ip, destination.port).
CONDITION_KEYS: Mapping[str, tuple[Status, L4, str]] = {
    "request.headers[<name>]": (Status.IMPLEMENTED, L4.L7_ONLY, "HTTP request header"),
    "source.ip": (Status.IMPLEMENTED, L4.ENFORCED, "peer IP or CIDR"),
    "remote.ip": (
        Status.IMPLEMENTED,
        L4.L7_ONLY,
        "original client IP (no trusted XFF hops: peer IP)",
    ),
    "source.namespace": (Status.IMPLEMENTED, L4.ENFORCED, "needs mTLS"),
    "source.principal": (Status.IMPLEMENTED, L4.ENFORCED, "needs mTLS"),
    "destination.ip": (Status.IMPLEMENTED, L4.ENFORCED, "IP or CIDR"),
    "destination.port": (Status.IMPLEMENTED, L4.ENFORCED, "0..65535"),
    "request.auth.principal": (Status.IMPLEMENTED, L4.L7_ONLY, "<iss>/<sub> of the verified JWT"),
    "request.auth.audiences": (Status.IMPLEMENTED, L4.L7_ONLY, "any aud of the verified JWT"),
    "request.auth.presenter": (Status.IMPLEMENTED, L4.L7_ONLY, "azp of the verified JWT"),
    "request.auth.claims[<name>]": (
        Status.IMPLEMENTED,
        L4.L7_ONLY,
        "string claim, or any string of a list claim; nested: claims[a][b]",
    ),
    "connection.sni": (Status.REFUSED, L4.L7_ONLY, "no SNI inside HBONE"),
    "experimental.envoy.filters.*": (Status.REFUSED, L4.L7_ONLY, "Envoy-specific"),
}


# Labels and annotations the mesh reads on Kubernetes objects (docs/reference/ambient-facts.md
# "Enrollment, labels, waypoints"): key -> (objects, allowed values (empty: any), meaning).
LABELS: Mapping[str, tuple[str, tuple[str, ...], str]] = {
    "istio.io/dataplane-mode": (
        "Namespace, Pod",
        (),
        "ambient enrolls; on a pod any other value (none...) opts out (Istio); other values are "
        "reported by analyze as AMB0101",
    ),
    "istio.io/use-waypoint": (
        "Namespace, Pod, Service, ServiceAccount",
        (),
        "name of the waypoint Gateway; none stops inheritance",
    ),
    "istio.io/use-waypoint-namespace": (
        "Namespace, Pod, Service, ServiceAccount",
        (),
        "namespace of that Gateway",
    ),
    "istio.io/waypoint-for": (
        "Gateway",
        ("service", "workload", "all", "none"),
        "traffic the waypoint serves (default service)",
    ),
    "gateway.networking.k8s.io/gateway-name": ("Pod", (), "marks waypoint pods (never bound)"),
    "istio.io/gateway-name": ("Pod", (), "selector-form policies that target a waypoint"),
    "ambient.istio.io/redirection (annotation)": (
        "Pod",
        ("enabled", "disabled"),
        "set by the node agent; disabled opts a pod out",
    ),
    "kubernetes.io/service-name": ("EndpointSlice", (), "the Service of the slice"),
}
