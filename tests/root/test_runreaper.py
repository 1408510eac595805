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
    pid = os.getpid()
    lab, other, again = f"rr{pid}", f"rl{pid}", f"ra{pid}"
    names = [f"{lab}-underlay", f"{lab}-default-echo", f"{other}-underlay", f"{lab}x-n1"]
    names += [f"{again}-underlay", f"{again}-default-echo"]
    # The gone run made its lab's underlay; its kubelet (another process) made a pod's netns.
    # A live run made its own lab. The lab `again` was the gone run's too, but someone (a run
    # without this mechanism) has made it again since: not the gone run's namespaces any more.
    for name in names:
        runreaper.record_netns(runs, live if name.startswith(other) else dead, name)
        netns(name)
    runreaper.record_created(runs, dead, f"{lab}-underlay")
    runreaper.record_created(runs, live, f"{other}-underlay")
    runreaper.record_created(runs, dead, f"{again}-underlay")
    subprocess.run(["ip", "netns", "del", f"{again}-underlay"], check=True)
    netns(f"{again}-underlay")
    env = {k: v for k, v in os.environ.items() if k != runreaper.ENV}  # a pod's own environment
    pods = [
        subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}-default-echo", *SLEEPER], env=env)
        for ns in (lab, again)
    ]
    try:
        reaped = runreaper.reap(runs, log=print)
        assert pods[0].wait(10) == -9
        assert not Path(f"/run/netns/{lab}-underlay").exists()
        assert not Path(f"/run/netns/{lab}-default-echo").exists()
        assert f"netns {lab}-default-echo of gone run {dead} (1 processes)" in reaped
        assert Path(f"/run/netns/{other}-underlay").exists()  # a live run's
        assert Path(f"/run/netns/{lab}x-n1").exists()  # not the lab's prefix
        assert Path(f"/run/netns/{again}-underlay").exists()  # made again since
        assert Path(f"/run/netns/{again}-default-echo").exists()
        assert pods[1].poll() is None
        assert not (runs / f"{dead}.netns").exists()  # reaped: its record goes
        assert (runs / f"{live}.netns").exists()
    finally:
        for pod in pods:
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
        st = Path(f"/run/netns/{name}").stat()
        made = f"{name} {st.st_ino}.{st.st_ctime_ns}"
        # Named before, then the namespace made; earlier tests of the run have their own lines.
        at = recorded.index(name)
        assert recorded[at : at + 2] == [name, made]
    finally:
        system.netns_del(name)
