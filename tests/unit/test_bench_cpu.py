"""The bench's CPU accounting (bench/harness.py `machine_cpu_seconds`, bench/hbone_bench.py
`cpu_per_op`): the rest of the machine per request and its idle share, which say why an rps
ratio can differ from the CPU-per-request ratio (issue 14)."""

from __future__ import annotations

import time

from bench.harness import machine_cpu_seconds
from bench.hbone_bench import cpu_per_op


def test_machine_cpu_seconds_counts_a_busy_loop() -> None:
    busy0, idle0 = machine_cpu_seconds()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    busy1, idle1 = machine_cpu_seconds()
    assert busy1 - busy0 >= 0.25  # this process alone burnt 0.3 s of CPU
    assert idle1 >= idle0


def test_children_and_comm_cpu_seconds_see_a_child_process() -> None:
    import subprocess
    import sys

    from bench.harness import children_cpu_seconds, comm_cpu_seconds

    before = children_cpu_seconds()
    busy = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", busy], check=True)
    assert children_cpu_seconds() - before >= 0.25
    assert comm_cpu_seconds("no-such-process-name") == 0.0


def test_cpu_per_op_splits_proxies_and_the_rest_of_the_machine() -> None:
    runs = [
        {
            "rps": 1000.0,
            "proxy_cpu_s": {"a": 0.2, "b": 0.1},
            "machine_busy_s": 1.0,
            "machine_idle_share": 0.25,
            "loadgen_cpu_s": 0.2,
        },
        {
            "rps": 2000.0,
            "proxy_cpu_s": {"a": 0.4, "b": 0.2},
            "machine_busy_s": 1.8,
            "machine_idle_share": 0.05,
            "loadgen_cpu_s": 0.3,
        },
        {
            "rps": 1000.0,
            "proxy_cpu_s": {"a": 0.3, "b": 0.1},
            "machine_busy_s": 1.2,
            "machine_idle_share": 0.10,
            "loadgen_cpu_s": 0.1,
        },
    ]
    out = cpu_per_op({"ztunnel": {"rps": runs}}, duration=10.0)
    # Per request over 10 s: proxies 30/30/40 us, rest 70/60/80 us; medians.
    assert round(out[("ztunnel", "rps")], 6) == 30.0
    assert round(out[("ztunnel", "rps-rest")], 6) == 70.0
    assert out[("ztunnel", "rps-idle")] == 0.10
    assert round(out[("ztunnel", "rps-loadgen")], 6) == 15.0  # 20, 15, 10 us
    assert out[("ztunnel", "rps-backend")] == 0.0  # not recorded: none
    # Older raw results (no machine figures) still give the proxies' CPU, and no rest.
    old = [{k: v for k, v in r.items() if not k.startswith("machine")} for r in runs]
    out = cpu_per_op({"ztunnel": {"rps": old}}, duration=10.0)
    assert ("ztunnel", "rps-rest") not in out
    assert round(out[("ztunnel", "rps")], 6) == 30.0


def test_spy_top_self_and_inclusive_shares() -> None:
    from bench.spy_top import render, tops

    raw = "\n".join(
        [
            "<module> (app.py:1);run (loop.py:10);read (aio.py:5) 6",
            "<module> (app.py:1);run (loop.py:10);read (aio.py:7);decrypt (tls.py:3) 3",
            "<module> (app.py:1);run (loop.py:11) 1",
            "garbage line",
        ]
    )
    total, own, incl = tops(raw)
    assert total == 10
    assert own["read (aio.py)"] == 6  # two lines of one function merge
    assert own["decrypt (tls.py)"] == 3
    assert incl["read (aio.py)"] == 9
    assert incl["run (loop.py)"] == 10
    table = render("nodeA", total, own, incl, top=3)
    assert "| 60.0 | `read (aio.py)` | 90.0 | `read (aio.py)` |" in table
    assert "run (loop.py)` |" not in table.split("\n")[4]  # 100 %: in every sample, left out
