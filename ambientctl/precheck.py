"""`ambientctl x precheck`: can this node and this cluster run the mesh? (istioctl
``x precheck``'s habit.)

Node checks, each a pure function of what it reads (paths injected, so tests point them at a
temporary tree): the kernel release (``bpf_sk_assign`` at tc ingress needs Linux 5.7), a bpf
filesystem mounted at /sys/fs/bpf (the node agent pins its maps there, docs/ebpf.md), a primary
CNI configuration to chain ``ambient-cni`` into, and conflicting installs in that CNI directory
(Istio's own ``istio-cni``, Cilium, which attaches its own tc programs and socket load balancing).

Kubernetes API checks (as istioctl's: the cluster of ``--kubeconfig``/``--context``), each a
pure function of the API's answers, gathered by `kubernetes_checks` (the one I/O function):
the API server reachable and at least the chart's ``kubeVersion``; RBAC: the caller may create
every kind the chart installs (SelfSubjectAccessReview, namespace-scoped kinds in the install
namespace); an existing Istio (istiod, Istio's ztunnel or istio-cni DaemonSet) or Cilium
install; and each CRD the control plane reads (`controlplane.sources.kube.KINDS`): served at
the version we read, and not owned by someone else while our chart would install it.

Invariant: a check never raises; what it cannot read is reported as a finding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni.install import PLUGIN_TYPE

MIN_KERNEL = (5, 7)
"""``bpf_sk_assign`` at tc ingress appeared in Linux 5.7."""


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool
    check: str
    detail: str
    level: str = "Error"
    """Error or Warning (an ok finding has no level)."""

    def render(self) -> str:
        mark = "\u2714" if self.ok else ("\u2718" if self.level == "Error" else "!")
        return f"{mark} {self.check}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return {
            "check": self.check,
            "level": "OK" if self.ok else self.level,
            "detail": self.detail,
        }


def kernel(release: str) -> Finding:
    m = re.match(r"(\d+)\.(\d+)", release)
    if m is None:
        return Finding(False, "kernel", f"cannot parse the kernel release {release!r}")
    version = (int(m.group(1)), int(m.group(2)))
    want = ".".join(map(str, MIN_KERNEL))
    if version < MIN_KERNEL:
        return Finding(False, "kernel", f"{release} is older than {want} (bpf_sk_assign at tc)")
    return Finding(True, "kernel", f"{release} (>= {want})")


def bpffs(mounts: str, path: str = "/sys/fs/bpf") -> Finding:
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == path and fields[2] == "bpf":
            return Finding(True, "eBPF", f"bpf filesystem mounted at {path}")
    return Finding(False, "eBPF", f"no bpf filesystem at {path} (mount -t bpf bpf {path})")


def _plugin_types(path: Path) -> list[str]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    plugins = doc.get("plugins") if isinstance(doc, dict) else None
    if isinstance(plugins, list):
        return [str(p.get("type", "")) for p in plugins if isinstance(p, dict)]
    return [str(doc.get("type", ""))] if isinstance(doc, dict) else []


def cni(conf_dir: Path) -> list[Finding]:
    if not conf_dir.is_dir():
        return [Finding(False, "CNI", f"no CNI configuration directory {conf_dir}")]
    files = sorted(
        p for p in conf_dir.iterdir() if p.suffix in (".conflist", ".conf") and p.is_file()
    )
    if not files:
        return [Finding(False, "CNI", f"no CNI configuration in {conf_dir} (no primary plugin)")]
    out: list[Finding] = []
    try:
        types = _plugin_types(files[0])  # the runtime uses the first file in name order
    except (OSError, ValueError) as err:
        return [Finding(False, "CNI", f"{files[0]}: unreadable: {err}")]
    chained = " (ambient-cni already chained)" if PLUGIN_TYPE in types else ""
    out.append(Finding(True, "CNI", f"primary configuration {files[0].name}: {types}{chained}"))
    for path in files:
        try:
            found = _plugin_types(path)
        except (OSError, ValueError):
            continue
        if "istio-cni" in found:
            out.append(
                Finding(False, "conflict", f"{path.name} chains Istio's istio-cni: uninstall Istio")
            )
        if any(t.startswith("cilium") for t in found):
            out.append(
                Finding(
                    False,
                    "conflict",
                    f"{path.name} is Cilium's: its tc programs and socket load balancing "
                    "must leave pod traffic to the mesh (bpf-lb-sock-hostns-only)",
                    level="Warning",
                )
            )
    return out


def run_checks(
    *, release: str, mounts: str, cni_dir: Path, bpf_path: str = "/sys/fs/bpf"
) -> list[Finding]:
    return [kernel(release), bpffs(mounts, bpf_path), *cni(cni_dir)]


def failed(findings: Sequence[Finding]) -> bool:
    return any(not f.ok and f.level == "Error" for f in findings)


# ---------------------------------------------------------------------------- Kubernetes API

MIN_KUBERNETES = (1, 25)
"""The chart's ``kubeVersion: >=1.25.0-0`` (charts/ambient/Chart.yaml; a test keeps them equal)."""

PART_OF = ("app.kubernetes.io/part-of", "ambient-mesh")
"""The label every object of our chart carries (charts/ambient/templates/_helpers.tpl)."""


@dataclass(frozen=True, slots=True)
class Permission:
    group: str
    resource: str
    namespaced: bool


INSTALL_PERMISSIONS = (
    Permission("", "namespaces", False),  # helm --create-namespace
    Permission("apiextensions.k8s.io", "customresourcedefinitions", False),
    Permission("rbac.authorization.k8s.io", "clusterroles", False),
    Permission("rbac.authorization.k8s.io", "clusterrolebindings", False),
    Permission("rbac.authorization.k8s.io", "roles", True),
    Permission("rbac.authorization.k8s.io", "rolebindings", True),
    Permission("", "serviceaccounts", True),
    Permission("", "secrets", True),
    Permission("", "services", True),
    Permission("apps", "deployments", True),
    Permission("apps", "daemonsets", True),
    Permission("policy", "poddisruptionbudgets", True),
)
"""``create`` on every kind the chart renders (a test compares this with `helm template`)."""


def access_review(perm: Permission, namespace: str) -> dict[str, Any]:
    """The SelfSubjectAccessReview body for creating `perm` (authorization.k8s.io/v1)."""
    attrs: dict[str, str] = {"verb": "create", "group": perm.group, "resource": perm.resource}
    if perm.namespaced:
        attrs["namespace"] = namespace
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attrs},
    }


def kubernetes_version(doc: Mapping[str, Any]) -> Finding:
    """From the API server's ``/version``."""
    git = str(doc.get("gitVersion", ""))
    m = re.match(r"v?(\d+)\.(\d+)", git)
    if m is None:
        return Finding(False, "Kubernetes", f"cannot parse the API server's version {git!r}")
    want = ".".join(map(str, MIN_KUBERNETES))
    if (int(m.group(1)), int(m.group(2))) < MIN_KUBERNETES:
        return Finding(False, "Kubernetes", f"API server {git} is older than {want}")
    return Finding(True, "Kubernetes", f"API server {git} (>= {want})")


def permissions(answers: Sequence[tuple[Permission, Mapping[str, Any]]]) -> list[Finding]:
    """From each SelfSubjectAccessReview's answer (its ``status``)."""
    denied = []
    for perm, status in answers:
        if not status.get("allowed"):
            what = f"{perm.resource}.{perm.group}" if perm.group else perm.resource
            why = str(status.get("reason") or status.get("evaluationError") or "denied")
            denied.append(Finding(False, "RBAC", f"cannot create {what}: {why}"))
    if denied:
        return denied
    return [Finding(True, "RBAC", f"may create every kind the chart installs ({len(answers)})")]


def _ours(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(PART_OF[0]) == PART_OF[1])


def _where(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def installs(
    deployments: Sequence[Mapping[str, Any]], daemonsets: Sequence[Mapping[str, Any]]
) -> list[Finding]:
    """Istio (an error: its ztunnel and CNI would capture the same pods, its istiod serve the
    same CRDs) and Cilium (a warning, as the node check's) among the cluster's workloads."""
    out: list[Finding] = []
    for dep in deployments:
        labels = (dep.get("metadata") or {}).get("labels") or {}
        if labels.get("app") == "istiod" and not _ours(dep):
            out.append(
                Finding(
                    False, "conflict", f"Istio's istiod runs ({_where(dep)}): uninstall Istio first"
                )
            )
    for ds in daemonsets:
        labels = (ds.get("metadata") or {}).get("labels") or {}
        if _ours(ds):
            continue
        if labels.get("app") == "ztunnel" or labels.get("k8s-app") == "istio-cni-node":
            out.append(
                Finding(
                    False,
                    "conflict",
                    f"Istio's ambient data plane runs "
                    f"({_where(ds)}): it would capture the same pods",
                )
            )
        elif labels.get("k8s-app") == "cilium":
            out.append(
                Finding(
                    False,
                    "conflict",
                    f"Cilium runs ({_where(ds)}): its tc programs and socket load balancing "
                    "must leave pod traffic to the mesh (bpf-lb-sock-hostns-only)",
                    level="Warning",
                )
            )
    if not out:
        out.append(Finding(True, "installs", "no Istio or Cilium installation found"))
    return out


def crds(
    found: Sequence[Mapping[str, Any]], wanted: Sequence[tuple[str, str, str]], release: str
) -> list[Finding]:
    """`found`: the cluster's CRDs; `wanted`: (group, plural, version) the control plane reads.
    A CRD that does not serve our version is an error; one helm would have to adopt from another
    owner is a warning (``helm install`` refuses it unless ``crds.install=false``)."""
    by_name = {str((c.get("metadata") or {}).get("name", "")): c for c in found}
    out: list[Finding] = []
    present = 0
    for group, plural, version in wanted:
        crd = by_name.get(f"{plural}.{group}")
        if crd is None:
            continue
        present += 1
        name = f"{plural}.{group}"
        served = [
            str(v.get("name"))
            for v in (crd.get("spec") or {}).get("versions") or []
            if isinstance(v, Mapping) and v.get("served")
        ]
        if version not in served:
            out.append(
                Finding(
                    False,
                    "CRDs",
                    f"{name} serves {served or 'no version'}; the control plane reads {version}",
                )
            )
            continue
        annotations = (crd.get("metadata") or {}).get("annotations") or {}
        owner = annotations.get("meta.helm.sh/release-name")
        if owner != release:
            by = f"helm release {owner!r}" if owner else "something other than helm"
            out.append(
                Finding(
                    False,
                    "CRDs",
                    f"{name} exists, installed by {by}: install with --set crds.install=false "
                    "to use it (helm will not adopt it)",
                    level="Warning",
                )
            )
    if not out:
        detail = (
            f"{present} of the {len(wanted)} CRDs the control plane reads exist and serve its "
            "versions; the chart installs the others"
        )
        out.append(Finding(True, "CRDs", detail))
    return out


async def kubernetes_checks(api: Any, *, namespace: str, release: str) -> list[Finding]:
    """The Kubernetes API checks against `api` (a `meshcore.kubeapi.KubeApi`). The only I/O
    here; an unreachable API server is one finding and ends the checks."""
    from controlplane.sources.kube import KINDS

    def first(err: Exception) -> str:
        return str(err).splitlines()[0] if str(err) else type(err).__name__

    try:
        await api.client()
    except Exception as err:  # a kubeconfig without the context, unreadable, malformed
        return [Finding(False, "Kubernetes", f"cannot use the kubeconfig: {first(err)}")]
    try:
        status, version = await api.call("GET", "/version", timeout=10)
    except Exception as err:  # a connection or TLS error: one line
        return [Finding(False, "Kubernetes", f"cannot reach the API server: {first(err)}")]
    if status != 200 or not isinstance(version, Mapping):
        return [Finding(False, "Kubernetes", f"the API server's /version answered {status}")]
    out = [kubernetes_version(version)]
    answers = []
    for perm in INSTALL_PERMISSIONS:
        path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
        status, body = await api.call("POST", path, access_review(perm, namespace), timeout=10)
        answer = (body or {}).get("status") if status == 201 and isinstance(body, dict) else None
        answers.append((perm, answer or {"allowed": False, "reason": f"review answered {status}"}))
    out += permissions(answers)

    async def items(path: str, what: str) -> list[Mapping[str, Any]] | None:
        status, body = await api.call("GET", path, timeout=10)
        if status != 200 or not isinstance(body, dict):
            out.append(Finding(False, what, f"cannot list {path}: {status}", level="Warning"))
            return None
        return [i for i in body.get("items") or [] if isinstance(i, Mapping)]

    deployments = await items("/apis/apps/v1/deployments", "installs")
    daemonsets = await items("/apis/apps/v1/daemonsets", "installs")
    if deployments is not None and daemonsets is not None:
        out += installs(deployments, daemonsets)
    found = await items("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", "CRDs")
    if found is not None:
        wanted = [
            (k.group, k.plural, k.version)
            for k in KINDS
            if "." in k.group and k.group != "discovery.k8s.io"
        ]
        out += crds(found, wanted, release)
    return out
