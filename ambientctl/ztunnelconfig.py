"""`ambientctl ztunnel-config workloads|services|policies|certificates|connections|all`: what a
node proxy has, from its admin endpoint's /config_dump (istioctl ztunnel-config's habits: plural
section names, the singular kept as aliases; ``-o short|json|yaml``; ``-n NS`` / ``-A``).

Owns the views: pure functions from a config dump to rows (tables) or documents (json/yaml).
Tables are for eyes; `-o json|yaml` gives the records exactly as the node proxy holds them
(the xDS record shapes of meshcore/model.py), so scripts see every field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ambientctl import output

SECTIONS = ("workload", "service", "policy", "certificate", "connections", "all")
"""Internal section keys (the singular: COLUMNS, rows)."""
CLI_SECTIONS = ("workloads", "services", "policies", "certificates", "connections", "all")
"""Section names as istioctl's ztunnel-config spells them."""
_ALIASES = {
    **{plural: single for plural, single in zip(CLI_SECTIONS, SECTIONS, strict=True)},
    **{single: single for single in SECTIONS},
    "certs": "certificate",
    "connection": "connections",
}


def section_name(text: str) -> str:
    """The CLI spelling of a section typed as plural, singular or alias (argparse `type`)."""
    single = _ALIASES.get(text)
    return CLI_SECTIONS[SECTIONS.index(single)] if single is not None else text


def _internal(section: str) -> str:
    return _ALIASES.get(section, section)


_KEYS = {
    "workload": "workloads",
    "service": "services",
    "policy": "policies",
    "certificate": "certificates",
    "connections": "connections",
}
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "workload": [
        ("NAMESPACE", "namespace"),
        ("POD NAME", "name"),
        ("ADDRESS", "addresses"),
        ("NODE", "node"),
        ("WAYPOINT", "waypoint"),
        ("PROTOCOL", "tunnelProtocol"),
        ("IDENTITY", "identity"),
        ("POLICIES", "authorizationPolicies"),
        ("STATUS", "status"),
    ],
    "service": [
        ("NAMESPACE", "namespace"),
        ("SERVICE NAME", "name"),
        ("SERVICE VIP", "vips"),
        ("WAYPOINT", "waypoint"),
        ("PORTS", "ports"),
        ("ENDPOINTS", "endpoints"),
    ],
    "policy": [
        ("NAMESPACE", "namespace"),
        ("POLICY NAME", "name"),
        ("ACTION", "action"),
        ("SCOPE", "scope"),
        ("RULES", "rules"),
    ],
    "certificate": [
        ("CERTIFICATE NAME", "identity"),
        ("STATE", "state"),
        ("SERIAL", "serial"),
        ("NOT AFTER", "not_after"),
        ("REFRESH AT", "refresh_at"),
        ("FAILURES", "failures"),
        ("LAST ERROR", "last_error"),
    ],
    "connections": [
        ("SOURCE IDENTITY", "source"),
        ("DESTINATION", "destination"),
        ("PEER IDENTITY", "peer"),
        ("STREAMS", "streams"),
    ],
}


def _waypoint(w: Any) -> str:
    if not isinstance(w, Mapping):
        return ""
    host = w.get("hostname")
    if isinstance(host, Mapping):
        return f"{host.get('namespace')}/{host.get('hostname')}"
    addr = w.get("address")
    return str(addr.get("address")) if isinstance(addr, Mapping) else ""


def workload_rows(dump: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for w in dump.get("workloads", []):
        td = w.get("trustDomain") or "cluster.local"
        rows.append(
            {
                **w,
                "identity": f"spiffe://{td}/ns/{w.get('namespace')}/sa/{w.get('serviceAccount')}",
                "waypoint": _waypoint(w.get("waypoint")),
            }
        )
    return sorted(rows, key=lambda r: (r.get("namespace", ""), r.get("name", "")))


def service_rows(dump: Mapping[str, Any]) -> list[dict[str, Any]]:
    endpoints: dict[str, int] = {}
    for w in dump.get("workloads", []):
        for key in w.get("services") or {}:
            endpoints[key] = endpoints.get(key, 0) + 1
    rows = []
    for s in dump.get("services", []):
        key = f"{s.get('namespace')}/{s.get('hostname')}"
        ports = [f"{p.get('servicePort')}->{p.get('targetPort')}" for p in s.get("ports", [])]
        rows.append(
            {
                **s,
                "vips": [a.get("address") for a in s.get("addresses", [])],
                "waypoint": _waypoint(s.get("waypoint")),
                "ports": ports,
                "endpoints": endpoints.get(key, 0),
            }
        )
    return sorted(rows, key=lambda r: (r.get("namespace", ""), r.get("name", "")))


def policy_rows(dump: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = [{**p, "rules": len(p.get("rules", []))} for p in dump.get("policies", [])]
    return sorted(rows, key=lambda r: (r.get("namespace", ""), r.get("name", "")))


def rows(section: str, dump: Mapping[str, Any]) -> list[dict[str, Any]]:
    if section == "workload":
        return workload_rows(dump)
    if section == "service":
        return service_rows(dump)
    if section == "policy":
        return policy_rows(dump)
    return [dict(r) for r in dump.get(_KEYS[section], [])]


def _spiffe_namespace(identity: Any) -> str | None:
    """The ``ns`` segment of ``spiffe://<td>/ns/<ns>/sa/<sa>`` (Istio's identity form)."""
    parts = str(identity or "").split("/")
    return parts[parts.index("ns") + 1] if "ns" in parts[:-1] else None


def _in_namespace(dump: Mapping[str, Any], namespace: str | None) -> Mapping[str, Any]:
    """`dump` with only the records of `namespace` (None: all): workloads, services and
    policies by their namespace, certificates by their identity's, connections by their source
    workload's identity (the local side)."""
    if not namespace:
        return dump
    out = dict(dump)
    for key in ("workloads", "services", "policies"):
        out[key] = [r for r in dump.get(key, []) if r.get("namespace") == namespace]
    out["certificates"] = [
        c for c in dump.get("certificates", []) if _spiffe_namespace(c.get("identity")) == namespace
    ]
    out["connections"] = [
        c for c in dump.get("connections", []) if _spiffe_namespace(c.get("source")) == namespace
    ]
    return out


def render(
    section: str,
    dumps: Sequence[tuple[str, Mapping[str, Any]]],
    fmt: str,
    namespace: str | None = None,
) -> str:
    """`dumps`: (label, config dump) per node proxy. Tables get a header per proxy when there
    are several; json/yaml give {node: {section: records}} (or the bare records for one).
    `fmt` ``short`` is istioctl's name for the table; `namespace` limits the records."""
    section = _internal(section)
    fmt = "table" if fmt == "short" else fmt
    dumps = [(label, _in_namespace(dump, namespace)) for label, dump in dumps]
    sections = [s for s in SECTIONS if s != "all"] if section == "all" else [section]
    if fmt != "table":
        docs: dict[str, Any] = {}
        for label, dump in dumps:
            node = str(dump.get("node") or label)
            docs[node] = {_KEYS[s]: list(dump.get(_KEYS[s], [])) for s in sections}
            if section != "all":
                docs[node] = docs[node][_KEYS[section]]
        only = next(iter(docs.values())) if len(docs) == 1 else docs
        return output.document(only, fmt)
    parts = []
    for label, dump in dumps:
        node = str(dump.get("node") or "")
        if len(dumps) > 1 or section == "all":
            parts.append(f"# node proxy {node or label} ({label})")
        for s in sections:
            if section == "all":
                parts.append(f"## {_KEYS[s]}")
            parts.append(output.table(rows(s, dump), COLUMNS[s]))
    return "\n".join(parts)
