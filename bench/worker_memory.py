"""What an idle node-proxy worker holds, by mapping and by imported package (issue 14, memory).

Owns: the idle-worker probe (the real `ztunnel.app.main`, static mode or fed by the control
plane, one worker, in a fresh interpreter under `-X importtime`; once ready it reports VmRSS,
Pss, its modules and the RSS of each mapping of `/proc/self/smaps`, then stops) and the
marginal cost of a package: a fresh
interpreter imports every module the worker imported except the package's import subtree (the
modules first imported under it) and those that would pull it in, reads VmRSS, imports the
subtree, reads VmRSS again (median of 3). The marginal cost is what making the package lazy
could save at most; modules imported by something else too are not counted. With
``--per-module N`` the probe also runs under `tracemalloc` and lists the N modules whose own
import (its body, or an extension module's initialisation, without the modules it imports)
left the most memory allocated: the cost of each module (its VmRSS is then tracemalloc's, not
comparable with a run without it).

`--controlplane`: the worker is fed by our control plane instead (plaintext xDS + CA on
127.0.96.2:15012, started from the same source tree, serving one pod on the worker's node): its
first state applied and its certificate fetched before it is ready, so the report is an idle
control-plane worker with its xDS stream open.

Run it in a network namespace of its own (fixed addresses 127.0.96.x):

    unshare -n bash -c 'ip link set lo up; exec .venv/bin/python -m bench.worker_memory \
        --packages prometheus_client,yaml'

`PYTHONPATH=<tree>` runs another source tree's worker (A/B, as bench/README.md describes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NODE, POD = "127.0.96.1", "127.0.96.10"
MESH = f"""workloads:
- {{uid: w1, name: web, namespace: default, serviceAccount: web, addresses: [{POD}],
   node: node-w, tunnelProtocol: HBONE}}
services: []
policies: []
"""

PROBE = """
import json, os, signal, sys, threading, time
from pathlib import Path
import ztunnel.app

ready, out = Path(sys.argv[1]), Path(sys.argv[2])

def mappings() -> dict[str, int]:
    by: dict[str, int] = {}
    name = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if not parts[0].endswith(":"):
            name = parts[5] if len(parts) > 5 else "[anon]"
        elif parts[0] == "Rss:":
            by[name] = by.get(name, 0) + int(parts[1])
    return by

def field(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0

def report() -> None:
    while not ready.exists():
        time.sleep(0.02)
    time.sleep(1)
    out.write_text(json.dumps({
        "rss_kib": field("/proc/self/status", "VmRSS"),
        "pss_kib": field("/proc/self/smaps_rollup", "Pss"),
        "modules": sorted(sys.modules),
        "mappings": mappings(),
        "per_module": globals().get("_self", {}),
    }))
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report, daemon=True).start()
sys.exit(ztunnel.app.main(sys.argv[3:]))
"""

PER_MODULE = """
import tracemalloc
tracemalloc.start(1)
import importlib._bootstrap_external as _be
_stack, _self = [], {}

def _wrap(orig, name_of):
    def load(self, arg):
        _stack.append([tracemalloc.get_traced_memory()[0], 0])
        try:
            return orig(self, arg)
        finally:
            t0, children = _stack.pop()
            total = tracemalloc.get_traced_memory()[0] - t0
            name = name_of(arg)
            _self[name] = _self.get(name, 0) + total - children
            if _stack:
                _stack[-1][1] += total
    return load

_be._LoaderBasics.exec_module = _wrap(_be._LoaderBasics.exec_module, lambda m: m.__name__)
_be.ExtensionFileLoader.create_module = _wrap(
    _be.ExtensionFileLoader.create_module, lambda spec: spec.name
)
"""

MARGINAL = """
import gc, importlib, sys
def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0
base, sub, probe = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3] == "probe"
subset, pulled = set(sub), []
for m in base:
    if m in sys.modules:
        continue
    try:
        importlib.import_module(m)
    except Exception:
        pass
    if probe and subset & set(sys.modules):
        pulled.append(m)
        for k in [k for k in sys.modules if k in subset]:
            del sys.modules[k]
if probe:
    print(",".join(pulled))
    sys.exit()
gc.collect()
before = rss()
for m in sub:
    try:
        importlib.import_module(m)
    except Exception:
        pass
gc.collect()
print(rss() - before)
"""

# Platform modules the import log names on other systems, or that fail outside their package.
SKIP = frozenset({"__main__", "_winapi", "winreg", "nt", "_overlapped", "snappy"})


CONTROLPLANE = "127.0.96.2"
TOKEN = "worker-memory-node-w-token-0123456789"
MANIFESTS = f"""apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: default, labels: {{app: web}}}}
spec: {{serviceAccountName: web, nodeName: node-w}}
status: {{podIP: {POD}}}
"""
CONTROLPLANE_MAIN = "import sys, controlplane.app; sys.exit(controlplane.app.main(sys.argv[1:]))"


def start_controlplane(workdir: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Our control plane (plaintext, loopback) serving one pod on node-w; the worker's flags."""
    (workdir / "manifests").mkdir()
    (workdir / "manifests" / "mesh.yaml").write_text(MANIFESTS)
    (workdir / "creds.yaml").write_text(f"node-w: {TOKEN}\n")
    (workdir / "node-w.token").write_text(TOKEN + "\n")
    argv = [sys.executable, "-c", CONTROLPLANE_MAIN, "--listen", f"{CONTROLPLANE}:15012"]
    argv += ["--plaintext", "--manifest-dir", str(workdir / "manifests")]
    argv += ["--ca-dir", str(workdir / "cp-ca"), "--node-credentials", str(workdir / "creds.yaml")]
    argv += ["--log-level", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    feed = ["--xds-address", f"{CONTROLPLANE}:15012"]
    return proc, [*feed, "--node-credential-file", str(workdir / "node-w.token")]


def idle_worker(
    workdir: Path, controlplane: bool = False, *, per_module: bool = False
) -> tuple[dict[str, object], str]:
    """Run the probe (under `tracemalloc` with `per_module`); its report and its `-X importtime`
    log."""
    mesh = workdir / "mesh.yaml"
    mesh.write_text(MESH)
    ready, out = workdir / "ready", workdir / "report.json"
    code = PER_MODULE + PROBE if per_module else PROBE
    argv = [sys.executable, "-X", "importtime", "-c", code, str(ready), str(out)]
    argv += ["--node", "node-w", "--node-ip", NODE, "--capture", "bind", "--drain-timeout", "1"]
    argv += ["--ready-file", str(ready), "--no-access-log"]
    cp: subprocess.Popen[bytes] | None = None
    if controlplane:
        cp, feed = start_controlplane(workdir)
        argv += feed
    else:
        argv += ["--mesh-config", str(mesh), "--ca-dir", str(workdir / "ca")]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    finally:
        if cp is not None:
            cp.terminate()
            cp.wait(10)
    if not out.exists():
        sys.exit(f"the probe did not report:\n{done.stderr[-3000:]}")
    report: dict[str, object] = json.loads(out.read_text())
    return report, done.stderr


def import_log(text: str) -> list[tuple[int, str]]:
    """(depth, module) per `-X importtime` line, in the log's order (children first)."""
    out = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        raw = line.split("|")[2].rstrip("\n")
        out.append(((len(raw) - len(raw.lstrip(" "))) // 2, raw.strip()))
    return out


def subtree(entries: list[tuple[int, str]], package: str) -> set[str]:
    """`package` and every module first imported while it was being imported."""
    found: set[str] = set()
    for i, (depth, name) in enumerate(entries):
        if name != package:
            continue
        found.add(name)
        j = i - 1
        while j >= 0 and entries[j][0] > depth:
            found.add(entries[j][1])
            j -= 1
    return found


def marginal_mib(entries: list[tuple[int, str]], package: str) -> tuple[float, int]:
    """(marginal RSS in MiB, modules in the subtree); see the module docstring."""
    sub = subtree(entries, package)
    order = [n for _, n in entries if n not in SKIP and not n.startswith("encodings")]
    cand = [m for m in order if m in sub]
    excluded: set[str] = set()
    base: list[str] = []
    for _ in range(40):  # drop the importers that pull the subtree in, until none does
        base = [m for m in order if m not in sub and m not in excluded]
        pulled = _child(base, cand, "probe").split(",")
        if pulled == [""]:
            break
        excluded.update(pulled)
    runs = [int(_child(base, cand, "run")) for _ in range(3)]
    return statistics.median(runs) / 1024, len(sub)


def _child(base: list[str], cand: list[str], mode: str) -> str:
    argv = [sys.executable, "-c", MARGINAL, ",".join(base), ",".join(cand), mode]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True, cwd="/")
    return done.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packages", default="", help="comma list: marginal RSS of each")
    ap.add_argument("--mappings", type=int, default=12, help="largest mappings to print")
    ap.add_argument("--controlplane", action="store_true", help="a worker fed by the control plane")
    ap.add_argument(
        "--per-module", type=int, default=0, help="under tracemalloc: the N costliest modules"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="worker-memory-") as tmp:
        report, log_text = idle_worker(Path(tmp), args.controlplane, per_module=args.per_module > 0)
    modules = report["modules"]
    assert isinstance(modules, list)
    rss, pss = report["rss_kib"], report["pss_kib"]
    assert isinstance(rss, int)
    assert isinstance(pss, int)
    mode = "control-plane" if args.controlplane else "static"
    print(f"idle {mode} worker: VmRSS {rss / 1024:.1f} MiB, Pss {pss / 1024:.1f} MiB, ", end="")
    print(f"{len(modules)} modules")
    print("\n| mapping | RSS (MiB) |\n|---|---:|")
    by = report["mappings"]
    assert isinstance(by, dict)
    for name, kib in sorted(by.items(), key=lambda kv: -int(kv[1]))[: args.mappings]:
        print(f"| `{name}` | {int(kib) / 1024:.2f} |")
    per = report["per_module"]
    assert isinstance(per, dict)
    if per:
        total = sum(int(v) for v in per.values())
        print(f"\nimports under tracemalloc: {total / 1024:.0f} KiB in {len(per)} modules")
        print("\n| module (its own import) | KiB |\n|---|---:|")
        for name, size in sorted(per.items(), key=lambda kv: -int(kv[1]))[: args.per_module]:
            print(f"| `{name}` | {int(size) / 1024:.0f} |")
    entries = import_log(log_text)
    packages = [p for p in args.packages.split(",") if p]
    if packages:
        print("\n| package (import subtree) | modules | marginal RSS (MiB) |\n|---|---:|---:|")
    for package in packages:
        if not subtree(entries, package):
            print(f"| `{package}` | not imported | |")
            continue
        mib, n = marginal_mib(entries, package)
        print(f"| `{package}` | {n} | {mib:.2f} |")


if __name__ == "__main__":
    main()
