"""A node proxy fed by the control plane with two workers (`--workers 2 --xds-address`, issue
14; `ztunnel.workers`): both workers serve traffic on the shared listeners, and a config change
(a new policy) reaches both.

Node B is the real `ztunnel` process (two workers, bind capture: its HBONE listener is bound on
the echo pod's address from the first full state); the control plane and node A run in this
test's event loop (tests/loopback/cpfixtures.py). Which worker accepts a connection is the
kernel's choice, so each check stops the other worker (SIGSTOP): the one left must serve alone.
Node A's pool is emptied before each call, so every call is a new HBONE connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.helpers import BIN, run, spawn, stop_processes
from tests.loopback.cpfixtures import (
    DENY_SLEEP,
    NODE_A,
    NODE_B,
    VIP,
    Node,
    base_manifests,
    call_echo,
    cp_settings,
    echo_backend,
    node_b_args,
    running_controlplane,
    start_node,
    stop_node,
    write_manifests,
)


def children_of(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


async def ready(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"node-b exited:\n{log.read_text()[-3000:]}"
        try:
            reader, writer = await asyncio.open_connection(NODE_B, 15021)
            writer.write(b"GET /healthz/ready HTTP/1.0\r\n\r\n")
            status = (await reader.readline()).split()
            writer.close()
            if status[1:2] == [b"200"]:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"node-b not ready:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def node_b_process(
    tmp: Path, name: str = "node-b"
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Node B's ztunnel; `name` names its log and ready file (a successor has its own)."""
    log = tmp / f"{name}.log"
    argv = [str(BIN / "ztunnel"), *node_b_args(tmp), "--workers", "2", "--drain-timeout", "1"]
    argv += ["--handover-socket", str(tmp / "handover.sock")]
    argv += ["--ready-file", str(tmp / f"{name}.ready")]
    proc = spawn(argv, log)
    try:
        yield proc, log
    finally:
        stop_processes(proc)


@contextlib.contextmanager
def only(worker: int, workers: list[int]) -> Iterator[None]:
    """Every other worker stopped (SIGSTOP) meanwhile: `worker` accepts alone."""
    others = [w for w in workers if w != worker]
    for w in others:
        os.kill(w, signal.SIGSTOP)
    try:
        yield
    finally:
        for w in others:
            os.kill(w, signal.SIGCONT)


async def fresh_call(node_a: Node) -> bool:
    node_a.proxy.ctx.pool.close_all()  # a new HBONE connection, accepted by a running worker
    return await call_echo()


async def until(node_a: Node, want: bool, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (got := await fresh_call(node_a)) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return got


@contextlib.asynccontextmanager
async def mesh(tmp: Path) -> AsyncIterator[tuple[Node, subprocess.Popen[bytes], Path]]:
    settings = cp_settings(tmp)
    manifests = tmp / "manifests"
    assert settings.manifest_dir == manifests
    write_manifests(manifests, "base.yaml", base_manifests())
    async with running_controlplane(settings), echo_backend():
        with node_b_process(tmp) as (proc, log):
            await ready(proc, log, 60)
            node_a = await start_node("node-a", NODE_A, outbound=((VIP, 80),))
            try:
                yield node_a, proc, manifests
            finally:
                await stop_node(node_a)


@pytest.mark.timeout(120)
def test_two_workers_in_controlplane_mode_serve_and_follow_config(tmp_path: Path) -> None:
    async def main() -> None:
        async with mesh(tmp_path) as (node_a, proc, manifests):
            workers = [proc.pid, *children_of(proc.pid)]
            assert len(workers) == 2, workers
            for worker in workers:
                with only(worker, workers):
                    # A worker may still be fetching its state and certificate: bounded wait.
                    assert await until(node_a, True, 20), f"worker {worker} does not serve"
            write_manifests(manifests, "policy.yaml", [DENY_SLEEP])
            for worker in workers:
                with only(worker, workers):
                    assert not await until(node_a, False, 20), f"worker {worker} still allows"
            # And back: the policy removed reaches both again.
            (manifests / "policy.yaml").unlink()
            for worker in workers:
                with only(worker, workers):
                    assert await until(node_a, True, 20), f"worker {worker} still denies"

    run(main(), timeout=100)


async def exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return proc.poll() is not None


@pytest.mark.timeout(120)
def test_hand_over_between_two_worker_controlplane_proxies(tmp_path: Path) -> None:
    """Issue 15's hand-over with control-plane workers on both sides: the successor's first
    worker takes the listeners over after its first state and passes them to its second; the
    old workers stop accepting and exit once drained; each new worker serves alone."""

    async def main() -> None:
        async with mesh(tmp_path) as (node_a, old, _):
            assert await until(node_a, True, 20)
            with node_b_process(tmp_path, "node-b-2") as (new, log):
                deadline = time.monotonic() + 60
                while not (tmp_path / "node-b-2.ready").exists():  # written after DONE
                    assert new.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    await asyncio.sleep(0.1)
                workers = [new.pid, *children_of(new.pid)]
                assert len(workers) == 2, workers
                node_a.proxy.ctx.pool.close_all()  # GOAWAY'd by the old workers anyway
                assert await exited(old, 30), "the old node proxy did not finish its drain"
                assert old.returncode == 0
                for worker in workers:
                    with only(worker, workers):
                        assert await until(node_a, True, 20), f"new worker {worker} does not serve"

    run(main(), timeout=100)
