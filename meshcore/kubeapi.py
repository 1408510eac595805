"""The Kubernetes API client every component shares (kubernetes_asyncio, raw JSON).

Owns: building the client once (in-cluster service account, or a kubeconfig for tests and
out-of-cluster runs), raw requests that return the aiohttp response (the caller reads and releases
it: watches stream it), a JSON convenience call, and reading a watch stream's newline-delimited
events. A PATCH body is a JSON merge patch (RFC 7386, ``application/merge-patch+json``) unless the
caller sends a `TypedBody` naming another content type (server-side apply). What a status code
means (410 Gone, 409, 404) stays with the caller.
Used by the control plane's source, waypoint controller and TokenReview, and the node agent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True, slots=True, kw_only=True)
class TypedBody:
    """A request body sent with its own Content-Type (e.g. server-side apply), not the default
    (JSON, or a JSON merge patch for PATCH)."""

    content: Any
    content_type: str


class KubeApi:
    """One lazily created `ApiClient`; `close()` releases it (a later call reopens)."""

    def __init__(
        self,
        *,
        kubeconfig: Path | None = None,
        configuration: client.Configuration | None = None,
        context: str | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.context = context
        """A kubeconfig context other than its current one (with `kubeconfig`)."""
        self.configuration = configuration
        self.api: client.ApiClient | None = None

    async def client(self) -> client.ApiClient:
        if self.api is None:
            cfg = self.configuration
            if cfg is None:
                cfg = client.Configuration()
                if self.kubeconfig is not None:
                    await config.load_kube_config(
                        config_file=str(self.kubeconfig),
                        context=self.context,
                        client_configuration=cfg,
                    )
                else:
                    config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            self.api = client.ApiClient(configuration=cfg)
        return self.api

    async def open(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        timeout: float | None = 30,
    ) -> Any:
        """The raw aiohttp response; the caller must `release()` it."""
        api = await self.client()
        headers = {"Accept": "application/json"}
        if isinstance(body, TypedBody):
            headers["Content-Type"] = body.content_type
            body = body.content
        elif body is not None:
            headers["Content-Type"] = MERGE_PATCH if method == "PATCH" else "application/json"
        resp = await api.call_api(
            path,
            method,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        # kubernetes_asyncio returns the aiohttp response when content is not preloaded.
        return resp[0] if isinstance(resp, tuple) else resp

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: list[tuple[str, Any]] | None = None,
        timeout: float | None = 30,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body or None)."""
        resp = await self.open(method, path, query=query, body=body, timeout=timeout)
        try:
            text = await resp.text()
            status = int(resp.status)
        finally:
            resp.release()
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = None
        return status, data

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()
            self.api = None


async def json_lines(resp: Any) -> AsyncIterator[Mapping[str, Any]]:
    """The events of a watch response (one JSON object per line, blank lines skipped)."""
    while line := await resp.content.readline():
        if line.strip():
            event = json.loads(line)
            if isinstance(event, Mapping):
                yield event
