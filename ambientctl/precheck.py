"""`ambientctl x precheck`: can this node run the mesh? (istioctl ``x precheck``'s habit, for
the node-level parts ambient-mesh needs.)

Owns the checks, each a pure function of what it reads (paths injected, so tests point them at
a temporary tree): the kernel release (``bpf_sk_assign`` at tc ingress needs Linux 5.7), a bpf
filesystem mounted at /sys/fs/bpf (the node agent pins its maps there, docs/ebpf.md), a primary
CNI configuration to chain ``ambient-cni`` into, and conflicting installs in that CNI directory
(Istio's own ``istio-cni``, Cilium, which attaches its own tc programs and socket load balancing).

Invariant: a check never raises; what it cannot read is reported as a finding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
