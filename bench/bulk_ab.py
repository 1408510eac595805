"""A/B of the one-connection bulk run between source trees of the node proxy, with Envoy's pair
in the same run (issue 14: CPU per Gb/s and the bulk RSS peak).

Owns: the interleaved bulk rounds (per round: Envoy's pair, then each tree's node-proxy pair
started fresh, since all trees bind the same addresses), the 50 ms RSS/heap sampler of each
proxy during the run, and the table of medians. Each tree runs from its own directory through
`PYTHONPATH` (a `git archive` of main with its compiled build copied in, as bench/README.md's
A/B sections describe); the tree "." is this checkout. Run it in a network namespace of its own
(`unshare -n`, loopback up) so its fixed addresses do not collide with another bench:

    unshare -n bash -c 'ip link set lo up; exec .venv/bin/python -m bench.bulk_ab \
        --tree main=/tmp/ab-main --tree branch=. --rounds 3 --duration 5'

`--hold TREE` (or `--hold envoy`) starts only that pair (and nginx) and runs one long bulk
transfer, for `perf record` / `py-spy` attached from outside (the pids are printed).

Invariant: every process it starts is stopped when it ends (the `Supervisor` of `bench.harness`).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
from pathlib import Path
from typing import Any

from bench.harness import (
    PathRuntime,
    Supervisor,
    loadgen,
    log,
    make_certs,
    run_ab,
    tree_cpu_seconds,
)
from bench.hbone_bench import start_backend, start_envoy_pair, start_ztunnel_pair


def _heap_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RSS of the [heap] mapping) of one process, in KiB."""
    rss = heap = 0
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        rss = int(m.group(1)) if m else 0
        smaps = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return rss, heap
    in_heap = False
    for line in smaps.splitlines():
        if line and not line[0].isupper():
            in_heap = line.rstrip().endswith("[heap]")
        elif in_heap and line.startswith("Rss:"):
            heap = int(line.split()[1])
            in_heap = False
    return rss, heap


class Sampler:
    """Samples each proxy's RSS and heap every `period` seconds while running; keeps the peak."""

    def __init__(self, pids: dict[str, int], period: float = 0.05) -> None:
        self.pids = pids
        self.period = period
        self.peak: dict[str, tuple[int, int]] = {k: (0, 0) for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                rss, heap = _heap_rss_kib(pid)
                old = self.peak[name]
                self.peak[name] = (max(old[0], rss), max(old[1], heap))
            self._stop.wait(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bulk_round(rt: PathRuntime, duration: float) -> dict[str, Any]:
    """One bulk transfer through `rt`: Gb/s, each proxy's CPU-s per Gbit, peak RSS/heap (MiB)."""
    pids = {p.name: p.pid for p in rt.proxies}
    cpu0 = {k: tree_cpu_seconds(v) for k, v in pids.items()}
    load0 = os.getloadavg()[0]
    with Sampler(pids) as sampler:
        r = loadgen(["bulk", rt.addr[0], str(rt.addr[1]), "--duration", str(duration)], 60)
    cpu = {k: tree_cpu_seconds(v) - cpu0[k] for k, v in pids.items()}
    gbit = r["bytes"] * 8 / 1e9
    return {
        "gbps": gbit / r["seconds"],
        "cpu_per_gbit": {k: v / gbit for k, v in cpu.items()},
        "cpu_per_gbit_sum": sum(cpu.values()) / gbit,
        "peak_rss_mib": {k: v[0] / 1024 for k, v in sampler.peak.items()},
        "peak_heap_mib": {k: v[1] / 1024 for k, v in sampler.peak.items()},
        "load": (load0 + os.getloadavg()[0]) / 2,
    }


def start_tree(
    sup: Supervisor, workdir: Path, ca_dir: Path, tree: str, workers: int = 1
) -> PathRuntime:
    """The node-proxy pair running the sources of `tree` ("." = this checkout), each proxy with
    `workers` workers."""
    old = os.environ.get("PYTHONPATH")
    if tree != ".":
        os.environ["PYTHONPATH"] = str(Path(tree).resolve())
    try:
        return start_ztunnel_pair(sup, workdir, ca_dir, workers)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _brief(name: str, r: dict[str, Any]) -> str:
    cpu = " ".join(f"{k}={v:.3f}" for k, v in r["cpu_per_gbit"].items())
    heap = r["peak_heap_mib"]
    peak = " ".join(f"{k}={v:.1f}/{heap[k]:.1f}" for k, v in r["peak_rss_mib"].items())
    return (
        f"{name:8s} {r['gbps']:5.2f} Gb/s  CPU-s/Gbit {r['cpu_per_gbit_sum']:.3f} ({cpu})  "
        f"peak RSS/heap MiB {peak}  load {r['load']:.1f}"
    )


def run(args: argparse.Namespace, sup: Supervisor, workdir: Path) -> dict[str, list[Any]]:
    trees = dict(t.split("=", 1) for t in args.tree)
    start_backend(sup, workdir)
    ca_dir = workdir / "ca"
    ca_dir.mkdir()
    if args.hold:
        if args.hold == "envoy":
            rt = start_envoy_pair(sup, workdir, make_certs(workdir, ca_dir))
        else:
            rt = start_tree(sup, workdir, ca_dir, trees[args.hold])
        log("pids: " + " ".join(f"{p.name}={p.pid}" for p in rt.proxies))
        loadgen(["bulk", rt.addr[0], str(rt.addr[1]), "--duration", "1"], 60)  # warm-up
        log(f"holding: bulk for {args.duration:g} s")
        log(_brief(args.hold, bulk_round(rt, args.duration)))
        return {}
    envoy = None if args.no_envoy else start_envoy_pair(sup, workdir, make_certs(workdir, ca_dir))
    results: dict[str, list[Any]] = {}
    for rnd in range(args.rounds):
        if envoy is not None:
            r = bulk_round(envoy, args.duration)
            results.setdefault("envoy", []).append(r)
            log(f"round {rnd + 1} " + _brief("envoy", r))
        for name, tree in trees.items():
            rt = start_tree(sup, workdir, ca_dir, tree)
            loadgen(["bulk", rt.addr[0], str(rt.addr[1]), "--duration", "0.5"], 60)  # warm-up
            r = bulk_round(rt, args.duration)
            for p in rt.proxies:
                sup.stop(p)
            results.setdefault(name, []).append(r)
            log(f"round {rnd + 1} " + _brief(name, r))
    return results


def report(results: dict[str, list[Any]]) -> None:
    env = results.get("envoy")
    env_cpu = statistics.median(r["cpu_per_gbit_sum"] for r in env) if env else None
    head = "| tree | Gb/s | CPU-s per Gbit, both (A / B) | vs Envoy | peak RSS A / B | heap B |"
    print(head + " load |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in results.items():
        med = statistics.median
        cpu = med(r["cpu_per_gbit_sum"] for r in rs)
        names = list(rs[0]["cpu_per_gbit"])
        per = " / ".join(f"{med(r['cpu_per_gbit'][n] for r in rs):.3f}" for n in names)
        rss = " / ".join(f"{med(r['peak_rss_mib'][n] for r in rs):.1f}" for n in names)
        heap = f"{med(r['peak_heap_mib'][names[-1]] for r in rs):.1f}"
        ratio = f"{cpu / env_cpu:.2f}x" if env_cpu else "-"
        loads = f"{min(r['load'] for r in rs):.1f}-{max(r['load'] for r in rs):.1f}"
        print(
            f"| {name} | {med(r['gbps'] for r in rs):.2f} | {cpu:.3f} ({per}) | {ratio} "
            f"| {rss} | {heap} | {loads} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per bulk run")
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--hold", help="run only this tree, one bulk run of --duration seconds")
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    args = ap.parse_args(argv)
    if not args.tree:
        args.tree = ["branch=."]
    return run_ab(args, "bulk-", run, report)


if __name__ == "__main__":
    raise SystemExit(main())
