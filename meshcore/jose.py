"""JOSE for JWT validation: JWK sets (RFC 7517/7518) and JWS compact signatures (RFC 7515).

Owns: `parse_jwks` (a JWKS document -> public keys), `decode_compact` (a token -> header,
payload, signing input, signature, without trusting any of it) and `verify_signature` (one
signature against one key). `waypoint.protocol.jwt` decides what a verified token means.

Algorithms are Envoy's jwt_authn set minus the HMAC ones (a JWKS that carries a shared secret
is refused: it would let anyone holding the JWKS mint tokens): RS256/384/512, PS256/384/512,
ES256/384/512, EdDSA (Ed25519). ``alg: none`` and any other name are rejected (RFC 8725 §3.1:
the algorithm is checked against the key, never taken from the token alone).

Invariants: pure; every input size is bounded (`MAX_JWKS_BYTES`, `MAX_KEYS`, `MAX_TOKEN_BYTES`);
errors are `JoseError` (a `meshcore.errors.MeshError`) with a short reason, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meshcore.errors import JoseError

MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 64
MAX_TOKEN_BYTES = 16 * 1024
"""Bigger tokens are refused before any decoding (Envoy's header limits are 60 KiB in all)."""

_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey

# alg -> (kty, hash, curve) (RFC 7518 §3.1, RFC 8037 §3.1 for EdDSA).
_ALGS: Mapping[str, tuple[str, type[hashes.HashAlgorithm] | None, str]] = {
    "RS256": ("RSA", hashes.SHA256, ""),
    "RS384": ("RSA", hashes.SHA384, ""),
    "RS512": ("RSA", hashes.SHA512, ""),
    "PS256": ("RSA", hashes.SHA256, ""),
    "PS384": ("RSA", hashes.SHA384, ""),
    "PS512": ("RSA", hashes.SHA512, ""),
    "ES256": ("EC", hashes.SHA256, "P-256"),
    "ES384": ("EC", hashes.SHA384, "P-384"),
    "ES512": ("EC", hashes.SHA512, "P-521"),
    "EdDSA": ("OKP", None, "Ed25519"),
}
ALGORITHMS = tuple(_ALGS)

_CURVES: Mapping[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Jwk:
    """One usable public key of a JWKS."""

    kty: str
    kid: str | None
    alg: str | None
    """The key's declared algorithm (None: any algorithm of its type)."""
    crv: str
    key: PublicKey


@dataclass(frozen=True, slots=True, kw_only=True)
class Compact:
    """A JWS in compact serialization, split and decoded but NOT verified."""

    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    signing_input: bytes
    signature: bytes
    payload_b64: str
    """The payload as sent (base64url), for Envoy's ``forward_payload_header``."""


def b64url_decode(text: str) -> bytes:
    """RFC 7515 §2 base64url without padding (padding tolerated, as Envoy does)."""
    if not _B64URL.fullmatch(text):
        raise JoseError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JoseError("not base64url") from None


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(value: object, what: str) -> int:
    if not isinstance(value, str) or not value:
        raise JoseError(f"{what} missing")
    return int.from_bytes(b64url_decode(value), "big")


def _key(item: Mapping[str, Any]) -> Jwk | None:
    """One JWK -> Jwk; None for keys that are not ours to use (other ``use``, other types)."""
    kty = item.get("kty")
    use = item.get("use")
    if use is not None and use != "sig":
        return None
    kid = item.get("kid")
    alg = item.get("alg")
    if (kid is not None and not isinstance(kid, str)) or (alg is not None and alg not in _ALGS):
        return None
    crv = ""
    key: PublicKey
    try:
        if kty == "RSA":
            n, e = _uint(item.get("n"), "n"), _uint(item.get("e"), "e")
            if n.bit_length() < 2048:
                return None  # RFC 7518 §3.3: 2048 bits or larger
            key = rsa.RSAPublicNumbers(e, n).public_key()
        elif kty == "EC":
            crv = str(item.get("crv"))
            if crv not in _CURVES:
                return None
            curve, _size = _CURVES[crv]
            x, y = _uint(item.get("x"), "x"), _uint(item.get("y"), "y")
            key = ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        elif kty == "OKP" and item.get("crv") == "Ed25519":
            crv = "Ed25519"
            key = Ed25519PublicKey.from_public_bytes(b64url_decode(str(item.get("x"))))
        else:
            return None  # "oct" (shared secrets) and unknown types are never used
    except (JoseError, ValueError):
        return None
    if alg is not None and _ALGS[alg][0] != kty:
        return None
    return Jwk(kty=str(kty), kid=kid, alg=alg, crv=crv, key=key)


def parse_jwks(text: str | bytes) -> tuple[Jwk, ...]:
    """A JWKS document (``{"keys": [...]}``) -> its usable signature keys. Raises JoseError
    when the document is unreadable, too big, or has no usable key."""
    if len(text) > MAX_JWKS_BYTES:
        raise JoseError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise JoseError("JWKS is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JoseError("JWKS has no keys list")
    items = doc["keys"]
    if len(items) > MAX_KEYS:
        raise JoseError(f"JWKS has more than {MAX_KEYS} keys")
    keys = tuple(k for k in (_key(i) for i in items if isinstance(i, dict)) if k is not None)
    if not keys:
        raise JoseError("JWKS has no usable signature key (RSA >= 2048, EC P-256/384/521, Ed25519)")
    return keys


def _json_part(text: str, what: str) -> Mapping[str, Any]:
    try:
        value = json.loads(b64url_decode(text))
    except (ValueError, RecursionError):
        raise JoseError(f"Jwt {what} is not JSON") from None
    if not isinstance(value, dict):
        raise JoseError(f"Jwt {what} is not a JSON object")
    return value


def decode_compact(token: str) -> Compact:
    """Split ``header.payload.signature`` (RFC 7515 §7.1) and decode; nothing is verified."""
    if len(token) > MAX_TOKEN_BYTES:
        raise JoseError("Jwt is too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise JoseError("Jwt is not in the form of Header.Payload.Signature")
    header = _json_part(parts[0], "header")
    payload = _json_part(parts[1], "payload")
    alg = header.get("alg")
    if alg not in _ALGS:
        # Includes "none" (RFC 8725 §2.1) and the HMAC algorithms.
        raise JoseError(f"Jwt algorithm {alg!r} is not supported")
    if "crit" in header:
        raise JoseError("Jwt header has crit parameters (not understood)")  # RFC 7515 §4.1.11
    return Compact(
        header=header,
        payload=payload,
        signing_input=f"{parts[0]}.{parts[1]}".encode(),
        signature=b64url_decode(parts[2]),
        payload_b64=parts[1],
    )


def verify_signature(tok: Compact, key: Jwk) -> bool:
    """Whether `key` (of the token's algorithm's type) signed `tok`."""
    alg = str(tok.header["alg"])
    kty, hash_cls, crv = _ALGS[alg]
    if key.kty != kty or (key.alg is not None and key.alg != alg) or (crv and key.crv != crv):
        return False
    try:
        if isinstance(key.key, rsa.RSAPublicKey):
            assert hash_cls is not None
            pad: padding.AsymmetricPadding
            if alg.startswith("PS"):
                pad = padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls().digest_size)
            else:
                pad = padding.PKCS1v15()
            key.key.verify(tok.signature, tok.signing_input, pad, hash_cls())
        elif isinstance(key.key, ec.EllipticCurvePublicKey):
            assert hash_cls is not None
            size = _CURVES[crv][1]
            if len(tok.signature) != 2 * size:  # RFC 7518 §3.4: R || S, fixed width
                return False
            r = int.from_bytes(tok.signature[:size], "big")
            s = int.from_bytes(tok.signature[size:], "big")
            key.key.verify(encode_dss_signature(r, s), tok.signing_input, ec.ECDSA(hash_cls()))
        else:
            key.key.verify(tok.signature, tok.signing_input)
    except InvalidSignature:
        return False
    return True
