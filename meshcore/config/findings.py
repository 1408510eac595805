"""Findings: what the mesh reports about an object's fields, checked against the field table
(`meshcore.config.fields`).

Owns: `Finding` and its codes (AMB0201..AMB0206, listed in `meshcore.config.fields`),
`check_object` (walks one object against the table and reports every field that is unknown,
refused or only warned about), `kind_support` (whole kinds we do not implement),
`check_labels` (label values outside their allowed set) and `condition_key` (the row of an
AuthorizationPolicy ``when`` key).

Invariants: pure; an unknown field (no row) is reported like a refused one (a misspelt key is
never skipped); findings come in document order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshcore.config.fields import (
    CONDITION_KEYS,
    FIELDS,
    L4,
    LABELS,
    UNSUPPORTED_KINDS,
    Status,
)


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Finding:
    """One reported problem of one object. `path` is the concrete field path (with indices)."""

    code: str
    level: str
    """``Error``, ``Warning`` or ``Info`` (istioctl analyze levels)."""
    path: str
    message: str

    def render(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


UNKNOWN = "AMB0201"
REFUSED = "AMB0202"
WARNED = "AMB0203"
KIND = "AMB0204"
INVALID = "AMB0205"
NOTE = "AMB0206"


def check_labels(kind: str, labels: Mapping[str, Any]) -> list[Finding]:
    """A value outside a label's allowed set (`LABELS`) is reported: it is not what the user
    meant, and the mesh reads it as the default."""
    out = []
    for key, (kinds, allowed, meaning) in LABELS.items():
        if kind not in kinds.split(", ") or key not in labels or not allowed:
            continue
        value = labels[key]
        if value not in allowed:
            out.append(
                Finding(
                    code=INVALID,
                    level="Warning",
                    path=f"metadata.labels[{key}]",
                    message=f"{value!r} is not one of {', '.join(allowed)} ({meaning})",
                )
            )
    return out


def condition_key(key: str) -> tuple[str, tuple[Status, L4, str]] | None:
    """The `CONDITION_KEYS` row of a ``when`` key (None: unknown key)."""
    for pattern, row in CONDITION_KEYS.items():
        if pattern.endswith("[<name>]"):
            head = pattern[: -len("<name>]")]
            if key.startswith(head) and key.endswith("]") and len(key) > len(head) + 1:
                return pattern, row
        elif pattern.endswith(".*"):
            if key.startswith(pattern[:-1]):
                return pattern, row
        elif key == pattern:
            return pattern, row
    return None


def schema_path(path: str) -> str:
    """``spec.rules[3].from[0]`` -> ``spec.rules[].from[]``."""
    out = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "[":
            j = path.index("]", i)
            out.append("[]")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def check_object(kind: str, obj: Mapping[str, Any], *, api_group: str = "") -> list[Finding]:
    """Every unknown, refused and warned field of one object (its ``spec``), in document order.
    Kinds without a table give one `KIND` finding (or none for kinds we do not read at all)."""
    unsupported = kind_support(kind, obj, api_group=api_group)
    if unsupported is not None:
        return [unsupported]
    table = FIELDS.get(kind)
    if table is None:
        return []
    findings: list[Finding] = []

    def walk(value: object, path: str) -> None:
        if isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")
            return
        if not isinstance(value, Mapping):
            return
        for key, sub in value.items():
            child = f"{path}.{key}" if path else str(key)
            spec = table.get(schema_path(child))
            if spec is None:
                findings.append(
                    Finding(code=UNKNOWN, level="Error", path=child, message="unknown field")
                )
                continue
            if spec.status is Status.REFUSED:
                findings.append(
                    Finding(
                        code=REFUSED,
                        level="Error",
                        path=child,
                        message=f"not supported: {spec.note}",
                    )
                )
                continue
            if spec.status is Status.WARNED:
                findings.append(
                    Finding(
                        code=WARNED, level="Warning", path=child, message=f"ignored: {spec.note}"
                    )
                )
                continue
            if not spec.free:
                walk(sub, child)

    if "spec" in obj:
        walk({"spec": obj["spec"]}, "")
    return findings


def kind_support(kind: str, obj: Mapping[str, Any], *, api_group: str = "") -> Finding | None:
    """A `KIND` finding when the whole kind is not implemented, else None."""
    key = kind
    if kind == "Gateway":
        api = str(obj.get("apiVersion", "")) or api_group
        if api.startswith("networking.istio.io"):
            key = "Gateway.networking.istio.io"
        else:
            spec = obj.get("spec")
            cls = spec.get("gatewayClassName") if isinstance(spec, Mapping) else None
            if cls != "istio-waypoint":
                key = "Gateway.ingress"
    row = UNSUPPORTED_KINDS.get(key)
    if row is None:
        return None
    level, message = row
    return Finding(code=KIND, level=level, path="", message=message)
