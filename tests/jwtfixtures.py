"""Test-only JWT minting with keys the test generates (RS256, PS256, ES256, EdDSA)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meshcore.jose import b64url_encode

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey


def _b64int(n: int) -> str:
    return b64url_encode(n.to_bytes((n.bit_length() + 7) // 8 or 1, "big"))


def new_key(alg: str) -> PrivateKey:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    return Ed25519PrivateKey.generate()


def jwk(key: PrivateKey, kid: str | None = None, alg: str | None = None) -> dict[str, Any]:
    pub = key.public_key()
    out: dict[str, Any]
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        out = {"kty": "RSA", "n": _b64int(nums.n), "e": _b64int(nums.e)}
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        en = pub.public_numbers()
        size = (pub.curve.key_size + 7) // 8
        crv = {256: "P-256", 384: "P-384", 521: "P-521"}[pub.curve.key_size]
        out = {
            "kty": "EC",
            "crv": crv,
            "x": b64url_encode(en.x.to_bytes(size, "big")),
            "y": b64url_encode(en.y.to_bytes(size, "big")),
        }
    else:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = pub.public_bytes(Encoding.Raw, PublicFormat.Raw)
        out = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    if kid is not None:
        out["kid"] = kid
    if alg is not None:
        out["alg"] = alg
    return out


def jwks(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


def mint(
    key: PrivateKey,
    alg: str,
    claims: dict[str, Any],
    *,
    kid: str | None = None,
    header: dict[str, Any] | None = None,
) -> str:
    head: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        head["kid"] = kid
    head.update(header or {})
    signing = (
        b64url_encode(json.dumps(head).encode()) + "." + b64url_encode(json.dumps(claims).encode())
    )
    data = signing.encode()
    if alg == "none":
        return signing + "."
    sig: bytes
    sizes: dict[str, Callable[[], hashes.HashAlgorithm]] = {
        "256": hashes.SHA256,
        "384": hashes.SHA384,
        "512": hashes.SHA512,
    }
    h = sizes.get(alg[2:], hashes.SHA256)
    if isinstance(key, rsa.RSAPrivateKey):
        if alg.startswith("PS"):
            pad: padding.AsymmetricPadding = padding.PSS(
                mgf=padding.MGF1(h()), salt_length=h().digest_size
            )
        else:
            pad = padding.PKCS1v15()
        sig = key.sign(data, pad, h())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h())))
        size = (key.curve.key_size + 7) // 8
        sig = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    else:
        sig = key.sign(data)
    return signing + "." + b64url_encode(sig)
