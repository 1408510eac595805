"""Request authentication (JWT) at the waypoint, with Istio's RequestAuthentication semantics.

Owns: `extract` (the tokens of a request, per rule location), `authenticate` (verify them and
say what the request becomes: `JwtAuth` for policy, headers to remove/add) and `JwtAuth` (what
``requestPrincipals`` and ``request.auth.*`` see). Keys come from the caller (inline JWKS, or
the waypoint's JWKS cache for ``jwksUri``); the JOSE details are `meshcore.jose`.

Semantics (istio.io "Authentication Policy"/"RequestAuthentication", Envoy jwt_authn, checked
2026):
- No token in any location: the request passes unauthenticated (RequestAuthentication alone
  never denies it; an AuthorizationPolicy with ``requestPrincipals`` can).
- Any token present must verify, else 401: signature with a key of its issuer's JWKS (``kid``
  must match when the token names one), ``iss`` equal to a rule's issuer whose locations hold
  the token (none: 401, fail closed), ``exp``/``nbf`` with Envoy's 60 s clock skew, ``aud``
  containing one of the rule's audiences when it lists any. A rule whose JWKS could not be
  fetched verifies nothing (401 for its tokens: fail closed).
- Principal: ``<iss>/<sub>``; audiences: ``aud`` (string or list); presenter: ``azp``.
- Upstream: the token's header is removed unless ``forwardOriginalToken``; a query parameter
  token stays (Envoy removes header tokens only). Output headers (payload, claims) are removed
  from the client's request first, then set from the verified token only, so a client cannot
  forge them.

Invariants: pure (clock injected as `now`, seconds since the epoch); work per request is bounded
(at most `MAX_TOKENS` tokens, each at most `meshcore.jose.MAX_TOKEN_BYTES`, tried against at
most `meshcore.jose.MAX_KEYS` keys); failures raise `JoseError` with Envoy's wording.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

from meshcore.config.requestauthn import JwtRule, TokenLocation
from meshcore.errors import JoseError
from meshcore.jose import Jwk, decode_compact, verify_signature

CLOCK_SKEW = 60.0
"""Envoy jwt_authn ``clock_skew_seconds`` default."""
MAX_TOKENS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtAuth:
    """The verified token, as policy sees it."""

    issuer: str
    subject: str
    audiences: tuple[str, ...] = ()
    presenter: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def principal(self) -> str:
        return f"{self.issuer}/{self.subject}"

    def claim(self, path: Sequence[str]) -> tuple[str, ...]:
        """String values of a (nested) claim: a string, or the strings of a list."""
        value: Any = self.claims
        for key in path:
            if not isinstance(value, Mapping) or key not in value:
                return ()
            value = value[key]
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(v for v in value if isinstance(v, str))
        return ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    token: str
    location: TokenLocation


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthnResult:
    auth: JwtAuth | None
    """None: no token (unauthenticated, not denied)."""
    headers: tuple[tuple[str, str], ...]
    """The request headers to send upstream."""


def _locations(rules: Sequence[JwtRule]) -> tuple[TokenLocation, ...]:
    out: list[TokenLocation] = []
    for r in rules:
        out += [loc for loc in r.locations if loc not in out]
    return tuple(out)


def _cookies(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        if k != "cookie":
            continue
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(v)
        except CookieError:
            continue
        for name, morsel in jar.items():
            out.setdefault(name, morsel.value)
    return out


def extract(
    rules: Sequence[JwtRule], headers: Sequence[tuple[str, str]], query: str
) -> list[Candidate]:
    """Every token at every location any rule reads (header values with the location's prefix;
    a header without the prefix holds no token for that location, as Envoy)."""
    params = parse_qsl(query, keep_blank_values=True, max_num_fields=1000) if query else []
    cookies: dict[str, str] | None = None
    out: list[Candidate] = []
    for loc in _locations(rules):
        values: list[str] = []
        if loc.kind == "header":
            for k, v in headers:
                if k == loc.name and v.startswith(loc.prefix):
                    values.append(v[len(loc.prefix) :].strip())
        elif loc.kind == "param":
            values = [v for k, v in params if k == loc.name]
        else:
            if cookies is None:
                cookies = _cookies(headers)
            if loc.name in cookies:
                values = [cookies[loc.name]]
        out += [Candidate(token=v, location=loc) for v in values if v]
    return out


def _number(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JoseError(f"Jwt {name} claim is not a number")
    return float(value)


def _audiences(payload: Mapping[str, Any]) -> tuple[str, ...]:
    aud = payload.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


def verify(
    cand: Candidate,
    rules: Sequence[JwtRule],
    keys: Mapping[str, tuple[Jwk, ...] | None],
    now: float,
) -> tuple[JwtRule, JwtAuth, str]:
    """One token -> (its rule, what it says, its base64url payload). Raises JoseError."""
    tok = decode_compact(cand.token)
    iss = tok.payload.get("iss")
    mine = [r for r in rules if r.issuer == iss and cand.location in r.locations]
    if not isinstance(iss, str) or not mine:
        raise JoseError("Jwt issuer is not configured")
    exp, nbf = _number(tok.payload, "exp"), _number(tok.payload, "nbf")
    if exp is not None and now > exp + CLOCK_SKEW:
        raise JoseError("Jwt is expired")
    if nbf is not None and now < nbf - CLOCK_SKEW:
        raise JoseError("Jwt not yet valid")
    aud = _audiences(tok.payload)
    kid = tok.header.get("kid")
    reason = "Jwks doesn't have key to match kid or alg from Jwt"
    for rule in mine:
        if rule.audiences and not set(aud) & set(rule.audiences):
            reason = "Audiences in Jwt are not allowed"
            continue
        jwks = rule.jwks if not rule.jwks_uri else keys.get(rule.jwks_uri)
        if jwks is None:
            reason = "Jwks remote fetch is failed"
            continue
        candidates = [k for k in jwks if kid is None or k.kid == kid]
        if not candidates:
            continue
        if not any(verify_signature(tok, k) for k in candidates):
            reason = "Jwt verification fails"
            continue
        sub, azp = tok.payload.get("sub"), tok.payload.get("azp")
        auth = JwtAuth(
            issuer=iss,
            subject=sub if isinstance(sub, str) else "",
            audiences=aud,
            presenter=azp if isinstance(azp, str) else "",
            claims=tok.payload,
        )
        return rule, auth, tok.payload_b64
    raise JoseError(reason)


def _claim_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        text = value if isinstance(value, str) else json.dumps(value)
        # Never forward what could split a header (RFC 9110 §5.5).
        if text.isprintable() and text.isascii():
            return text
    return None


def authenticate(
    rules: Sequence[JwtRule],
    headers: Sequence[tuple[str, str]],
    query: str,
    keys: Mapping[str, tuple[Jwk, ...] | None],
    now: float,
) -> AuthnResult:
    """Istio semantics (module docstring). Raises JoseError (401) for any bad token."""
    cands = extract(rules, headers, query)
    if len(cands) > MAX_TOKENS:
        raise JoseError("too many Jwt tokens in the request")
    output = {h for r in rules for h in r.output_headers}
    out = [(k, v) for k, v in headers if k not in output]
    first: JwtAuth | None = None
    drop: set[str] = set()
    added: list[tuple[str, str]] = []
    for cand in cands:
        rule, auth, payload = verify(cand, rules, keys, now)
        first = first or auth
        if not rule.forward_original_token and cand.location.kind == "header":
            drop.add(cand.location.name)
        if rule.output_payload_to_header:
            added.append((rule.output_payload_to_header, payload))
        for ch in rule.output_claim_to_headers:
            text = _claim_text(auth.claims.get(ch.claim))
            if text is not None:
                added.append((ch.header, text))
    out = [(k, v) for k, v in out if k not in drop]
    return AuthnResult(auth=first, headers=(*out, *added))


def keys_needed(rules: Sequence[JwtRule], cands: Sequence[Candidate]) -> tuple[JwtRule, ...]:
    """The jwksUri rules whose keys verifying `cands` may need (the caller fetches them)."""
    locs = {c.location for c in cands}
    return tuple(r for r in rules if r.jwks_uri and locs & set(r.locations))
