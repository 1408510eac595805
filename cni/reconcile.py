"""The node agent's reconcile as a plan: what to change, computed from what was read (sans-I/O).

Owns: `PodRecord` (one pod of the agent's registry), `World` (everything reconcile reads: which
registry pods still exist, this node's pods from the API, the host veths found for them, the pinned
map's enrolled and observed IPs, and each pod's label decision) and `plan_reconcile(registry, world)
-> Plan`, a pure function. The agent (`cni.agent.Agent.reconcile`) reads the world, plans, then
applies the plan's kernel steps in order; only the apply touches capture.

The rules (the agent's docstring states them from the user's side):
- a registry pod that no longer exists is forgotten ("gone");
- with an inventory (the Kubernetes label source): an adopted pod (no container id, no netns)
  that the API deleted is unenrolled and forgotten ("deleted"); a running pod of this node that
  is not in the registry, not host-network, with an IP and a host veth found, is adopted;
- an IP in the pinned map (enrolled or observed) that no live pod owns is unenrolled
  ("leftover");
- per pod: ambient -> enroll every IP the map does not already hold for this pod; not ambient ->
  observe every IP (which releases an enrolled pod in place; the kernel step is idempotent).

Invariant (pyroute2's ``ensure()`` idea): a step is planned only where the kernel's state
differs from the desired one (enroll), or where the step is idempotent (observe, unenroll of a
present entry), so applying the same plan twice, or re-planning right after applying, changes
nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRecord:
    """One pod the runtime ADDed on this node."""

    uid: str
    namespace: str
    name: str
    container_id: str
    netns: str
    ips: tuple[str, ...]
    host_ifname: str
    ambient: bool = False
    """What the labels said at the last reconcile."""
    redirection: str = ""
    """"enabled" (enrolled), "pending" (ambient, not enrolled yet) or "" (not ambient)."""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ips"] = list(self.ips)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PodRecord:
        fields = dict(d)
        fields["ips"] = tuple(fields.get("ips", ()))
        return cls(**fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdoptablePod:
    """A running pod of this node from the API, as reconcile needs it."""

    uid: str
    namespace: str
    name: str
    ips: tuple[str, ...]
    host_network: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class World:
    """What reconcile read before deciding anything."""

    alive: frozenset[str]
    """uids of registry pods whose netns and host veth still exist."""
    api_pods: Mapping[str, AdoptablePod] | None = None
    """This node's pods from the API; None without an inventory (no adoption)."""
    veths: Mapping[str, str] = field(default_factory=dict)
    """uid -> host veth, for API pods not in the registry whose veth was found."""
    enrolled: Mapping[str, str] = field(default_factory=dict)
    """ip -> uid of the pinned map's enrolled entries."""
    observed: frozenset[str] = frozenset()
    """ips of the pinned map's observed (not enrolled) entries."""
    ambient: Mapping[str, bool] = field(default_factory=dict)
    """uid -> the label decision, for every pod the registry will hold."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PodSteps:
    """The kernel steps of one pod, and its desired state."""

    uid: str
    ambient: bool
    enroll: tuple[str, ...] = ()
    observe: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    registry: dict[str, PodRecord]
    """uid -> record after forgetting and adopting (before the pods' steps are applied)."""
    unenroll: tuple[str, ...]
    """IPs to take out of the pinned map first (deleted adopted pods, then leftovers)."""
    pods: tuple[PodSteps, ...]
    changes: tuple[str, ...]
    """Human-readable registry changes (gone, deleted, adopted, leftover)."""
    skipped: tuple[str, ...] = ()
    """API pods not adopted yet because no host veth was found (retried next time)."""


def adoptable(world: World, registry: Mapping[str, PodRecord]) -> list[AdoptablePod]:
    """The API pods reconcile would adopt if their veth is found (the agent looks those up)."""
    if world.api_pods is None:
        return []
    return [
        p
        for uid, p in sorted(world.api_pods.items())
        if uid not in registry and not p.host_network and p.ips
    ]


def plan_reconcile(registry: Mapping[str, PodRecord], world: World) -> Plan:
    pods: dict[str, PodRecord] = {}
    changes: list[str] = []
    unenroll: list[str] = []
    skipped: list[str] = []
    for uid, pod in registry.items():
        if uid in world.alive:
            pods[uid] = pod
        else:
            changes.append(f"gone {pod.namespace}/{pod.name}")
    if world.api_pods is not None:
        for uid, pod in list(pods.items()):
            adopted = not pod.container_id and not pod.netns
            if adopted and uid not in world.api_pods:
                unenroll.extend(pod.ips)
                del pods[uid]
                changes.append(f"deleted {pod.namespace}/{pod.name}")
        for api_pod in adoptable(world, pods):
            veth = world.veths.get(api_pod.uid)
            if not veth:
                skipped.append(api_pod.uid)
                continue
            pods[api_pod.uid] = PodRecord(
                uid=api_pod.uid,
                namespace=api_pod.namespace,
                name=api_pod.name,
                container_id="",
                netns="",
                ips=api_pod.ips,
                host_ifname=veth,
            )
            changes.append(f"adopted {api_pod.namespace}/{api_pod.name} veth {veth}")
    live_ips = {ip for pod in pods.values() for ip in pod.ips}
    # IPs of deleted adopted pods are already being unenrolled: not leftovers as well.
    for ip in sorted((set(world.enrolled) | world.observed) - live_ips - set(unenroll)):
        changes.append(f"leftover {ip} removed")
        unenroll.append(ip)
    steps = [
        pod_steps(pod, world.ambient.get(uid, False), world.enrolled) for uid, pod in pods.items()
    ]
    return Plan(
        registry=pods,
        unenroll=tuple(unenroll),
        pods=tuple(steps),
        changes=tuple(changes),
        skipped=tuple(skipped),
    )


def pod_steps(pod: PodRecord, ambient: bool, enrolled: Mapping[str, str]) -> PodSteps:
    """One pod's steps: enroll the IPs the map does not hold for it, or observe them all."""
    if ambient:
        todo = tuple(ip for ip in pod.ips if enrolled.get(ip) != pod.uid)
        return PodSteps(uid=pod.uid, ambient=True, enroll=todo)
    return PodSteps(uid=pod.uid, ambient=False, observe=pod.ips)


def applied(pod: PodRecord, steps: PodSteps, error: str = "") -> PodRecord:
    """The record after its steps ran (`error`: the enroll that failed, if any)."""
    if not steps.ambient:
        return replace(pod, ambient=False, redirection="", error="")
    if error:
        return replace(pod, ambient=True, redirection="pending", error=error)
    return replace(pod, ambient=True, redirection="enabled", error="")
