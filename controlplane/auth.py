"""Who is calling: node-proxy authentication for the xDS and CA gRPC services.

Owns: `NodeCredentials` (lab: a shared-secret token per node, read from a YAML file
``{node-name: token}``), the bearer-token extraction from gRPC metadata, and the in-cluster
placeholder `ServiceAccountTokenReview`.

Invariants:
- Tokens are compared in constant time (`hmac.compare_digest`) against every known token, so
  timing does not reveal which node's token a guess is close to.
- A caller without a valid credential is refused (`Unauthenticated`); nothing is granted by
  default. The authenticated node name is the only node identity the services trust; a node
  name claimed in xDS metadata must equal it.
- In-cluster authentication (TokenReview of the ztunnel service account token, plus the pod's
  node from the token's bound-object claims) is a documented TODO: `ServiceAccountTokenReview`
  refuses every caller with a clear message rather than trusting an unverified token.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import yaml

from controlplane.errors import Unauthenticated
from meshcore.errors import ConfigError


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


class ServiceAccountTokenReview:
    """In-cluster authentication by Kubernetes TokenReview: not implemented yet (TODO)."""

    def authenticate(self, token: str | None) -> str:
        raise Unauthenticated(
            "service account token authentication is not implemented yet; "
            "start the control plane with --node-credentials"
        )
