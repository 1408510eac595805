"""The HBONE benchmark's report: medians over repetitions, the comparison table (ratios and
added latency against the direct path) and its text rendering.

Pure: functions of the raw per-repetition figures; nothing here measures or prints.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

from bench.harness import PATHS, PathRuntime

TARGETS: dict[str, float] = {
    "rps": 1.2,  # was 1.1 (issue 14), met at 1.13x and 1.21x in session 3: a target met is raised
    "cps": 1.0,
    "cpu_per_gbit": 1.0,
    "cpu_per_krps": 1.0,
    "rss_per_worker": 1.0,
}
"""Issue 14's node-proxy targets, as ratios ours / Envoy pair in the same run (">=" for the
rates, "<=" for the costs); added latency p50/p99 must be <= the Envoy pair's own."""

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
                if name in rt.idle_rss:
                    rss[name]["idle_per_worker_mib"] = rt.idle_rss[name][0] / rt.workers
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
class RowInputs:
    """One table row's figures and its target. The verdict compares `checked` with `limit`
    (``>=`` when `at_least`, else ``<=``); a row without a limit has no verdict."""

    metric: str
    direct: float | None = None
    envoy: float | None = None
    ours: float | None = None
    target: str = ""
    checked: float | None = None
    """What the target is about: ours / Envoy, or our added latency."""
    limit: float | None = None
    at_least: bool = False
    nd: int = 2
    """Decimals shown."""
    signed: bool = False


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _row(r: RowInputs) -> dict[str, Any]:
    verdict = None
    if r.ours is not None and r.checked is not None and r.limit is not None:
        verdict = r.checked >= r.limit if r.at_least else r.checked <= r.limit
    return {
        "metric": r.metric,
        "direct": r.direct,
        "envoy": r.envoy,
        "ztunnel": r.ours,
        "ours_over_envoy": _ratio(r.ours, r.envoy),
        "ours_over_direct": _ratio(r.ours, r.direct),
        "target": r.target,
        "pass": verdict,
        "_nd": r.nd,
        "_signed": r.signed,
    }


def _build_table(summary: dict[str, dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    d, e, z = (summary.get(p, {}) for p in PATHS[:3])

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
        subs = [v[sub] for v in val.values() if sub in v]
        return float(max(subs)) if subs else None

    def vs_envoy(key: str, r: RowInputs) -> RowInputs:
        """`r` with a target on the ratio ours / Envoy: TARGETS[key], at least or at most."""
        op = ">=" if r.at_least else "<="
        target = f"{op} {TARGETS[key]}x envoy"
        return replace(r, target=target, checked=_ratio(r.ours, r.envoy), limit=TARGETS[key])

    def added_latency(q: str) -> RowInputs:
        za, ea = added(z, q), added(e, q)
        return RowInputs(
            metric=f"added latency {q[:3]} vs direct (ms)",
            envoy=ea,
            ours=za,
            target="<= envoy's",
            checked=za,
            limit=ea,
            nd=3,
            signed=True,
        )

    rows = [
        *(
            vs_envoy(
                key,
                RowInputs(
                    metric=metric,
                    direct=d.get(key),
                    envoy=e.get(key),
                    ours=z.get(key),
                    at_least=True,
                    nd=0,
                ),
            )
            for metric, key in (
                ("small-request rps (1 KB, keep-alive)", "rps"),
                ("new connections/s (conn+GET+close)", "cps"),
            )
        ),
        *(
            RowInputs(
                metric=f"latency {q[:3]} @{rate:g} rps (ms)",
                direct=d.get(q),
                envoy=e.get(q),
                ours=z.get(q),
                nd=3,
            )
            for q in ("p50_ms", "p90_ms", "p99_ms")
        ),
        added_latency("p50_ms"),
        added_latency("p99_ms"),
        RowInputs(
            metric="bulk throughput, 1 conn (Gb/s)",
            direct=d.get("gbps"),
            envoy=e.get("gbps"),
            ours=z.get("gbps"),
        ),
        vs_envoy(
            "cpu_per_gbit",
            RowInputs(
                metric="CPU per Gb/s, both proxies (CPU-s/Gbit)",
                envoy=e.get("cpu_s_per_gbit"),
                ours=z.get("cpu_s_per_gbit"),
                nd=3,
            ),
        ),
        vs_envoy(
            "cpu_per_krps",
            RowInputs(
                metric="CPU per 1000 rps, busiest proxy (vCPU)",
                envoy=max_of(e, "vcpu_per_krps"),
                ours=max_of(z, "vcpu_per_krps"),
                nd=3,
            ),
        ),
        RowInputs(
            metric="idle RSS per worker, largest proxy (MiB)",
            envoy=max_of(e, "rss", "idle_per_worker_mib"),
            ours=max_of(z, "rss", "idle_per_worker_mib"),
            nd=1,
        ),
        vs_envoy(
            "rss_per_worker",
            RowInputs(
                metric="RSS per worker, largest proxy (MiB)",
                envoy=max_of(e, "rss", "per_worker_mib"),
                ours=max_of(z, "rss", "per_worker_mib"),
                nd=1,
            ),
        ),
        RowInputs(
            metric="PSS per worker, largest proxy (MiB)",
            envoy=max_of(e, "rss", "pss_per_worker_mib"),
            ours=max_of(z, "rss", "pss_per_worker_mib"),
            nd=1,
        ),
    ]
    return [_row(r) for r in rows]


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
