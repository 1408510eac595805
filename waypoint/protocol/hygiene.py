"""Request hygiene at the waypoint: what a request must look like before routing, policy or an
upstream sees it, for HTTP/1.1 and HTTP/2 alike. Istio's and Envoy's defaults are the contract.

Owns:
- path normalisation (`normalize_target`) as the mesh's `meshcore.config.pathnorm.PathPolicy`
  asks: Istio's meshConfig ``pathNormalization`` (NONE, BASE = Envoy ``normalize_path``,
  MERGE_SLASHES, DECODE_AND_MERGE_SLASHES) and Envoy's ``path_with_escaped_slashes_action``;
- request validation (`check_request`): method, authority, request-target, field values,
  field count (`RequestRejected` with the status and the reason);
- the X-Forwarded-Client-Cert value the waypoint sets (`xfcc_value`, Envoy SANITIZE_SET);
- which trailer fields may be forwarded at all (`forwardable_trailers`).

Invariants:
- Pure functions: same input, same output; no I/O.
- The normalised target is used for routing, for authorization AND is what is forwarded
  (Istio "Authorization Policy Normalization": "The normalized request will be used for both the
  evaluation of authorization policies and the request that is ultimately sent to the backend
  server"), so policy and application never see different paths (CVE-2021-31920 class).
- Normalisation happens once; there is no double decoding (``%252e`` stays ``%252e``).
- ``%00`` anywhere in the path is refused (400) whatever the normalisation setting (Istio).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from meshcore.config.pathnorm import EscapedSlashes, PathNormalization, PathPolicy
from meshcore.errors import MeshError

MAX_HEADERS = 100
"""Envoy's default ``common_http_protocol_options.max_headers_count``."""
MAX_HEADERS_BYTES = 60 * 1024
"""Envoy's default ``max_request_headers_kb`` (60 KiB)."""


class RequestRejected(MeshError):
    """The request is refused before anything else looks at it. `status` is the answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class NormalizedTarget(NamedTuple):
    """A request target after normalisation (a NamedTuple: one per request, see
    `waypoint.protocol.route.RequestInfo`)."""

    target: str
    """Normalised path plus the untouched query (no fragment)."""
    redirect: bool = False
    """UNESCAPE_AND_REDIRECT found escaped slashes: answer a redirect to `target`."""


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_ESCAPED_SLASH = re.compile(r"%(2[Ff]|5[Cc])")
_HEX = "0123456789ABCDEF"


def _decode_unreserved(path: str) -> str:
    """RFC 3986 §6.2.2.2: %-escapes of unreserved characters are decoded, once; the hex
    digits of escapes that stay are upper-cased (§6.2.2.1), as Envoy's normalize_path."""
    if "%" not in path:  # the common case: nothing to decode (no closure, no regex pass)
        return path

    def one(m: re.Match[str]) -> str:
        byte = int(m.group(1), 16)
        if byte in _UNRESERVED:
            return chr(byte)
        return "%" + _HEX[byte >> 4] + _HEX[byte & 15]

    return _ESCAPE.sub(one, path)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path: ``.`` and ``..`` segments are resolved and a
    ``..`` never climbs above the root; a trailing dot segment leaves a trailing slash."""
    if "." not in path:
        return path
    segs = path.split("/")
    out: list[str] = []
    for seg in segs[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/" + "/".join(out)
    if segs[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def normalize_target(target: str, policy: PathPolicy | None = None) -> NormalizedTarget:
    """The target routing, policy and the upstream see. Raises `RequestRejected` (400).

    Order as Envoy's HTTP connection manager (and Istio's normalization doc): escaped slashes
    action, then ``normalize_path`` (decode unreserved escapes, ``\\`` -> ``/``, dot segments,
    RFC 3986 §6 + Envoy), then ``merge_slashes``. The query is not a path and is kept as sent.
    A fragment is not part of a request-target (RFC 9112 §3.2, RFC 9110 §7.1): refused, as
    Envoy does."""
    if target == "*":
        return NormalizedTarget("*")  # asterisk-form (OPTIONS *), RFC 9112 §3.2.4
    policy = policy or PathPolicy()
    if "#" in target:
        raise RequestRejected("fragment in the request-target (RFC 9112 §3.2)")
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        raise RequestRejected(f"request path {path[:40]!r} is not absolute")
    if "%00" in path:
        raise RequestRejected("%00 in the path (Istio: always rejected)")
    redirect = False
    if policy.normalization is not PathNormalization.NONE:
        # (the policy's properties are read only when the path has what they act on)
        action = policy.slashes_action if "%" in path else EscapedSlashes.KEEP_UNCHANGED
        if action is not EscapedSlashes.KEEP_UNCHANGED and _ESCAPED_SLASH.search(path):
            if action is EscapedSlashes.REJECT_REQUEST:
                raise RequestRejected("escaped slash in the path (REJECT_REQUEST)")
            redirect = action is EscapedSlashes.UNESCAPE_AND_REDIRECT
            path = _ESCAPED_SLASH.sub(lambda m: "/" if m.group(1) in ("2F", "2f") else "\\", path)
        path = remove_dot_segments(_decode_unreserved(path).replace("\\", "/"))
        if "//" in path and policy.merge_slashes:
            path = re.sub(r"/{2,}", "/", path)
    return NormalizedTarget(path + sep + query, redirect)


def normalize_path(target: str) -> str:
    """`normalize_target` with Istio's default (BASE)."""
    return normalize_target(target).target


# ---- request validation ------------------------------------------------------------------------

# RFC 9110 §9.1 / §5.6.2: a method is a token; Istio refuses a verb that is not upper case
# ("Authorization Policy Normalization", Method related: 400).
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]+")
# The request-target: visible US-ASCII only (RFC 9112 §3.2, RFC 3986 §2); controls, space, DEL
# and non-ASCII are refused.
_TARGET = re.compile(r"[\x21-\x7e]+")
# Host / :authority: uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2); no userinfo.
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
# RFC 9110 §5.5: field-content is VCHAR / obs-text with SP/HTAB inside; other CTLs are invalid.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_method(method: str) -> None:
    if not _METHOD.fullmatch(method):
        raise RequestRejected(f"method {method[:20]!r} is not an upper-case token")


def check_authority(authority: str) -> None:
    """Raises for userinfo (RFC 9110 §4.2.4: a recipient treats it as an error) or a value that
    is not ``host[:port]``."""
    if "@" in authority:
        raise RequestRejected("userinfo in the authority (RFC 9110 §4.2.4)")
    if not _AUTHORITY.fullmatch(authority):
        raise RequestRejected(f"invalid authority {authority[:40]!r}")


def check_target(target: str) -> None:
    if not _TARGET.fullmatch(target):
        raise RequestRejected("control, space or non-ASCII character in the request-target")


def check_fields(headers: Sequence[tuple[str, str]]) -> None:
    """Field count and size limits (Envoy's defaults: 431) and field values (400)."""
    if len(headers) > MAX_HEADERS:
        raise RequestRejected(f"more than {MAX_HEADERS} header fields", 431)
    size = 0
    for k, v in headers:
        size += len(k) + len(v) + 4
        if _BAD_VALUE.search(v):
            raise RequestRejected(f"control character in the value of {k[:40]!r}")
    if size > MAX_HEADERS_BYTES:
        raise RequestRejected("header section larger than 60 KiB", 431)


def check_request(
    method: str, target: str, authority: str, headers: Sequence[tuple[str, str]]
) -> None:
    """Everything a request must satisfy, whatever the protocol it came in."""
    check_method(method)
    check_target(target)
    check_authority(authority)
    check_fields(headers)


# ---- forwarded identity ------------------------------------------------------------------------

XFCC = "x-forwarded-client-cert"


def xfcc_value(*, by: str, cert_hash: str, uri: str) -> str:
    """Envoy's SANITIZE_SET value with ``set_current_client_cert_details`` {subject, uri} as
    Istio configures it: ``By=<our URI SAN>;Hash=<sha256 hex of the peer certificate>;
    Subject="<subject>";URI=<peer URI SAN>`` (mesh certificates have an empty subject)."""
    return f'By={by};Hash={cert_hash};Subject="";URI={uri}'


# ---- trailers ----------------------------------------------------------------------------------

# RFC 9110 §6.5.1: fields needed before the content (framing, routing, authentication, request
# modifiers, response control, content format) are not to be processed as trailers; the waypoint
# never forwards them there, so nothing downstream can pick them up from the trailer section.
_NOT_IN_TRAILERS = frozenset(
    {
        "authorization",
        "cache-control",
        "connection",
        "content-encoding",
        "content-length",
        "content-range",
        "content-type",
        "cookie",
        "expect",
        "forwarded",
        "host",
        "keep-alive",
        "max-forwards",
        "pragma",
        "proxy-authorization",
        "proxy-connection",
        "range",
        "set-cookie",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "www-authenticate",
        XFCC,
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-envoy-original-path",
        "x-request-id",
    }
)


def forwardable_trailers(trailers: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in trailers if not k.startswith(":") and k not in _NOT_IN_TRAILERS)
