"""The mesh's path settings: Istio meshConfig ``pathNormalization`` and Envoy's
``path_with_escaped_slashes_action`` (`PathPolicy`), as the control plane reads them from its
flags/mesh config and sends them to waypoints (`meshcore.proto.l7res`) and as the waypoint
applies them (`waypoint.protocol.hygiene.normalize_target`).

It lives in the shared core, not with the waypoint, because two processes read it: the control
plane (parses and encodes it) and the waypoint (decodes and applies it).

Invariants: pure; `PathPolicy.parse` accepts exactly the setting names (Istio's ``DEFAULT`` and
Envoy's ``IMPLEMENTATION_SPECIFIC_DEFAULT`` included), anything else is a `ValueError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PathNormalization(enum.Enum):
    """Istio ``meshConfig.pathNormalization.normalization`` (DEFAULT is BASE)."""

    NONE = "NONE"
    BASE = "BASE"
    MERGE_SLASHES = "MERGE_SLASHES"
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"


class EscapedSlashes(enum.Enum):
    """Envoy ``path_with_escaped_slashes_action`` (IMPLEMENTATION_SPECIFIC_DEFAULT is
    KEEP_UNCHANGED)."""

    KEEP_UNCHANGED = "KEEP_UNCHANGED"
    REJECT_REQUEST = "REJECT_REQUEST"
    UNESCAPE_AND_REDIRECT = "UNESCAPE_AND_REDIRECT"
    UNESCAPE_AND_FORWARD = "UNESCAPE_AND_FORWARD"


@dataclass(frozen=True, slots=True, kw_only=True)
class PathPolicy:
    """The mesh's path settings as the waypoint applies them."""

    normalization: PathNormalization = PathNormalization.BASE
    escaped_slashes: EscapedSlashes = EscapedSlashes.KEEP_UNCHANGED

    @classmethod
    def parse(cls, normalization: str = "", escaped_slashes: str = "") -> PathPolicy:
        """From the mesh setting names (Istio's ``DEFAULT`` and Envoy's
        ``IMPLEMENTATION_SPECIFIC_DEFAULT`` accepted); anything else is a `ValueError`."""
        n = (normalization or "BASE").upper()
        e = (escaped_slashes or "KEEP_UNCHANGED").upper()
        n = "BASE" if n == "DEFAULT" else n
        e = "KEEP_UNCHANGED" if e == "IMPLEMENTATION_SPECIFIC_DEFAULT" else e
        return cls(normalization=PathNormalization(n), escaped_slashes=EscapedSlashes(e))

    @property
    def slashes_action(self) -> EscapedSlashes:
        # Istio DECODE_AND_MERGE_SLASHES = Envoy UNESCAPE_AND_FORWARD + merge_slashes, unless the
        # mesh explicitly asked for something stricter.
        if (
            self.normalization is PathNormalization.DECODE_AND_MERGE_SLASHES
            and self.escaped_slashes is EscapedSlashes.KEEP_UNCHANGED
        ):
            return EscapedSlashes.UNESCAPE_AND_FORWARD
        return self.escaped_slashes

    @property
    def merge_slashes(self) -> bool:
        return self.normalization in (
            PathNormalization.MERGE_SLASHES,
            PathNormalization.DECODE_AND_MERGE_SLASHES,
        )
