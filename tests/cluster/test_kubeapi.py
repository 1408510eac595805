"""`meshcore.kubeapi.KubeApi` against a real API server: the Content-Type a body goes with.

A PATCH body is a JSON merge patch (RFC 7386) unless it is a `TypedBody`: server-side apply
(``application/apply-patch+yaml``) creates an object a merge patch can only change.
"""

from __future__ import annotations

from ambientctl.lab.kube import KubeCluster
from meshcore.kubeapi import KubeApi, TypedBody
from tests.cluster import objects
from tests.helpers import run

NS = "kubeapi-typed"
APPLY = "application/apply-patch+yaml"


def test_a_typed_body_goes_with_its_content_type(kube: KubeCluster) -> None:
    objects.namespace(kube, NS)
    path = f"/api/v1/namespaces/{NS}/configmaps/applied"
    doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}}

    async def main() -> None:
        api = KubeApi(kubeconfig=kube.admin_kubeconfig)
        try:
            # Merge patch (the default for PATCH) of a missing object: 404, nothing created.
            status, _ = await api.call("PATCH", path, {"data": {"a": "1"}})
            assert status == 404
            query = [("fieldManager", "kubeapi-test")]
            body = TypedBody(content={**doc, "data": {"a": "1"}}, content_type=APPLY)
            status, created = await api.call("PATCH", path, body, query=query)
            assert status == 201, created
            assert created["data"] == {"a": "1"}
            status, patched = await api.call("PATCH", path, {"data": {"b": "2"}})
            assert status == 200
            assert patched["data"] == {"a": "1", "b": "2"}
        finally:
            await api.close()

    run(main(), 60)
