"""`ambientctl install` and `ambientctl manifest generate`: the chart (charts/ambient) through
the real helm.

Owns finding helm and the chart, turning CLI options into helm arguments, and the cluster
check. `manifest generate` renders offline (`helm template`); `install` needs a configured
cluster (`kubectl config current-context`) and runs `helm upgrade --install`, so a second run
upgrades in place and `lookup` keeps the generated CA and node tokens.

Invariants: helm runs with an argument list (no shell); failures are `CtlError`s carrying
helm's own message and what to do next.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ambientctl.errors import CtlError

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "ambient"
RELEASE = "ambient"
NAMESPACE = "istio-system"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChartRelease:
    """Which chart, installed as which release into which namespace, with which values (the
    options `install` and `manifest generate` share)."""

    chart: Path | None = None
    """Chart directory (None: charts/ambient)."""
    namespace: str = NAMESPACE
    release: str = RELEASE
    values: Sequence[Path] = ()
    """Values files, in order (helm ``--values``)."""
    sets: Sequence[str] = ()
    """``key=value`` overrides (helm ``--set``)."""


class ClusterError(CtlError):
    """No usable Kubernetes cluster (no kubeconfig/context, or kubectl missing)."""

    exit_code = 5


def find_helm() -> str:
    for candidate in (os.environ.get("AMBIENT_HELM"), str(REPO / ".tools/node_modules/.bin/helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("helm")
    if found:
        return found
    raise CtlError(
        "helm not found: set AMBIENT_HELM, put helm on PATH, or run scripts/setup "
        "(installs helm 3.10.1 into .tools/)"
    )


def chart_path(chart: Path | None) -> Path:
    path = chart or CHART
    if not (path / "Chart.yaml").is_file():
        raise CtlError(f"{path}: not a chart (no Chart.yaml); pass --chart DIR")
    return path


def value_args(values: Sequence[Path], sets: Sequence[str]) -> list[str]:
    args: list[str] = []
    for f in values:
        if not f.is_file():
            raise CtlError(f"values file {f} does not exist")
        args += ["--values", str(f)]
    for s in sets:
        if "=" not in s:
            raise CtlError(f"--set {s!r}: expected key=value")
        args += ["--set", s]
    return args


def _helm(argv: Sequence[str], what: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise CtlError(f"{what} failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def generate(rel: ChartRelease, *, kube_version: str = "1.33.0") -> str:
    """The rendered manifests (helm template; values validated by values.schema.json)."""
    argv = [
        find_helm(),
        "template",
        rel.release,
        str(chart_path(rel.chart)),
        "--namespace",
        rel.namespace,
        "--kube-version",
        kube_version,
        "--include-crds",
        *value_args(rel.values, rel.sets),
    ]
    return _helm(argv, "helm template")


def current_context(context: str | None = None, kubeconfig: Path | None = None) -> str:
    """The kubectl context to use: `context` (istioctl's ``--context``) if it exists in the
    kubeconfig, else the current one."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ClusterError("kubectl not found: `install` needs a cluster and kubectl")
    argv = [kubectl, "config"]
    if kubeconfig is not None:
        argv += ["--kubeconfig", str(kubeconfig)]
    if context:
        proc = subprocess.run(
            [*argv, "get-contexts", context, "-o", "name"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise ClusterError(f"no context {context!r} in the kubeconfig")
        return context
    proc = subprocess.run([*argv, "current-context"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        detail = proc.stderr.strip() or "no current context"
        raise ClusterError(
            f"no Kubernetes cluster configured ({detail}).\n"
            "  Point KUBECONFIG at a cluster, or render the manifests instead:\n"
            "  ambientctl manifest generate > ambient.yaml"
        )
    return proc.stdout.strip()


def install(
    rel: ChartRelease,
    *,
    wait: bool = True,
    context: str | None = None,
    kubeconfig: Path | None = None,
) -> str:
    context = current_context(context, kubeconfig)
    argv = [
        find_helm(),
        "upgrade",
        "--install",
        rel.release,
        str(chart_path(rel.chart)),
        "--namespace",
        rel.namespace,
        "--create-namespace",
        *value_args(rel.values, rel.sets),
    ]
    if wait:
        argv += ["--wait", "--timeout", "5m"]
    argv += ["--kube-context", context]
    if kubeconfig is not None:
        argv += ["--kubeconfig", str(kubeconfig)]
    out = _helm(argv, f"helm upgrade --install (context {context})")
    return out
