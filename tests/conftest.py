"""Suite-wide fixtures: the real Kubernetes cluster (tests/cluster/fixtures.py), one per
session, shared by tests/cluster and tests/root."""

from tests.cluster.fixtures import chart, kube

__all__ = ["chart", "kube"]
