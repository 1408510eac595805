"""Forked workers share the first worker's start-up objects (issue 14, memory): with
`--workers 2` the objects imported before the fork are frozen out of the cyclic GC
(`ztunnel.app.freeze_before_fork`), so a worker's collections do not write their GC headers and
copy the pages they sit on (bench/README.md, "session 6, memory": 16.4 -> 10.0 MiB private
dirty memory per worker).

The real `ztunnel.app.main` runs in a subprocess with two workers; an `os.register_at_fork`
hook records, in the forked worker right after fork(2), how many objects the GC holds frozen;
once the first worker is ready (static mode) or the worker has forked (control-plane mode,
which forks before it dials the control plane: none is needed here) the probe stops the proxy.

Addresses: node 127.0.98.1, local workload 127.0.98.10, an unused control-plane port
127.0.98.2:15012.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import one_workload_mesh, static_args

NODE = "127.0.98.1"
POD = "127.0.98.10"

PROBE = """
import gc, os, signal, sys, threading, time
from pathlib import Path
import ztunnel.app

ready, frozen = Path(sys.argv[1]), Path(sys.argv[2])
os.register_at_fork(after_in_child=lambda: frozen.write_text(str(gc.get_freeze_count())))

def stop() -> None:
    while not ready.exists():
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=stop, daemon=True).start()
sys.exit(ztunnel.app.main(sys.argv[3:]))
"""


# Every module, class and function imported before the fork: tens of thousands of objects
# (~35,000 in a static worker); without the freeze the count is 0 until the worker's own
# `tune_gc` after start-up.
FROZEN_AT_LEAST = 10_000


def run_probe(stop_when: Path, frozen: Path, *args: str) -> int:
    argv = [sys.executable, "-c", PROBE, str(stop_when), str(frozen), *args]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False, text=True)
    assert frozen.exists(), done.stderr[-3000:]
    return done.returncode


def test_static_workers_fork_with_startup_objects_frozen(tmp_path: Path) -> None:
    mesh = one_workload_mesh(tmp_path / "mesh.yaml", POD, "node-f")
    ready, frozen = tmp_path / "ready", tmp_path / "frozen"
    flags = [*static_args("node-f", NODE, mesh, drain=1), "--workers", "2"]
    code = run_probe(ready, frozen, *flags, "--ready-file", str(ready))
    assert code == 0
    assert int(frozen.read_text()) > FROZEN_AT_LEAST


def test_controlplane_workers_fork_with_startup_objects_frozen(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("token-node-f-0123456789\n")
    frozen = tmp_path / "frozen"
    run_probe(
        frozen,
        frozen,
        "--node",
        "node-f",
        "--node-ip",
        NODE,
        "--xds-address",
        "127.0.98.2:15012",
        "--node-credential-file",
        str(token),
        "--capture",
        "bind",
        "--workers",
        "2",
    )
    assert int(frozen.read_text()) > FROZEN_AT_LEAST
