"""The lab kubelet's probe and restart scheduling (`ambientctl.lab.kubelet` runs the pods).

Owns, for the app containers of one kubelet's running pods: each container's record
(`Container`: how to start it again, its declared probes and their state, its restarts), when a
probe check is due and what its result does (`Supervisor.probe_due`: one check task per probe at
a time, each bounded by its probe's timeout; a liveness failure stops the process, so the
restart policy restarts it), and the restart of exited containers as the pod's restartPolicy
says, after the crash-loop back-off (`Supervisor.restart`). The rules themselves (thresholds,
back-off, which exits restart) are the pure `ambientctl.lab.probes`; one check process is
`ambientctl.lab.probecheck`.

Invariants: a check's result is dropped when its container was restarted or its pod began
terminating meanwhile; a terminating pod gets no checks and no restarts (its `terminating`
task is set: `LabKubelet._finish`); an exited container gets no checks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ambientctl.lab import probecheck, probes, system

if TYPE_CHECKING:  # the kubelet's pod record (the kubelet imports this module)
    from ambientctl.lab.kubelet import RunningPod

log = logging.getLogger("ambientctl.lab.kubelet")


@dataclass(slots=True)
class Container:
    """One app container of a running pod: how to (re)start it, its probes and restarts."""

    argv: list[str]
    env: dict[str, str]
    declared: dict[probes.Which, probes.Probe]
    state: dict[probes.Which, probes.ProbeState] = field(default_factory=dict)
    checking: dict[probes.Which, asyncio.Task[None]] = field(default_factory=dict)
    exec_argv: dict[probes.Which, list[str]] = field(default_factory=dict)
    """Exec probes when containers do not get a mount namespace: their paths mapped."""
    restarts: int = 0
    started: float = 0.0
    """Monotonic time of the current process's start."""
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    exited_at: float = 0.0

    def begin(self, now: float) -> None:
        """A (re)started process: probes from scratch (readiness False, liveness True)."""
        self.started = now
        self.started_at = dt.datetime.now(dt.UTC)
        self.state = {w: probes.initial(p, now) for w, p in self.declared.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class Supervisor:
    """Probes and restarts of one lab node's containers (see module doc)."""

    node_netns: str
    """Where hostNetwork pods' network checks run."""
    python: str
    """The interpreter of the network check processes."""
    path_env: str
    bind_mounts: bool
    """Containers have their own mount namespace: exec probes enter it (else they run with
    their paths mapped, `Container.exec_argv`)."""

    def restart(self, rp: RunningPod, policy: str, now: float) -> None:
        """Start again the containers that exited, as the pod's restartPolicy says, after
        the crash-loop back-off (`probes.backoff`)."""
        for c, code in list(rp.exited.items()):
            ct = rp.containers.get(c)
            if ct is None or not probes.restarts(policy, code):
                continue
            if now < ct.exited_at + probes.backoff(ct.restarts, ct.exited_at - ct.started):
                continue
            log.info("pod %s/%s: restarting %s (exited %d)", rp.namespace, rp.name, c, code)
            rp.pids[c] = system.spawn(ct.argv, log=rp.dir / f"{c}.log", cwd=rp.dir, env=ct.env)
            del rp.exited[c]
            ct.restarts += 1
            ct.begin(now)

    def probe_due(self, pods: Iterable[RunningPod]) -> None:
        """Start the checks that are due (each a task, bounded by its probe's timeout); their
        results are reported by the kubelet's next status pass."""
        now = time.monotonic()
        for rp in pods:
            if rp.terminating is not None:
                continue
            for c, ct in rp.containers.items():
                if c in rp.exited:
                    continue
                for which, p in ct.declared.items():
                    busy = ct.checking.get(which)
                    if (busy is None or busy.done()) and now >= ct.state[which].next_at:
                        ct.checking[which] = asyncio.create_task(self._check(rp, c, ct, p))

    async def _check(self, rp: RunningPod, c: str, ct: Container, p: probes.Probe) -> None:
        started = ct.started
        passed = await self._probe_once(rp, c, ct, p)
        if ct.started != started or rp.terminating is not None:
            return  # the container was restarted (or the pod is going) meanwhile
        state = ct.state[p.which] = probes.step(p, ct.state[p.which], passed, time.monotonic())
        if p.which == "liveness" and not state.ok and c not in rp.exited:
            # As the kubelet: a container that failed its liveness probe is killed (grace
            # period, then SIGKILL) and restarted by the restart policy.
            log.warning("pod %s/%s: %s failed its liveness probe", rp.namespace, rp.name, c)
            ct.state[p.which] = probes.ProbeState(ok=True, next_at=float("inf"))
            await asyncio.to_thread(system.stop, rp.pids[c], timeout=min(rp.grace, 30.0))

    async def _probe_once(self, rp: RunningPod, c: str, ct: Container, p: probes.Probe) -> bool:
        """One check: exec in the container (its mount and network namespaces), or a TCP
        connect / HTTP GET from the pod's network namespace (a short-lived process there: the
        kubelet never enters a netns itself). The check process's own start-up gets
        `probecheck.STARTUP` seconds on top of the probe's timeout."""
        netns = rp.netns or self.node_netns
        if p.kind == "exec":
            if self.bind_mounts:
                argv = ["nsenter", "-t", str(rp.pids[c]), "-m", "-n", "--", *p.command]
            else:
                argv = ct.exec_argv[p.which]
            env = ct.env
        else:
            argv = probecheck.network_argv(p, netns, rp.ip, self.python)
            env = {"PATH": self.path_env}
        what = f"pod {rp.namespace}/{rp.name}: {p.which} probe of {c}"
        return await probecheck.run(argv, env, p.timeout, what)
