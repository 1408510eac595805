"""A test run killed before its teardown leaves processes behind (a Kubernetes control plane,
node proxies, each in its own session): the next run kills them, and never a live run's
(tests/runreaper.py, run by tests/conftest.py at the start of every run)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import runreaper

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def gone_run() -> str:
    """The token of a run whose pytest process has exited."""
    proc = subprocess.Popen(SLEEPER)
    token = runreaper.token_of(proc.pid)
    proc.kill()
    proc.wait()
    assert not runreaper.alive(token)
    return token


def leftover(token: str) -> subprocess.Popen[bytes]:
    """A process started by the run `token`, in its own session (as `system.spawn` does)."""
    env = {**os.environ, runreaper.ENV: token}
    return subprocess.Popen(SLEEPER, env=env, start_new_session=True)


def test_the_processes_of_a_gone_run_are_killed_a_live_runs_are_not(tmp_path: Path) -> None:
    owner = subprocess.Popen(SLEEPER)  # a concurrent run, still going
    live = runreaper.token_of(owner.pid)
    dead = gone_run()
    procs = [leftover(dead), leftover(dead), leftover(live)]
    bystander = subprocess.Popen(
        SLEEPER, env={k: v for k, v in os.environ.items() if k != runreaper.ENV}
    )
    try:
        reaped = runreaper.reap(tmp_path / "runs", log=lambda _: None)
        assert procs[0].wait(10) == -9
        assert procs[1].wait(10) == -9
        assert f"process {procs[0].pid} of gone run {dead}" in reaped
        assert procs[2].poll() is None  # the live run's
        assert bystander.poll() is None  # no token: not the reaper's
        assert owner.poll() is None
        assert runreaper.alive(live)
        # This run's own processes carry its live token (tests/conftest.py).
        assert os.environ[runreaper.ENV] == runreaper.token_of(os.getpid())
    finally:
        for p in (*procs, bystander, owner):
            p.kill()
            p.wait()


INNER = """
import time
from pathlib import Path

import pytest
from ambientctl.lab import system

def test_starts_a_control_plane_and_is_killed(tmp_path):
    pid = system.spawn({argv!r}, log=tmp_path / "x.log")
    Path({pid_file!r} + ".tmp").write_text(str(pid))
    Path({pid_file!r} + ".tmp").rename({pid_file!r})
    time.sleep(120)
"""


def test_a_killed_runs_leftovers_carry_its_token_and_the_next_run_reaps_them(
    tmp_path: Path,
) -> None:
    """End to end: a pytest run (with the suite's conftest) starts a process the way the lab
    starts a kube-apiserver, and is SIGKILLed: no teardown runs, the process stays; it carries
    the dead run's token, and reaping kills it."""
    pid_file = tmp_path / "pid"
    test = tmp_path / "test_inner.py"
    test.write_text(INNER.format(argv=SLEEPER, pid_file=str(pid_file)))
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    inner = subprocess.Popen([*argv, str(test)], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert inner.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        left = int(pid_file.read_text())
        token = runreaper.token_of(inner.pid)
        inner.kill()
        inner.wait()
        assert runreaper.start_time(left) is not None  # no teardown ran: still there
        assert runreaper._environ_token(left) == token
        assert not runreaper.alive(token)
        reaped = runreaper.reap(tmp_path / "runs", log=lambda _: None)
        assert f"process {left} of gone run {token}" in reaped
        deadline = time.monotonic() + 10
        while runreaper.start_time(left) is not None and time.monotonic() < deadline:
            time.sleep(0.05)  # killed; its parent is gone, so init collects it
        assert runreaper.start_time(left) is None
    finally:
        inner.kill()
        inner.wait()


def test_a_runs_directory_others_may_write_to_is_neither_read_nor_written(tmp_path: Path) -> None:
    """Another user able to write to the runs directory could plant a record naming a
    namespace, which a root run would then delete: such a directory is not used at all, and a
    record that is a symlink is never written through."""
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o700)
    assert runreaper.trusted(runs)
    victim = tmp_path / "victim"
    victim.write_text("kept\n")
    (runs / "1.2.netns").symlink_to(victim)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        runreaper.record_netns(runs, "1.2", "planted")
    assert victim.read_text() == "kept\n"

    runs.chmod(0o777)
    assert not runreaper.trusted(runs)
    runreaper.record_netns(runs, "3.4", "x")
    assert not (runs / "3.4.netns").exists()
    logged: list[str] = []
    runreaper.reap(runs, log=logged.append)
    assert any("is not this user's own directory" in line for line in logged)
    link = tmp_path / "link"
    link.symlink_to(runs.parent)
    assert not runreaper.trusted(link)  # the directory itself may not be a symlink
