"""The node agent: enrolls pods into capture, for the CNI plugin and for live label changes.

Owns, per node: the local API (cni.protocol, JSON lines on a unix socket), the pod registry
(``pods.json`` in the state dir: every pod the CNI plugin ADDed and not yet DELeted), and the
reconciliation that makes capture match the labels:
    desired(pod) = wants_ambient(namespace labels, pod labels)      (cni.labels)
    desired and not enrolled -> capture.enroll(uid, ip, veth)       (redirection "enabled")
    not desired              -> capture.unenroll(ip); capture.observe(ip, veth)
    pinned-map entry with no live pod in the registry -> capture.unenroll(ip)  (leftover)
With a pod inventory (the Kubernetes label source: this node's pods from the API), reconcile
also ADOPTS pods that run on the node but were never ADDed through the plugin (they started
before the agent or before the plugin was chained): their IPs come from the API, their
host-side veth from the kernel (`find_veth`: the route to the pod IP, through a bridge's
forwarding table if needed); adopted pods leave the registry when the API deletes them.
Reconcile reads the world first (`_world`), computes a plan with the pure
`cni.reconcile.plan_reconcile`, then applies its kernel steps. Capture is
`ebpf.redirect.NodeCapture` in production; tests inject any object with the same methods
(`Capture`).

Invariants:
- The registry is written (atomically: temp file + rename) before the answer to ADD/DEL is sent,
  so an agent restart never forgets a pod the runtime believes exists.
- The registry is shared by every agent of the node (a DaemonSet surge runs the old and the new
  agent side by side for a moment): each operation (`handle`, `reconcile`) holds the state dir's
  lock (``pods.lock``, flock) and works on the registry as it is on disk, never on a copy that
  another agent has changed since. So a pod ADDed through one agent is never a "leftover" to
  the other.
- Enrollment lives in the pinned map, not in this process: stopping or restarting the agent
  never uninstalls capture (only `python -m cni.agent uninstall` does: the inverse of install).
- An ambient pod whose enrollment failed is answered with EnrollFailed (101) so the plugin fails
  the ADD (no pod runs un-captured); it stays in the registry as "pending" until the runtime's DEL.
- Every operation is idempotent: ADD twice, DEL of an unknown pod, reconcile at any time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cni import protocol
from cni.errors import AgentProtocolError, CniError, EnrollFailed, NotEnrolled
from cni.labels import LabelSource, ManifestLabels, wants_ambient
from cni.reconcile import (
    AdoptablePod,
    PodSteps,
    World,
    adoptable,
    applied,
    plan_reconcile,
    pod_steps,
)
from cni.reconcile import (
    PodRecord as PodRecord,
)
from meshcore.runtime import stop_on_signals

if TYPE_CHECKING:
    from cni.kubelabels import LocalPod

log = logging.getLogger("ambient.agent")


class CaptureEntry(Protocol):
    @property
    def uid(self) -> str: ...
    @property
    def ip(self) -> str: ...


class Capture(Protocol):
    """The subset of ebpf.redirect.NodeCapture the agent drives."""

    def install(self) -> None: ...
    def uninstall(self) -> None: ...
    def enroll(self, *, uid: str, ip: str, host_ifname: str) -> Any: ...
    def unenroll(self, *, ip: str) -> None: ...
    def enrolled(self) -> Mapping[str, Any]: ...
    def observed(self) -> Mapping[str, Any]: ...
    def observe(self, *, ip: str, host_ifname: str) -> None: ...


class PodInventory(Protocol):
    """This node's pods as the API server knows them (uid -> pod)."""

    def local_pods(self) -> Mapping[str, LocalPod]: ...


def _default_exists(pod: PodRecord) -> bool:
    """A pod is alive while its netns path and its host veth (in our netns) exist."""
    if pod.netns and not os.path.exists(pod.netns):
        return False
    try:
        socket.if_nametoindex(pod.host_ifname)
    except OSError:
        return False
    return True


def _default_pick_veth(candidates: Sequence[str], guess: str) -> str:
    """Among the host-side interfaces of a CNI result, the one that is a veth (asks netlink)."""
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - pyroute2 is a dependency
        return guess
    with IPRoute() as ipr:
        for name in candidates:
            links = ipr.get_links(ifname=name) if name else []
            for link in links:
                info = link.get_attr("IFLA_LINKINFO")
                if info is not None and info.get_attr("IFLA_INFO_KIND") == "veth":
                    return name
    return guess


def _default_find_veth(ip: str) -> str | None:
    """The host-side veth of the pod that owns `ip`, from the kernel: the route to `ip` leaves
    through the pod's veth (point-to-point CNIs) or through a bridge; then the bridge's
    forwarding table maps the pod's MAC (from the neighbour table) to the bridge port. None when
    it cannot be told (the next reconcile retries)."""
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - pyroute2 is a dependency
        return None
    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst=ip)
            oif = routes[0].get_attr("RTA_OIF") if routes else None
            if oif is None:
                return None
            link = ipr.get_links(oif)[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind == "veth":
                return str(link.get_attr("IFLA_IFNAME"))
            if kind != "bridge":
                return None
            macs = {n.get_attr("NDA_LLADDR") for n in ipr.get_neighbours(dst=ip, ifindex=oif)}
            macs.discard(None)
            for entry in ipr.get_neighbours(family=socket.AF_BRIDGE):
                if entry.get_attr("NDA_LLADDR") in macs and entry.get_attr("NDA_MASTER") == oif:
                    port = ipr.get_links(entry["ifindex"])[0]
                    return str(port.get_attr("IFLA_IFNAME"))
    except Exception as err:  # netlink errors: not found now, retried at the next reconcile
        log.debug("no veth found for %s: %s", ip, err)
    return None


@dataclass(slots=True, kw_only=True)
class Agent:
    """The agent's logic around an injected capture and label source (no sockets here)."""

    node: str
    capture: Capture
    labels: LabelSource
    state_dir: Path
    exists: Callable[[PodRecord], bool] = _default_exists
    pick_veth: Callable[[Sequence[str], str], str] = _default_pick_veth
    inventory: PodInventory | None = None
    """This node's pods from the API (Kubernetes label source): enables adoption."""
    find_veth: Callable[[str], str | None] = _default_find_veth
    pods: dict[str, PodRecord] = field(default_factory=dict)
    _label_version: object = None
    _lock_depth: int = 0

    # -- registry ---------------------------------------------------------------------------
    @property
    def registry_path(self) -> Path:
        return self.state_dir / "pods.json"

    def load(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.registry_path.exists():
            raw = json.loads(self.registry_path.read_text() or "{}")
            self.pods = {uid: PodRecord.from_dict(d) for uid, d in raw.get("pods", {}).items()}

    @contextlib.contextmanager
    def _shared_registry(self) -> Iterator[None]:
        """Hold the node's registry lock and work on the registry as on disk (see Invariants).
        Re-entrant within this agent (a "sync" request reconciles)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "pods.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.load()
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def save(self) -> None:
        tmp = self.registry_path.with_suffix(".tmp")
        data = {"node": self.node, "pods": {u: p.to_dict() for u, p in sorted(self.pods.items())}}
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.registry_path)

    # -- capture ----------------------------------------------------------------------------
    def _enrolled_ips(self) -> dict[str, str]:
        """ip -> uid of enrolled pods, from the pinned map (the kernel's truth)."""
        return {
            str(getattr(e, "ip", k)): str(getattr(e, "uid", ""))
            for k, e in self.capture.enrolled().items()
        }

    def _observed_ips(self) -> set[str]:
        return {str(getattr(e, "ip", k)) for k, e in self.capture.observed().items()}

    def _world(self) -> World:
        """Everything reconcile reads (netns/veth existence, the API's pods and their veths,
        the pinned map, the labels), before anything is changed."""
        alive = frozenset(uid for uid, pod in self.pods.items() if self.exists(pod))
        api_pods: dict[str, AdoptablePod] | None = None
        veths: dict[str, str] = {}
        if self.inventory is not None:
            api_pods = {
                uid: AdoptablePod(
                    uid=uid,
                    namespace=p.namespace,
                    name=p.name,
                    ips=p.ips,
                    host_network=p.host_network,
                )
                for uid, p in self.inventory.local_pods().items()
            }
            live = {uid: pod for uid, pod in self.pods.items() if uid in alive}
            for api_pod in adoptable(World(alive=alive, api_pods=api_pods), live):
                veth = self.find_veth(api_pod.ips[0])
                if veth:
                    veths[api_pod.uid] = veth
                else:
                    log.warning(
                        "pod %s/%s (%s): no host veth found yet",
                        api_pod.namespace,
                        api_pod.name,
                        ",".join(api_pod.ips),
                    )
        candidates = [(p.uid, p.namespace, p.name) for p in self.pods.values() if p.uid in alive]
        if api_pods is not None:
            candidates += [(u, api_pods[u].namespace, api_pods[u].name) for u in veths]
        ambient = {
            uid: wants_ambient(*self.labels.labels(namespace, name))
            for uid, namespace, name in candidates
        }
        return World(
            alive=alive,
            api_pods=api_pods,
            veths=veths,
            enrolled=self._enrolled_ips(),
            observed=frozenset(self._observed_ips()),
            ambient=ambient,
        )

    def _apply(self, pod: PodRecord, enrolled: Mapping[str, str]) -> PodRecord:
        """Make capture match the labels for one pod (ADD); returns the updated record."""
        ambient = wants_ambient(*self.labels.labels(pod.namespace, pod.name))
        return self._apply_pod(pod, pod_steps(pod, ambient, enrolled))

    def _apply_pod(self, pod: PodRecord, steps: PodSteps) -> PodRecord:
        """One pod's kernel steps; an enroll error leaves the pod pending (kept, reported)."""
        try:
            for ip in steps.enroll:
                self.capture.enroll(uid=pod.uid, ip=ip, host_ifname=pod.host_ifname)
        except Exception as err:  # capture errors come from the kernel/bcc; keep them
            log.error("enroll %s/%s failed: %s", pod.namespace, pod.name, err)
            return applied(pod, steps, str(err))
        # observe() on an enrolled pod releases it in place (the entry's flag changes; the
        # filter stays for anti-spoofing and same-node inbound capture).
        for ip in steps.observe:
            self.capture.observe(ip=ip, host_ifname=pod.host_ifname)
        return applied(pod, steps)

    def reconcile(self) -> list[str]:
        """Registry vs labels vs pinned map: read the world, plan (`cni.reconcile`), apply.
        Returns human-readable changes (for logs/tests)."""
        with self._shared_registry():
            return self._reconcile()

    def _reconcile(self) -> list[str]:
        self._label_version = self.labels.version()
        plan = plan_reconcile(self.pods, self._world())
        changes = list(plan.changes)
        self.pods = dict(plan.registry)
        for ip in plan.unenroll:
            self.capture.unenroll(ip=ip)
        for steps in plan.pods:
            pod = self.pods[steps.uid]
            updated = self._apply_pod(pod, steps)
            if updated.redirection != pod.redirection:
                changes.append(
                    f"{pod.namespace}/{pod.name} redirection "
                    f"{pod.redirection or 'disabled'} -> {updated.redirection or 'disabled'}"
                )
            self.pods[steps.uid] = updated
        self.save()
        for change in changes:
            log.info("reconcile: %s", change)
        return changes

    def labels_changed(self) -> bool:
        return self.labels.version() != self._label_version

    # -- API --------------------------------------------------------------------------------
    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        with self._shared_registry():
            return self._handle(request)

    def _handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op == "enroll":
                return self.enroll(request)
            if op == "unenroll":
                return self.unenroll(request)
            if op == "check":
                return self.check(request)
            if op == "status":
                return self.status()
            if op == "sync":
                return protocol.ok(changes=self.reconcile())
            raise AgentProtocolError(f"unknown op {op!r}", f"expected one of {protocol.OPS}")
        except CniError as err:
            return protocol.failure(err)

    @staticmethod
    def _str(request: Mapping[str, Any], key: str, *, required: bool = True) -> str:
        value = request.get(key, "")
        if not isinstance(value, str) or (required and not value):
            raise AgentProtocolError(f"request field {key!r} must be a non-empty string")
        return value

    def _find(self, request: Mapping[str, Any]) -> PodRecord | None:
        uid = request.get("uid")
        if isinstance(uid, str) and uid in self.pods:
            return self.pods[uid]
        cid = request.get("containerId")
        for pod in self.pods.values():
            if cid and pod.container_id == cid:
                return pod
        return None

    def enroll(self, request: Mapping[str, Any]) -> dict[str, Any]:
        ips = request.get("ips")
        if not isinstance(ips, list) or not ips or not all(isinstance(i, str) for i in ips):
            raise AgentProtocolError("request field 'ips' must be a non-empty list of strings")
        candidates = request.get("hostInterfaces") or []
        guess = self._str(request, "hostIfname", required=False)
        host_ifname = self.pick_veth([str(c) for c in candidates], guess)
        if not host_ifname:
            raise AgentProtocolError("no host-side interface in the CNI result")
        pod = PodRecord(
            uid=self._str(request, "uid"),
            namespace=self._str(request, "namespace", required=False),
            name=self._str(request, "name", required=False),
            container_id=self._str(request, "containerId", required=False),
            netns=self._str(request, "netns", required=False),
            ips=tuple(ips),
            host_ifname=host_ifname,
        )
        previous = self.pods.get(pod.uid)
        if previous is not None:
            pod = replace(pod, redirection=previous.redirection)
        pod = self._apply(pod, self._enrolled_ips())
        self.pods[pod.uid] = pod
        self.save()
        log.info(
            "ADD %s/%s %s veth %s: %s",
            pod.namespace,
            pod.name,
            ",".join(pod.ips),
            pod.host_ifname,
            pod.redirection or "not ambient",
        )
        if pod.redirection == "pending":
            raise EnrollFailed(f"cannot enroll ambient pod {pod.namespace}/{pod.name}", pod.error)
        return protocol.ok(result="enrolled" if pod.ambient else "not-ambient")

    def unenroll(self, request: Mapping[str, Any]) -> dict[str, Any]:
        pod = self._find(request)
        if pod is None:
            return protocol.ok(result="unenrolled")
        for ip in pod.ips:
            self.capture.unenroll(ip=ip)  # enrolled or observed; idempotent
        del self.pods[pod.uid]
        self.save()
        log.info("DEL %s/%s", pod.namespace, pod.name)
        return protocol.ok(result="unenrolled")

    def check(self, request: Mapping[str, Any]) -> dict[str, Any]:
        pod = self._find(request)
        if pod is None:
            raise NotEnrolled("pod unknown to the node agent", repr(request.get("uid")))
        ns_labels, pod_labels = self.labels.labels(pod.namespace, pod.name)
        if not wants_ambient(ns_labels, pod_labels):
            return protocol.ok(result="not-ambient")
        enrolled = self._enrolled_ips()
        missing = [ip for ip in pod.ips if enrolled.get(ip) != pod.uid]
        if missing:
            raise NotEnrolled(
                f"ambient pod {pod.namespace}/{pod.name} is not enrolled",
                f"not in the capture map: {', '.join(missing)}",
            )
        return protocol.ok(result="enrolled")

    def status(self) -> dict[str, Any]:
        return protocol.ok(node=self.node, pods=[p.to_dict() for _, p in sorted(self.pods.items())])


# -- process ---------------------------------------------------------------------------------


class AgentServer:
    """asyncio edge: the unix socket, the label watcher, signals.

    Every Agent call runs on ONE worker thread: calls are serialized (no two enrollments
    interleave) and blocking kernel work (netlink, bpf) never runs inside the event loop
    (pyroute2's synchronous API refuses to run under a running loop)."""

    def __init__(
        self,
        agent: Agent,
        socket_path: Path,
        *,
        poll: float = 0.5,
        background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
    ) -> None:
        self.agent = agent
        self.background = background
        """Coroutines run for the server's lifetime (the Kubernetes label source's watch)."""
        self.socket_path = socket_path
        self.poll = poll
        self._stop = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent")

    def _handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return self.agent.handle(request)
        except Exception as err:  # an agent bug must still answer (the plugin fails the ADD)
            log.exception("request %s failed", request.get("op"))
            return protocol.failure(CniError("node agent internal error", repr(err)))

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            if not line:
                return  # a liveness probe: connected and left
            try:
                request = protocol.decode(line)
                answer = await loop.run_in_executor(self._worker, self._handle, request)
            except CniError as err:
                answer = protocol.failure(err)
            writer.write(protocol.encode(answer))
            await writer.drain()
        except (TimeoutError, ConnectionError) as err:
            log.debug("client dropped: %s", err)
        finally:
            writer.close()

    def _reconcile_if_changed(self) -> None:
        if self.agent.labels_changed():
            self.agent.reconcile()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll)
            try:
                await loop.run_in_executor(self._worker, self._reconcile_if_changed)
            except Exception:  # keep watching; the next change retries
                log.exception("reconcile after a label change failed")

    async def run(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        server = await asyncio.start_unix_server(self._serve_one, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        ours = os.stat(self.socket_path).st_ino
        loop = asyncio.get_running_loop()
        stop_on_signals(self._stop.set, loop)
        tasks = [loop.create_task(make()) for make in self.background]
        watcher = loop.create_task(self._watch())
        log.info("node agent %s listening on %s", self.agent.node, self.socket_path)
        await self._stop.wait()
        watcher.cancel()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        server.close()
        self._worker.shutdown(wait=True)
        # Only our own socket: during a surge update the new pod's agent already bound the
        # path, and the plugin must keep reaching it after this (old) agent stops.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == ours:
                self.socket_path.unlink()
        log.info("node agent %s stopped (capture stays installed)", self.agent.node)


def make_capture(args: argparse.Namespace) -> Capture:
    from ebpf.redirect import CaptureConfig, NodeCapture

    config = CaptureConfig(
        uplink=args.uplink, bpffs_dir=Path(args.bpffs_dir), fail_closed=not args.fail_open
    )
    capture: Capture = NodeCapture(config)
    return capture


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cni.agent", description="ambient node agent")
    p.add_argument("command", nargs="?", default="run", choices=("run", "uninstall"))
    p.add_argument("--node", required=True)
    p.add_argument("--socket", type=Path, default=Path("/run/ambient/cni.sock"))
    p.add_argument("--state-dir", type=Path, default=Path("/run/ambient/agent"))
    p.add_argument("--uplink", default="eth0", help="the node's uplink interface")
    p.add_argument("--bpffs-dir", default="/sys/fs/bpf/ambient", help="pin dir (on a bpffs)")
    p.add_argument("--fail-open", action="store_true", help="do not drop when no proxy listens")
    p.add_argument(
        "--labels-from",
        choices=("manifests", "kubernetes"),
        default=os.environ.get("AMBIENT_LABELS_FROM", "manifests"),
        help="label source: a manifest directory (lab) or the Kubernetes API (cluster)",
    )
    p.add_argument(
        "--kubeconfig",
        type=Path,
        default=os.environ.get("KUBECONFIG") or None,
        help="with --labels-from kubernetes: a kubeconfig instead of the in-cluster account",
    )
    p.add_argument("--manifests", type=Path, help="lab: directory of Namespace/Pod manifests")
    p.add_argument("--label-overrides", type=Path, help="lab: JSON label overrides file")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between label checks")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    capture = make_capture(args)
    if args.command == "uninstall":
        capture.uninstall()
        log.info("capture uninstalled on node %s", args.node)
        return 0
    if args.labels_from == "kubernetes":
        from cni.kubelabels import KubeLabels

        kube = KubeLabels(args.node, kubeconfig=args.kubeconfig)
        agent = Agent(
            node=args.node, capture=capture, labels=kube, inventory=kube, state_dir=args.state_dir
        )
        agent.load()
        capture.install()
        # No reconcile before the first full list: the watcher reconciles once version() is
        # set (KubeLabels refuses to answer before), so nothing is released by an empty cache.
        server = AgentServer(agent, args.socket, poll=args.poll, background=[kube.run])
        asyncio.run(server.run())
        return 0
    if args.manifests is None:
        log.error("--manifests is required with --labels-from manifests")
        return 2
    labels = ManifestLabels(args.manifests, args.label_overrides)
    agent = Agent(node=args.node, capture=capture, labels=labels, state_dir=args.state_dir)
    agent.load()
    capture.install()
    agent.reconcile()
    asyncio.run(AgentServer(agent, args.socket, poll=args.poll).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
