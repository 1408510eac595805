"""`ambientctl proxy-status`: what each node proxy has, against what the control plane would
send it.

Owns the comparison (pure): the control plane's translated records (/debug/config) and its
per-connection xDS state (/debug/connections: ACK/NACK, pending changes) versus each node
proxy's /config_dump. Every node proxy receives every resource (docs/controlplane.md), so a
proxy is SYNCED when it holds exactly the control plane's records, field for field.

Statuses per proxy: SYNCED; STALE (records differ: missing/extra/different are counted);
NACKED (its last response to the control plane was a NACK; the error is shown);
NOT CONNECTED (the control plane has no stream from that node, e.g. a static-mode proxy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Record = Mapping[str, Any]


def _kind(r: Record) -> str:
    if "uid" in r:
        return "workloads"
    if "scope" in r and "action" in r:
        return "policies"
    return "services"


def _key(kind: str, r: Record) -> str:
    if kind == "workloads":
        return str(r.get("uid"))
    if kind == "services":
        return f"{r.get('namespace')}/{r.get('hostname')}"
    return f"{r.get('namespace')}/{r.get('name')}"


def index_controlplane(records: Sequence[Record]) -> dict[str, dict[str, Record]]:
    out: dict[str, dict[str, Record]] = {"workloads": {}, "services": {}, "policies": {}}
    for r in records:
        kind = _kind(r)
        out[kind][_key(kind, r)] = r
    return out


def index_dump(dump: Mapping[str, Any]) -> dict[str, dict[str, Record]]:
    return {
        kind: {_key(kind, r): r for r in dump.get(kind, [])}
        for kind in ("workloads", "services", "policies")
    }


def diff(
    want: Mapping[str, Mapping[str, Record]], have: Mapping[str, Mapping[str, Record]]
) -> dict[str, dict[str, list[str]]]:
    """Per kind: missing (control plane has, proxy not), extra, different."""
    out: dict[str, dict[str, list[str]]] = {}
    for kind in ("workloads", "services", "policies"):
        w, h = want.get(kind, {}), have.get(kind, {})
        out[kind] = {
            "missing": sorted(set(w) - set(h)),
            "extra": sorted(set(h) - set(w)),
            "different": sorted(k for k in set(w) & set(h) if dict(w[k]) != dict(h[k])),
        }
    return out


def _connection_for(
    node: str, connections: Sequence[Mapping[str, Any]]
) -> Mapping[str, Any] | None:
    mine = [c for c in connections if c.get("node") == node]
    return max(mine, key=lambda c: int(c.get("id", 0))) if mine else None


def status_rows(
    cp_records: Sequence[Record],
    connections: Sequence[Mapping[str, Any]],
    dumps: Sequence[tuple[str, Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    want = index_controlplane(cp_records)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for label, dump in dumps:
        node = str(dump.get("node") or label)
        seen.add(node)
        d = diff(want, index_dump(dump))
        conn = _connection_for(node, connections)
        row: dict[str, Any] = {"node": node, "address": label}
        for kind in ("workloads", "services", "policies"):
            have = len(dump.get(kind, []))
            row[kind] = f"{have}/{len(want[kind])}"
        problems = [
            f"{len(v)} {what} {kind}" for kind, by in d.items() for what, v in by.items() if v
        ]
        nack = _nack(conn)
        if conn is None:
            row["status"] = "NOT CONNECTED"
        elif nack:
            row["status"] = "NACKED"
        elif problems:
            row["status"] = "STALE"
        else:
            row["status"] = "SYNCED"
        row["details"] = "; ".join([*(problems if problems else []), *([nack] if nack else [])])
        row["diff"] = d
        rows.append(row)
    for conn in connections:  # connected proxies we were not given an address for
        node = str(conn.get("node"))
        if node in seen:
            continue
        seen.add(node)
        types = conn.get("types") or {}
        counts = {t.rsplit(".", 1)[-1]: v.get("resources") for t, v in types.items()}
        rows.append(
            {
                "node": node,
                "address": str(conn.get("peer", "")),
                "workloads": "?",
                "services": "?",
                "policies": "?",
                "status": "NACKED" if _nack(conn) else "CONNECTED",
                "details": _nack(conn)
                or f"sent {counts}; pass --address/--lab to compare contents",
            }
        )
    return rows


def _nack(conn: Mapping[str, Any] | None) -> str:
    if conn is None:
        return ""
    for t, v in (conn.get("types") or {}).items():
        ack_age, nack_age = v.get("last_ack_s_ago"), v.get("last_nack_s_ago")
        if nack_age is not None and (ack_age is None or nack_age < ack_age):
            return f"NACK of {t.rsplit('.', 1)[-1]}: {v.get('last_error')}"
    return ""


COLUMNS = [
    ("NODE", "node"),
    ("ADDRESS", "address"),
    ("STATUS", "status"),
    ("WORKLOADS", "workloads"),
    ("SERVICES", "services"),
    ("POLICIES", "policies"),
    ("DETAILS", "details"),
]
