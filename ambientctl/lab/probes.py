"""Container probes and restarts as the kubelet runs them, as pure functions (the lab kubelet,
`ambientctl.lab.kubelet`, is the I/O edge that runs the checks and the processes).

Owns: a container's ``readinessProbe`` / ``livenessProbe`` read from its spec (`probe`, with
the API's defaults), the result of a series of checks (`step`: the thresholds), when the next
check is due, and the restart back-off. Semantics, from the Kubernetes documentation
("Configure Liveness, Readiness and Startup Probes"; "Pod Lifecycle", container restarts):

- a check runs ``initialDelaySeconds`` after the container started, then every
  ``periodSeconds`` (default 10), and fails when it takes longer than ``timeoutSeconds``
  (default 1);
- readiness starts False (Failure until the first success) and turns True after
  ``successThreshold`` consecutive successes (default 1), False again after
  ``failureThreshold`` consecutive failures (default 3); liveness starts True, and
  ``failureThreshold`` consecutive failures mean "restart the container";
- a container of a pod with ``restartPolicy`` Always (the default; OnFailure when it exited
  non-zero) is restarted: at once the first time, then after 10 s, doubling to 300 s (the
  kubelet's crash-loop back-off), the count reset after 10 minutes of running.

Kinds: ``exec``, ``tcpSocket``, ``httpGet`` (HTTP, GET, 200-399 is a success); a ``grpc``
probe or an unknown kind is refused (`LabCommandError`), never taken as success.
Invariant: every time here is the caller's clock (seconds); nothing here reads one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ambientctl.errors import LabCommandError

Json = Mapping[str, Any]
Which = Literal["readiness", "liveness"]
WHICH: tuple[Which, ...] = ("readiness", "liveness")
KINDS = ("exec", "tcpSocket", "httpGet")
BACKOFF_FIRST = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET = 600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    which: Which
    kind: str
    command: tuple[str, ...] = ()
    host: str = ""
    """tcpSocket/httpGet: "" means the pod's IP."""
    port: int = 0
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def probe(container: Json, which: Which) -> Probe | None:
    """The container's ``<which>Probe``, None when it declares none."""
    spec = container.get(f"{which}Probe")
    if not spec:
        return None
    name = container.get("name", "?")
    kinds = [k for k in spec if k in (*KINDS, "grpc")]
    if len(kinds) != 1 or kinds[0] not in KINDS:
        raise LabCommandError(f"container {name}: {which}Probe kind {sorted(spec)} unsupported")
    kind = kinds[0]
    action = spec[kind]
    common: dict[str, Any] = {
        "which": which,
        "kind": kind,
        "initial_delay": float(spec.get("initialDelaySeconds", 0)),
        "period": float(spec.get("periodSeconds", 10)),
        "timeout": float(spec.get("timeoutSeconds", 1)),
        "success_threshold": int(spec.get("successThreshold", 1)),
        "failure_threshold": int(spec.get("failureThreshold", 3)),
    }
    if which == "liveness" and common["success_threshold"] != 1:
        raise LabCommandError(f"container {name}: livenessProbe successThreshold must be 1")
    if kind == "exec":
        command = tuple(str(w) for w in action.get("command") or ())
        if not command:
            raise LabCommandError(f"container {name}: {which}Probe exec without a command")
        return Probe(command=command, **common)
    if kind == "httpGet" and str(action.get("scheme", "HTTP")).upper() != "HTTP":
        raise LabCommandError(f"container {name}: {which}Probe scheme {action['scheme']}")
    headers = tuple((str(h["name"]), str(h["value"])) for h in action.get("httpHeaders") or ())
    return Probe(
        host=str(action.get("host", "")),
        port=_port(container, action.get("port"), which),
        path=str(action.get("path", "/")),
        headers=headers,
        **common,
    )


def _port(container: Json, port: object, which: str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        number = int(port)
    else:
        named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or ()}
        number = int(named.get(port) or 0)
    if not 0 < number < 65536:
        raise LabCommandError(f"container {container.get('name')}: {which}Probe port {port!r}")
    return number


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeState:
    """The outcome of the checks so far. ``ok``: ready (readiness) / alive (liveness)."""

    ok: bool
    next_at: float
    successes: int = 0
    failures: int = 0


def initial(p: Probe, started: float) -> ProbeState:
    """Before the first check: not ready, but alive."""
    return ProbeState(ok=p.which == "liveness", next_at=started + p.initial_delay)


def step(p: Probe, state: ProbeState, passed: bool, now: float) -> ProbeState:
    """The state after one check (its result ``passed``, finished at ``now``)."""
    successes = state.successes + 1 if passed else 0
    failures = 0 if passed else state.failures + 1
    ok = state.ok
    if passed and successes >= p.success_threshold:
        ok = True
    elif not passed and failures >= p.failure_threshold:
        ok = False
    return dataclasses.replace(
        state, ok=ok, next_at=now + p.period, successes=successes, failures=failures
    )


def restarts(policy: str, exit_code: int) -> bool:
    """Whether a container that exited with ``exit_code`` is started again."""
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def backoff(count: int, ran: float) -> float:
    """Seconds to wait before restart number ``count + 1`` of a container that ran ``ran``
    seconds: none the first time or after 10 minutes of running, then 10 s doubling to 300 s."""
    if count == 0 or ran >= BACKOFF_RESET:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** (count - 1))
