"""The HBONE benchmark's report: medians over repetitions, the comparison table (ratios and
added latency against the direct path) and its text rendering.

Pure: functions of the raw per-repetition figures; nothing here measures or prints.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.harness import PATHS, PathRuntime

# ---------------------------------------------------------------------------------------------
# Summaries


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(
    raw: dict[str, dict[str, list[dict[str, Any]]]], runtimes: dict[str, PathRuntime]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path, by_metric in raw.items():
        s: dict[str, Any] = {}
        if by_metric.get("rps"):
            s["rps"] = median([r["rps"] for r in by_metric["rps"]])
        if by_metric.get("cps"):
            s["cps"] = median([r["cps"] for r in by_metric["cps"]])
        if by_metric.get("latency"):
            lat = by_metric["latency"]
            for q in ("p50_ms", "p90_ms", "p99_ms"):
                s[q] = median([r[q] for r in lat])
            s["achieved_rate"] = median([r["achieved_rate"] for r in lat])
            if path != "direct":
                names = list(lat[0]["vcpu_per_krps"])
                s["vcpu_per_krps"] = {
                    n: median([r["vcpu_per_krps"][n] for r in lat]) for n in names
                }
        if by_metric.get("bulk"):
            s["gbps"] = median([r["gbps"] for r in by_metric["bulk"]])
            if path != "direct":
                s["cpu_s_per_gbit"] = median([r["cpu_s_per_gbit"] for r in by_metric["bulk"]])
        rt = runtimes.get(path)
        if rt is not None and rt.proxies:
            rss = {}
            for name, samples in rt.rss_samples.items():
                mib = max(m for m, _, _ in samples)
                pss = max(p for _, _, p in samples)
                rss[name] = {
                    "rss_mib": mib,
                    "per_worker_mib": mib / rt.workers,
                    "pss_mib": pss,
                    "pss_per_worker_mib": pss / rt.workers,
                    "processes": max(n for _, n, _ in samples),
                }
            s["rss"] = rss
        s["errors"] = sum(r.get("errors", 0) for rs in by_metric.values() for r in rs)
        out[path] = s
    return out


def _fmt(v: float | None, nd: int = 2, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def build_table(summary: dict[str, dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    """Rows: metric, per-path values, ratios and the target verdict (targets: vs the Envoy pair);
    plus the HTTP/3 pair's value and its ratio to the Envoy pair in the same row."""
    rows = _build_table(summary, rate)
    h3 = _build_table({**summary, "ztunnel": summary.get("ztunnel-h3", {})}, rate)
    for row, h3row in zip(rows, h3, strict=True):
        row["ztunnel_h3"] = h3row["ztunnel"]
        row["h3_over_envoy"] = h3row["ours_over_envoy"]
    return rows


@dataclass(frozen=True, slots=True, kw_only=True)
class _Metric:
    """One row of the table: a metric's value per path, its target and how it is checked."""

    metric: str
    direct: float | None
    envoy: float | None
    ours: float | None
    """The node-proxy pair's value."""
    target: str
    ok: Callable[[], bool | None] | None
    """The verdict against `target` (asked only when `ours` is known)."""
    nd: int = 2
    """Decimals shown."""
    signed: bool = False


def _build_table(summary: dict[str, dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    d, e, z = (summary.get(p, {}) for p in PATHS[:3])

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def added(path: dict[str, Any], q: str) -> float | None:
        if path.get(q) is None or d.get(q) is None:
            return None
        return float(path[q]) - float(d[q])

    def max_of(path: dict[str, Any], key: str, sub: str | None = None) -> float | None:
        val = path.get(key)
        if not val:
            return None
        if sub is None:
            return float(max(val.values()))
        return float(max(v[sub] for v in val.values()))

    rows: list[dict[str, Any]] = []

    def row(m: _Metric) -> None:
        verdict = None
        if m.ok is not None and m.ours is not None:
            verdict = m.ok()
        rows.append(
            {
                "metric": m.metric,
                "direct": m.direct,
                "envoy": m.envoy,
                "ztunnel": m.ours,
                "ours_over_envoy": ratio(m.ours, m.envoy),
                "ours_over_direct": ratio(m.ours, m.direct),
                "target": m.target,
                "pass": verdict,
                "_nd": m.nd,
                "_signed": m.signed,
            }
        )

    zr = ratio(z.get("rps"), e.get("rps"))
    row(
        _Metric(
            metric="small-request rps (1 KB, keep-alive)",
            direct=d.get("rps"),
            envoy=e.get("rps"),
            ours=z.get("rps"),
            target=">= 0.9x envoy",
            ok=lambda: None if zr is None else zr >= 0.9,
            nd=0,
        )
    )
    zc = ratio(z.get("cps"), e.get("cps"))
    row(
        _Metric(
            metric="new connections/s (conn+GET+close)",
            direct=d.get("cps"),
            envoy=e.get("cps"),
            ours=z.get("cps"),
            target=">= 0.7x envoy",
            ok=lambda: None if zc is None else zc >= 0.7,
            nd=0,
        )
    )
    for q in ("p50_ms", "p90_ms", "p99_ms"):
        row(
            _Metric(
                metric=f"latency {q[:3]} @{rate:g} rps (ms)",
                direct=d.get(q),
                envoy=e.get(q),
                ours=z.get(q),
                target="",
                ok=None,
                nd=3,
            )
        )
    za50, za99 = added(z, "p50_ms"), added(z, "p99_ms")
    row(
        _Metric(
            metric="added latency p50 vs direct (ms)",
            direct=None,
            envoy=added(e, "p50_ms"),
            ours=za50,
            target="<= +0.25 ms",
            ok=lambda: None if za50 is None else za50 <= 0.25,
            nd=3,
            signed=True,
        )
    )
    row(
        _Metric(
            metric="added latency p99 vs direct (ms)",
            direct=None,
            envoy=added(e, "p99_ms"),
            ours=za99,
            target="<= +1 ms",
            ok=lambda: None if za99 is None else za99 <= 1.0,
            nd=3,
            signed=True,
        )
    )
    row(
        _Metric(
            metric="bulk throughput, 1 conn (Gb/s)",
            direct=d.get("gbps"),
            envoy=e.get("gbps"),
            ours=z.get("gbps"),
            target="",
            ok=None,
        )
    )
    zg = ratio(z.get("cpu_s_per_gbit"), e.get("cpu_s_per_gbit"))
    row(
        _Metric(
            metric="CPU per Gb/s, both proxies (CPU-s/Gbit)",
            direct=None,
            envoy=e.get("cpu_s_per_gbit"),
            ours=z.get("cpu_s_per_gbit"),
            target="<= 1.0x envoy",
            ok=lambda: None if zg is None else zg <= 1.0,
            nd=3,
        )
    )
    zk = max_of(z, "vcpu_per_krps")
    row(
        _Metric(
            metric="CPU per 1000 rps, busiest proxy (vCPU)",
            direct=None,
            envoy=max_of(e, "vcpu_per_krps"),
            ours=zk,
            target="<= 0.06 vCPU",
            ok=lambda: None if zk is None else zk <= 0.06,
            nd=3,
        )
    )
    zm = max_of(z, "rss", "per_worker_mib")
    row(
        _Metric(
            metric="RSS per worker, largest proxy (MiB)",
            direct=None,
            envoy=max_of(e, "rss", "per_worker_mib"),
            ours=zm,
            target="<= 40 MiB",
            ok=lambda: None if zm is None else zm <= 40.0,
            nd=1,
        )
    )
    zp = max_of(z, "rss", "pss_per_worker_mib")
    row(
        _Metric(
            metric="PSS per worker, largest proxy (MiB)",
            direct=None,
            envoy=max_of(e, "rss", "pss_per_worker_mib"),
            ours=zp,
            target="<= 40 MiB",
            ok=lambda: None if zp is None else zp <= 40.0,
            nd=1,
        )
    )
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "metric",
        "direct",
        "envoy pair",
        "node-proxy pair",
        "ours/envoy",
        "node-proxy pair h3",
        "h3/envoy",
        "ours/direct",
        "target",
        "pass/fail",
    ]
    body = []
    for r in rows:
        nd, signed = r["_nd"], r["_signed"]
        verdict = {True: "PASS", False: "FAIL", None: "-"}[r["pass"]]
        body.append(
            [
                r["metric"],
                _fmt(r["direct"], nd, signed),
                _fmt(r["envoy"], nd, signed),
                _fmt(r["ztunnel"], nd, signed),
                _fmt(r["ours_over_envoy"], 2) + ("x" if r["ours_over_envoy"] is not None else ""),
                _fmt(r.get("ztunnel_h3"), nd, signed),
                _fmt(r.get("h3_over_envoy"), 2)
                + ("x" if r.get("h3_over_envoy") is not None else ""),
                _fmt(r["ours_over_direct"], 2) + ("x" if r["ours_over_direct"] is not None else ""),
                r["target"] or "-",
                verdict,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = [
        " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    for b in body:
        cells = [b[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(b[1:], widths[1:], strict=True)
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)
