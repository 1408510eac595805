"""RequestAuthentication ``jwtRules`` (Istio security/v1 JWTRule) as parsed.

Owns: `JwtRule`, `TokenLocation`, `ClaimHeader` and `parse_jwt_rules`. Called by the one policy
parser (`meshcore.config.authorization.parse_policy`); the waypoint validates tokens with these
rules (`waypoint.protocol.jwt`).

Semantics (istio.io "RequestAuthentication" and "JWTRule" reference, checked 2026):
- ``issuer`` is required. Keys come from inline ``jwks`` or ``jwksUri`` (http/https); at most one
  (Istio validation). Neither: as Istio ("the public key set is implicitly set from the OpenID
  Connect spec"), the keys are discovered: the issuer must be an http(s) URL, its OpenID
  Provider Configuration is ``<issuer>/.well-known/openid-configuration`` (OpenID Connect
  Discovery 1.0 §4) and its ``jwks_uri`` names the JWKS; the rule carries the configuration URL
  in `JwtRule.jwks_uri` with `JwtRule.discovery` set (the waypoint's cache fetches both).
- Token locations: ``fromHeaders`` (name + prefix, the prefix must be present), ``fromParams``,
  ``fromCookies``. None given: ``Authorization: Bearer <token>`` and the ``access_token`` query
  parameter (Envoy's jwt_authn default, which Istio uses).
- ``forwardOriginalToken`` (default false): the header the token came from is removed before
  the request goes upstream. ``outputPayloadToHeader``: the payload, base64url as sent.
  ``outputClaimToHeaders``: string, number and boolean claims copied into headers.
- ``timeout``: the JWKS fetch timeout (Istio default 5s).

Invariants: pure; inline JWKS are parsed here (a bad one is a ConfigError, reported and failing
closed); header names are lower-case.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from meshcore.config.reader import parse_duration
from meshcore.errors import ConfigError, JoseError
from meshcore.jose import Jwk, parse_jwks

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 §5.6.2 field-name
DEFAULT_JWKS_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLocation:
    """Where a token is read: ``header`` (name + prefix), ``param`` or ``cookie``."""

    kind: str
    name: str
    prefix: str = ""


DEFAULT_LOCATIONS = (
    TokenLocation(kind="header", name="authorization", prefix="Bearer "),
    TokenLocation(kind="param", name="access_token"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimHeader:
    header: str
    claim: str


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: tuple[Jwk, ...] = ()
    """Inline keys (empty: fetched from `jwks_uri`)."""
    jwks_uri: str = ""
    """The JWKS URL; with `discovery`, the issuer's OpenID Provider Configuration URL."""
    discovery: bool = False
    locations: tuple[TokenLocation, ...] = DEFAULT_LOCATIONS
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: tuple[ClaimHeader, ...] = ()
    timeout: float = DEFAULT_JWKS_TIMEOUT

    @property
    def output_headers(self) -> tuple[str, ...]:
        """Headers this rule writes (a client's own copies are removed first)."""
        out = tuple(c.header for c in self.output_claim_to_headers)
        return (self.output_payload_to_header, *out) if self.output_payload_to_header else out


def _map(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected an object, got {type(value).__name__}")
    return value


def _list(value: object, path: str) -> Sequence[Any]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list, got {type(value).__name__}")
    return value


def _text(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a non-empty string, got {value!r}")
    return value


def _header_name(value: object, path: str) -> str:
    text = _text(value, path)
    if not _TOKEN.match(text) or text.startswith(":"):
        raise ConfigError(path, f"{text!r} is not an HTTP header name")
    return text.lower()


def _keys(r: Mapping[str, Any], issuer: str, path: str) -> tuple[tuple[Jwk, ...], str, bool]:
    """(inline keys, JWKS or discovery URL, discovery?) of one rule."""
    jwks: tuple[Jwk, ...] = ()
    uri = ""
    discovery = False
    if r.get("jwks") is not None and r.get("jwksUri") is not None:
        raise ConfigError(path, "only one of jwks and jwksUri may be set")
    if r.get("jwks") is not None:
        try:
            jwks = parse_jwks(_text(r.get("jwks"), f"{path}.jwks"))
        except JoseError as exc:
            raise ConfigError(f"{path}.jwks", str(exc)) from None
    elif r.get("jwksUri") is not None:
        uri = _text(r.get("jwksUri"), f"{path}.jwksUri")
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{path}.jwksUri", f"{uri!r} is not an http(s) URL")
    else:
        parts = urlsplit(issuer)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ConfigError(
                f"{path}.issuer",
                "without jwks or jwksUri the keys are discovered (OpenID Connect Discovery), "
                f"which needs an http(s) issuer URL without a query, not {issuer!r}",
            )
        uri = issuer.rstrip("/") + "/.well-known/openid-configuration"
        discovery = True
    return jwks, uri, discovery


def _rule(value: object, path: str) -> JwtRule:
    r = _map(value, path)
    issuer = _text(r.get("issuer"), f"{path}.issuer")
    audiences = tuple(
        _text(a, f"{path}.audiences[{i}]")
        for i, a in enumerate(_list(r.get("audiences"), f"{path}.audiences"))
    )
    jwks, uri, discovery = _keys(r, issuer, path)
    locations: list[TokenLocation] = []
    for i, h in enumerate(_list(r.get("fromHeaders"), f"{path}.fromHeaders")):
        hp = f"{path}.fromHeaders[{i}]"
        hm = _map(h, hp)
        prefix = hm.get("prefix", "")
        if not isinstance(prefix, str):
            raise ConfigError(f"{hp}.prefix", "expected a string")
        locations.append(
            TokenLocation(
                kind="header", name=_header_name(hm.get("name"), f"{hp}.name"), prefix=prefix
            )
        )
    for i, p in enumerate(_list(r.get("fromParams"), f"{path}.fromParams")):
        locations.append(TokenLocation(kind="param", name=_text(p, f"{path}.fromParams[{i}]")))
    for i, c in enumerate(_list(r.get("fromCookies"), f"{path}.fromCookies")):
        locations.append(TokenLocation(kind="cookie", name=_text(c, f"{path}.fromCookies[{i}]")))
    payload_header = ""
    if r.get("outputPayloadToHeader") is not None:
        payload_header = _header_name(
            r.get("outputPayloadToHeader"), f"{path}.outputPayloadToHeader"
        )
    forward = r.get("forwardOriginalToken", False)
    if not isinstance(forward, bool):
        raise ConfigError(f"{path}.forwardOriginalToken", f"expected a boolean, got {forward!r}")
    claims = []
    for i, c in enumerate(_list(r.get("outputClaimToHeaders"), f"{path}.outputClaimToHeaders")):
        cp = f"{path}.outputClaimToHeaders[{i}]"
        cm = _map(c, cp)
        claims.append(
            ClaimHeader(
                header=_header_name(cm.get("header"), f"{cp}.header"),
                claim=_text(cm.get("claim"), f"{cp}.claim"),
            )
        )
    timeout = DEFAULT_JWKS_TIMEOUT
    if r.get("timeout") is not None:
        timeout = parse_duration(r.get("timeout"), f"{path}.timeout")
        if not 0 < timeout <= 60:
            raise ConfigError(f"{path}.timeout", "must be between 0 and 60s")
    return JwtRule(
        issuer=issuer,
        audiences=audiences,
        jwks=jwks,
        jwks_uri=uri,
        discovery=discovery,
        locations=tuple(locations) or DEFAULT_LOCATIONS,
        output_payload_to_header=payload_header,
        forward_original_token=forward,
        output_claim_to_headers=tuple(claims),
        timeout=timeout,
    )


def parse_jwt_rules(value: object, path: str = "spec.jwtRules") -> tuple[JwtRule, ...]:
    """``spec.jwtRules`` -> rules. Raises ConfigError naming the field."""
    return tuple(_rule(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))
