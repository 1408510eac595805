"""Kubernetes labels, label selectors and ambient enrollment: the one owner of each.

Owns:
- `Labels`: a label map as a sorted tuple of (key, value) pairs (hashable, canonical);
- `selector_matches`: ``matchLabels`` semantics (every selector pair is present with the same
  value; an empty selector matches everything);
- `wants_ambient`: whether a pod is in the ambient mesh, used alike by the node agent (capture),
  the control plane (HBONE workloads), the lab and ``ambientctl analyze``.

Enrollment follows Istio's ``PodRedirectionEnabled`` (istio/istio ``cni/pkg/util/podutil.go``,
and the ambient index in istiod): a pod is captured when its namespace or the pod itself has
``istio.io/dataplane-mode=ambient``, EXCEPT when the pod carries the label with any other value
(``none``, a typo, ``sidecar``...): an explicit pod label that is not ``ambient`` opts the pod
out. The label key and values are compared exactly (case-sensitive), as Kubernetes labels are.

Invariant: pure functions of the label maps; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Labels = tuple[tuple[str, str], ...]
"""Sorted (key, value) pairs."""

DATAPLANE_MODE = "istio.io/dataplane-mode"
AMBIENT = "ambient"


def as_labels(pairs: Mapping[str, str] | Iterable[tuple[str, str]]) -> Labels:
    """Canonical form of a label map."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return tuple(sorted((str(k), str(v)) for k, v in items))


def _as_map(labels: Mapping[str, str] | Labels) -> Mapping[str, str]:
    return labels if isinstance(labels, Mapping) else dict(labels)


def selector_matches(selector: Labels, labels: Mapping[str, str] | Labels) -> bool:
    """``matchLabels``: every selector pair is present in `labels` with the same value."""
    have = _as_map(labels)
    return all(have.get(k) == v for k, v in selector)


def wants_ambient(
    ns_labels: Mapping[str, str] | Labels, pod_labels: Mapping[str, str] | Labels
) -> bool:
    """Whether the pod is enrolled in the ambient mesh (see the module docstring)."""
    pod_mode = _as_map(pod_labels).get(DATAPLANE_MODE)
    if pod_mode is not None:
        # An explicit pod label decides, whatever the namespace says (Istio: "explicitPodLabeled
        # && !podMatches" opts out).
        return pod_mode == AMBIENT
    return _as_map(ns_labels).get(DATAPLANE_MODE) == AMBIENT
