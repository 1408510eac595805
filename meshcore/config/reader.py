"""Primitives for reading configuration objects: typed accessors that name the field path,
durations, percentages, host names, and the per-object parse context.

Owns: `read_map`/`read_seq`/`read_text`/`read_int`/`read_labels`/`read_percentage` (each
raises `ConfigError` naming the field path), `parse_duration`, `resolve_host`, and `Ctx` (the
object being parsed: reference, namespace, domain suffix, and where warnings/findings go).

Invariants: pure; durations are seconds (float); percentages are 0..100 floats.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshcore.config.findings import NOTE, Finding
from meshcore.config.labels import Labels
from meshcore.errors import ConfigError

DEFAULT_DOMAIN_SUFFIX = "cluster.local"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")


def parse_duration(value: object, path: str) -> float:
    """``1.5s``, ``500ms``, ``1m30s``, ``2h`` (protobuf Duration JSON and GEP-2257) -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a duration like '1.5s', got {value!r}")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            break
        number, unit = float(m.group(1)), m.group(2)
        total += number * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[unit]
        pos = m.end()
    if pos != len(value) or pos == 0:
        raise ConfigError(path, f"bad duration {value!r}")
    return total


def read_percentage(obj: Mapping[str, Any], path: str, default: float = 100.0) -> float:
    """``percentage: {value: 12.5}`` or the older integer ``percent`` (0..100)."""
    if "percentage" in obj:
        pct = obj["percentage"]
        value = pct.get("value", 0.0) if isinstance(pct, Mapping) else pct
        key = f"{path}.percentage"
    elif "percent" in obj:
        value, key = obj["percent"], f"{path}.percent"
    else:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
        raise ConfigError(key, f"expected a percentage 0..100, got {value!r}")
    return float(value)


def read_map(value: object, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected an object, got {type(value).__name__}")
    return value


def read_seq(value: object, path: str) -> Sequence[Any]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list, got {type(value).__name__}")
    return value


def read_text(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {value!r}")
    return value


def read_int(value: object, path: str, lo: int = 0, hi: int = 2**31 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(path, f"expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def read_labels(value: object, path: str) -> Labels:
    m = read_map(value, path)
    return tuple(sorted((str(k), str(v)) for k, v in m.items()))


def resolve_host(host: str, namespace: str, suffix: str = DEFAULT_DOMAIN_SUFFIX) -> str:
    """Short names are relative to the config's namespace (Istio): ``reviews`` ->
    ``reviews.<ns>.svc.<suffix>``; ``reviews.prod`` -> ``reviews.prod.svc.<suffix>``;
    ``x.ns.svc`` gets the suffix; anything else (FQDN, wildcard) is kept, lower-cased."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("*"):
        return h
    dots = h.count(".")
    if dots == 0:
        return f"{h}.{namespace}.svc.{suffix}"
    if dots == 1:
        return f"{h}.svc.{suffix}"
    if h.endswith(".svc"):
        return f"{h}.{suffix}"
    return h


@dataclass(slots=True)
class Ctx:
    ref: str
    namespace: str
    suffix: str
    warnings: list[str]
    findings: list[tuple[str, Finding]] = field(default_factory=list)

    def warn(self, message: str, path: str = "") -> None:
        """A warning about a value (fields themselves are reported from the field table)."""
        finding = Finding(code=NOTE, level="Warning", path=path, message=message)
        self.warnings.append(f"{self.ref}: {finding.render()}")
        self.findings.append((self.ref, finding))
