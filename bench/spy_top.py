"""The top of a py-spy profile of running processes, as the markdown bench/README.md keeps
(issue 14: "a full run's figures and profiles are in bench/README.md").

Owns: sampling each named process (and its worker processes) with `py-spy record --format raw`
(collapsed stacks) for the same wall time, all at once, and the two tables per process: self
time (the innermost frame of each sample: where the CPU is spent) and inclusive time (every
frame of a sample counted once: which call path costs what), as shares of that process's
samples. Start the load first (for instance `bench.conn_ab --hold branch`, with `--keepalive`
for requests, or `bench.bulk_ab --hold branch`: both print the node proxies' pids), then:

    .venv/bin/python -m bench.spy_top --pid nodeA=1234 --pid nodeB=1235 --duration 10

`--idle` keeps samples of idle threads (py-spy leaves them out by default, so the shares are of
the busy time); `--native` adds C frames (py-spy pauses the process per sample then, which
slows it: compare shares, not rates).

Invariant: every py-spy it starts has ended (or is killed) when it returns.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: lines of one function merge."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    return f"{m['func']} ({Path(m['file']).name})"


def tops(collapsed: str) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, self counts, inclusive counts) of py-spy's raw output (``a;b;c N`` lines)."""
    total = 0
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return total, own, incl


def render(name: str, total: int, own: Counter[str], incl: Counter[str], top: int) -> str:
    lines = [f"**{name}** ({total} samples)", "", "| self % | function | inclusive % | path |"]
    lines.append("|---:|---|---:|---|")
    by_own = own.most_common(top)
    by_incl = [(f, n) for f, n in incl.most_common() if n < total][:top]
    for i in range(max(len(by_own), len(by_incl))):
        a = f"{100 * by_own[i][1] / total:.1f} | `{by_own[i][0]}`" if i < len(by_own) else " | "
        b = f"{100 * by_incl[i][1] / total:.1f} | `{by_incl[i][0]}`" if i < len(by_incl) else " | "
        lines.append(f"| {a} | {b} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pid", action="append", required=True, help="NAME=PID (repeatable)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=200, help="samples per second")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--idle", action="store_true")
    args = ap.parse_args(argv)
    spy = Path(sys.executable).with_name("py-spy")
    procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for spec in args.pid:
                name, _, pid = spec.partition("=")
                out = Path(tmp) / f"{name}.txt"
                argv_ = [str(spy), "record", "--format", "raw", "-o", str(out), "-p", pid]
                argv_ += ["-r", str(args.rate), "-d", f"{args.duration:g}", "--subprocesses"]
                # --native must pause the process to unwind C frames; otherwise do not.
                argv_ += ["--native"] if args.native else ["--nonblocking"]
                argv_ += ["--idle"] * args.idle
                procs.append((name, out, subprocess.Popen(argv_, stdout=subprocess.DEVNULL)))
            for _, _, p in procs:
                p.wait(timeout=args.duration + 60)
        finally:
            for _, _, p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for name, out, p in procs:
            if p.returncode != 0 or not out.exists():
                print(f"{name}: py-spy exited {p.returncode}", file=sys.stderr)
                continue
            total, own, incl = tops(out.read_text())
            print(render(name, total, own, incl, args.top) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
