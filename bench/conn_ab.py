"""A/B of the new-connections run between source trees of the node proxy, with Envoy's pair in
the same rounds (issue 14: CPU per new connection of node A and node B).

Owns: the interleaved rounds (per round: Envoy's pair, then each tree's node-proxy pair started
fresh, since all trees bind the same addresses; the trees' order is reversed every other round),
each a `wrk -c16 -H 'Connection: close'` run (every request is connect + `GET /1k` + close: a
new HBONE stream per connection), the CPU microseconds each proxy spends per connection, and the
table of medians. Each tree runs from its own directory through `PYTHONPATH` (a `git archive`
of main with its compiled build copied in, as bench/README.md's A/B sections describe); the
tree "." is this checkout. Run it in a network namespace of its own (`unshare -n`, loopback up)
so its fixed addresses do not collide:

    unshare -n bash -c 'ip link set lo up; exec .venv/bin/python -m bench.conn_ab \
        --tree main=/tmp/ab-main --tree branch=. --rounds 5 --duration 4'

`--hold TREE` starts only that pair (and nginx) and runs one long new-connections run (with
`--keepalive`: keep-alive requests), for `py-spy` attached from outside (the pids are printed;
`bench.spy_top` prints the profile's top).

Invariant: every process it starts is stopped when it ends (the `Supervisor` of `bench.harness`).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from bench.bulk_ab import start_tree
from bench.harness import (
    PathRuntime,
    Settings,
    Supervisor,
    log,
    machine_cpu_seconds,
    make_certs,
    run_ab,
    wrk,
)
from bench.hbone_bench import start_backend, start_envoy_pair


def conn_round(rt: PathRuntime, duration: float, conns: int, close: bool = True) -> dict[str, Any]:
    """One new-connections run through `rt`: connections/s, each proxy's CPU us per connection
    (`close` False: keep-alive requests instead, for a profile of the request path)."""
    settings = Settings(1, duration, 1, 1, 2, conns, conns, 1000.0, 1)
    cpu0 = rt.cpu()
    load0 = os.getloadavg()[0]
    busy0, idle0 = machine_cpu_seconds()
    rate, errors, _ = wrk(rt.addr, settings, conns, close=close)
    busy1, idle1 = machine_cpu_seconds()
    cpu = {k: v - cpu0[k] for k, v in rt.cpu().items()}
    n = max(rate * duration, 1.0)
    return {
        "cps": rate,
        "errors": errors,
        "cpu_us": {k: v / n * 1e6 for k, v in cpu.items()},
        "cpu_us_sum": sum(cpu.values()) / n * 1e6,
        "load": (load0 + os.getloadavg()[0]) / 2,
        # The machine's idle share: whether the path was CPU-bound (every core busy) or waited.
        "idle": (idle1 - idle0) / max(busy1 - busy0 + idle1 - idle0, 1e-9),
    }


def _brief(name: str, r: dict[str, Any]) -> str:
    per = " ".join(f"{k}={v:.0f}" for k, v in r["cpu_us"].items())
    return (
        f"{name:8s} {r['cps']:7.0f} conn/s  CPU us/conn {r['cpu_us_sum']:.0f} ({per})  "
        f"errors {r['errors']}  idle {r['idle']:.0%}  load {r['load']:.1f}"
    )


def run(args: argparse.Namespace, sup: Supervisor, workdir: Path) -> dict[str, list[Any]]:
    trees = dict(t.split("=", 1) for t in args.tree)
    start_backend(sup, workdir)
    ca_dir = workdir / "ca"
    ca_dir.mkdir()
    if args.hold:
        rt = start_tree(sup, workdir, ca_dir, trees[args.hold], args.workers)
        log("pids: " + " ".join(f"{p.name}={p.pid}" for p in rt.proxies))
        conn_round(rt, 1.0, args.conns)  # warm-up
        what = "keep-alive requests" if args.keepalive else "new connections"
        log(f"holding: {what} for {args.duration:g} s")
        log(_brief(args.hold, conn_round(rt, args.duration, args.conns, not args.keepalive)))
        return {}
    envoy = None if args.no_envoy else start_envoy_pair(sup, workdir, make_certs(workdir, ca_dir))
    results: dict[str, list[Any]] = {}
    for rnd in range(args.rounds):
        if envoy is not None:
            r = conn_round(envoy, args.duration, args.conns)
            results.setdefault("envoy", []).append(r)
            log(f"round {rnd + 1} " + _brief("envoy", r))
        order = list(trees.items())
        if rnd % 2:  # every other round in reverse: no tree always runs first
            order.reverse()
        for name, tree in order:
            rt = start_tree(sup, workdir, ca_dir, tree, args.workers)
            conn_round(rt, 1.0, args.conns)  # warm-up: the pooled HBONE connection, imports
            r = conn_round(rt, args.duration, args.conns)
            for p in rt.proxies:
                sup.stop(p)
            results.setdefault(name, []).append(r)
            log(f"round {rnd + 1} " + _brief(name, r))
    return results


def report(results: dict[str, list[Any]]) -> None:
    med = statistics.median
    env = results.get("envoy")
    env_cpu = med(r["cpu_us_sum"] for r in env) if env else None
    print("| tree | conn/s | CPU us per connection, both (A / B) | vs Envoy | idle | load |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rs in results.items():
        cpu = med(r["cpu_us_sum"] for r in rs)
        names = list(rs[0]["cpu_us"])
        per = " / ".join(f"{med(r['cpu_us'][n] for r in rs):.0f}" for n in names)
        ratio = f"{cpu / env_cpu:.2f}x" if env_cpu else "-"
        loads = f"{min(r['load'] for r in rs):.1f}-{max(r['load'] for r in rs):.1f}"
        print(
            f"| {name} | {med(r['cps'] for r in rs):.0f} | {cpu:.0f} ({per}) | {ratio} "
            f"| {med(r['idle'] for r in rs):.0%} | {loads} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR (repeatable)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    ap.add_argument("--conns", type=int, default=16, help="wrk connections")
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--workers", type=int, default=1, help="ztunnel --workers of each node proxy")
    ap.add_argument("--hold", help="run only this tree, one run of --duration seconds")
    ap.add_argument(
        "--keepalive", action="store_true", help="with --hold: keep-alive requests (per second)"
    )
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    args = ap.parse_args(argv)
    if not args.tree:
        args.tree = ["branch=."]
    return run_ab(args, "conn-", run, report)


if __name__ == "__main__":
    raise SystemExit(main())
