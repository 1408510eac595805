"""Figure history: every bench run appends its figures to bench/history.csv, so the next
regression shows as a row that got worse (issue 14).

    .venv/bin/python bench/history.py compare              # last two runs of every figure
    .venv/bin/python bench/history.py compare --since issue-14 --figure rps
    .venv/bin/python bench/history.py show --figure change_p99_ms

Columns: date (UTC, ISO), commit (``git describe --always --dirty``; ``issue-14`` for the table
the issue was filed with), bench (cp, hbone, waypoint), figure, value, unit, envoy (Envoy's
same-run figure, empty where there is none), ratio (value / envoy), better (``higher`` or
``lower``), machine (CPUs and model), note (ends with the 1-minute load average at the end of
the run: figures from a busy machine are not comparable with a quiet one's).

Compare only rows of the same bench and machine; figures against Envoy compare by ratio (the
same-run ratio removes most of the machine's run-to-run drift), the others by value. A change
of the ratio by more than the noise printed in bench/README.md (about 5 %) is worth a bisect.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HISTORY = Path(__file__).resolve().parent / "history.csv"
COLUMNS = (
    "date",
    "commit",
    "bench",
    "figure",
    "value",
    "unit",
    "envoy",
    "ratio",
    "better",
    "machine",
    "note",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    figure: str
    value: float
    unit: str
    better: str  # "higher" or "lower"
    envoy: float | None = None
    note: str = ""


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs {model}".strip()


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def append(bench: str, figures: Iterable[Figure], path: Path = HISTORY) -> None:
    """Append one run's figures (one row each) to the history file."""
    new = not path.exists()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rev, mach = commit(), machine()
    load = f"load {os.getloadavg()[0]:.1f}"  # a busy machine moves figures (bench/README.md)
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for fig in figures:
            ratio = "" if not fig.envoy else f"{fig.value / fig.envoy:.3f}"
            w.writerow(
                [
                    date,
                    rev,
                    bench,
                    fig.figure,
                    f"{fig.value:g}",
                    fig.unit,
                    "" if fig.envoy is None else f"{fig.envoy:g}",
                    ratio,
                    fig.better,
                    mach,
                    f"{fig.note}; {load}" if fig.note else load,
                ]
            )


def rows(path: Path = HISTORY) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def compare(all_rows: list[dict[str, str]], figure: str | None, since: str | None) -> str:
    """For each (bench, figure): the first row at or after `since` (a commit or date prefix;
    default: the previous run) against the latest row."""
    out: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in all_rows:
        if figure is None or figure in r["figure"]:
            groups.setdefault((r["bench"], r["figure"]), []).append(r)
    for (bench, fig), rs in groups.items():
        last = rs[-1]
        base = rs[-2] if len(rs) > 1 else None
        if since is not None:
            base = next(
                (r for r in rs if r["commit"].startswith(since) or r["date"].startswith(since)),
                base,
            )
        key = "ratio" if last["ratio"] else "value"
        if base is None or base is last or not base[key]:
            out.append(f"{bench:8} {fig:40} {last[key]:>10} ({last['commit']}) no earlier row")
            continue
        a, b = float(base[key]), float(last[key])
        change = (b - a) / a * 100 if a else 0.0
        worse = (change < 0) if last["better"] == "higher" else (change > 0)
        flag = "WORSE" if worse and abs(change) > 5 else ""
        out.append(
            f"{bench:8} {fig:40} {key} {a:g} ({base['commit']}) -> {b:g} ({last['commit']})"
            f" {change:+.1f}% {flag}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="bench figure history (bench/history.csv)")
    p.add_argument("command", choices=("compare", "show"))
    p.add_argument("--figure", help="substring of the figure name")
    p.add_argument("--since", help="commit or date prefix of the base row (compare)")
    p.add_argument("--file", type=Path, default=HISTORY)
    args = p.parse_args(argv)
    all_rows = rows(args.file)
    if args.command == "show":
        for r in all_rows:
            if args.figure is None or args.figure in r["figure"]:
                print(",".join(r[c] for c in COLUMNS))
        return 0
    print(compare(all_rows, args.figure, args.since))
    return 0


if __name__ == "__main__":
    sys.exit(main())
