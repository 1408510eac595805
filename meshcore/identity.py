"""Workload identity: the SPIFFE ID ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

Owns: parsing and formatting of workload SPIFFE IDs, and trust-domain validation.

Invariants:
- A `SpiffeId` value is always valid: the constructor validates every part, so code holding one
  never re-checks it. `str(SpiffeId.parse(s)) == s` for every accepted `s` (no normalisation:
  anything that would need normalising is refused).
- Rules follow the SPIFFE ID spec (github.com/spiffe/spiffe, standards/SPIFFE-ID.md):
  §2.1 trust domain = lowercase letters, digits, '.', '-', '_' only (no port, no userinfo);
  §2.2 path segments = letters, digits, '.', '-', '_', never empty, never '.' or '..';
  §2.3 at most 2048 bytes overall, trust domain at most 255 bytes; no query or fragment.
  On top of that, workload IDs in the mesh have exactly the Istio path ``/ns/<ns>/sa/<sa>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshcore.errors import IdentityError

DEFAULT_TRUST_DOMAIN = "cluster.local"

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048  # SPIFFE-ID §2.3
MAX_TRUST_DOMAIN_BYTES = 255  # SPIFFE-ID §2.3

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")  # SPIFFE-ID §2.1
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")  # SPIFFE-ID §2.2


def validate_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a valid SPIFFE trust domain name, else raise IdentityError."""
    if not trust_domain:
        raise IdentityError("trust domain is empty")
    if len(trust_domain.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise IdentityError(
            f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes: {trust_domain[:40]!r}..."
        )
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise IdentityError(
            f"trust domain {trust_domain!r} may only contain lowercase letters, digits, "
            "'.', '-' and '_'"
        )
    return trust_domain


def _validate_segment(kind: str, value: str) -> None:
    if not value:
        raise IdentityError(f"{kind} is empty")
    if value in (".", ".."):
        raise IdentityError(f"{kind} may not be a dot segment: {value!r}")
    if not _SEGMENT_RE.fullmatch(value):
        raise IdentityError(f"{kind} {value!r} may only contain letters, digits, '.', '-' and '_'")


def _authority_and_path(uri: str) -> tuple[str, str]:
    """(trust domain, path without its leading slash) of a ``spiffe://`` URI; the trust
    domain is validated, the path only known to be present."""
    if not uri.startswith(SCHEME):
        raise IdentityError(f"SPIFFE ID must start with {SCHEME!r}: {uri!r}")
    rest = uri[len(SCHEME) :]
    if "?" in rest or "#" in rest:
        raise IdentityError(f"SPIFFE ID may not have a query or fragment: {uri!r}")
    trust_domain, slash, path = rest.partition("/")
    if not trust_domain:
        raise IdentityError(f"SPIFFE ID has no trust domain: {uri!r}")
    if "@" in trust_domain:
        raise IdentityError(f"SPIFFE ID trust domain may not have userinfo: {uri!r}")
    if ":" in trust_domain:
        raise IdentityError(f"SPIFFE ID trust domain may not have a port: {uri!r}")
    validate_trust_domain(trust_domain)
    if not slash or not path:
        raise IdentityError(f"SPIFFE ID has no /ns/<namespace>/sa/<service-account> path: {uri!r}")
    return trust_domain, path


def _workload_path(uri: str, path: str) -> tuple[str, str]:
    """(namespace, service account) of the path ``ns/<ns>/sa/<sa>`` of `uri`."""
    segments = path.split("/")
    if len(segments) < 4:
        raise IdentityError(
            f"SPIFFE ID path must be /ns/<namespace>/sa/<service-account>, got /{path!r}"
        )
    if len(segments) > 4:
        if path.endswith("/"):
            raise IdentityError(f"SPIFFE ID may not have a trailing slash: {uri!r}")
        if "" in segments:
            raise IdentityError(f"SPIFFE ID path has an empty segment: {uri!r}")
        raise IdentityError(
            f"SPIFFE ID has extra path segments after /ns/<namespace>/sa/<service-account>: {uri!r}"
        )
    ns_key, namespace, sa_key, service_account = segments
    if ns_key != "ns":
        raise IdentityError(f"SPIFFE ID path must start with /ns/, got /{ns_key}/: {uri!r}")
    if sa_key != "sa":
        raise IdentityError(f"SPIFFE ID path must have /sa/ after the namespace: {uri!r}")
    return namespace, service_account


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class SpiffeId:
    """A workload identity. Ordering is (trust_domain, namespace, service_account)."""

    trust_domain: str
    """SPIFFE trust domain, e.g. ``cluster.local``."""
    namespace: str
    """Kubernetes namespace of the workload."""
    service_account: str
    """Kubernetes service account of the workload."""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _validate_segment("namespace", self.namespace)
        _validate_segment("service account", self.service_account)
        if len(self.uri.encode()) > MAX_ID_BYTES:
            raise IdentityError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``; raise IdentityError saying what is wrong."""
        if not isinstance(uri, str):
            raise IdentityError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
        if not uri:
            raise IdentityError("SPIFFE ID is empty")
        if len(uri.encode()) > MAX_ID_BYTES:
            raise IdentityError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
        trust_domain, path = _authority_and_path(uri)
        namespace, service_account = _workload_path(uri, path)
        return cls(trust_domain=trust_domain, namespace=namespace, service_account=service_account)

    @property
    def uri(self) -> str:
        """The SPIFFE ID as a URI string (also `str(self)`)."""
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri
