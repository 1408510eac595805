"""A test run killed before its teardown leaves its labs' named netns behind (``k8lab-*``,
with pod processes inside that carry no run token): the next run deletes them and kills what
is inside, and never touches a netns a live run recorded (tests/runreaper.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ambientctl.lab import system
from tests import runreaper
from tests.loopback.test_runreaper import SLEEPER, gone_run


def netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True)


def test_the_netns_of_a_gone_run_are_deleted_a_live_runs_are_not(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    dead, live = gone_run(), runreaper.token_of(os.getpid())
    lab, other = f"rr{os.getpid()}", f"rl{os.getpid()}"
    # The gone run made its lab's underlay; its kubelet (another process) made a pod's netns.
    runreaper.record_netns(runs, dead, f"{lab}-underlay")
    runreaper.record_netns(runs, live, f"{other}-underlay")
    names = [f"{lab}-underlay", f"{lab}-default-echo", f"{other}-underlay", f"{lab}x-n1"]
    for name in names:
        netns(name)
    env = {k: v for k, v in os.environ.items() if k != runreaper.ENV}  # a pod's own environment
    pod = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab}-default-echo", *SLEEPER], env=env)
    try:
        reaped = runreaper.reap(runs, log=print)
        assert pod.wait(10) == -9
        assert not Path(f"/run/netns/{lab}-underlay").exists()
        assert not Path(f"/run/netns/{lab}-default-echo").exists()
        assert f"netns {lab}-default-echo of gone run {dead} (1 processes)" in reaped
        assert Path(f"/run/netns/{other}-underlay").exists()  # a live run's
        assert Path(f"/run/netns/{lab}x-n1").exists()  # not the lab's prefix
        assert not (runs / f"{dead}.netns").exists()  # reaped: its record goes
        assert (runs / f"{live}.netns").exists()
    finally:
        pod.kill()
        pod.wait()
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_this_run_records_the_netns_it_creates() -> None:
    """tests/conftest.py wraps `system.netns_add` for the run: a netns is recorded under the
    run's token before it exists (a run killed right after still has it on record)."""
    name = f"rs{os.getpid()}-underlay"
    record = runreaper.RUNS_DIR / f"{runreaper.token_of(os.getpid())}.netns"
    try:
        system.netns_add(name)
        assert system.netns_exists(name)
        recorded = record.read_text().splitlines()
        assert name in recorded
        assert f"rs{os.getpid()}-*" in recorded  # the lab's prefix: its pods' netns
    finally:
        system.netns_del(name)
