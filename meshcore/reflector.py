"""The one Kubernetes reflector: list, then watch from the resourceVersion, forever.

Owns: the list+watch protocol of one collection (Kubernetes API concepts, "Efficient detection
of changes" and "Watch bookmarks", https://kubernetes.io/docs/reference/using-api/api-concepts/):
- list ``GET <collection>`` -> the items and the collection's ``metadata.resourceVersion``;
- watch ``?watch=true&allowWatchBookmarks=true&timeoutSeconds=N&resourceVersion=<rv>``: the
  ADDED/MODIFIED/DELETED events after ``rv``; every event's object advances the
  resourceVersion; BOOKMARK events only advance it; a watch that ends (timeout, connection
  closed) is resumed from the last resourceVersion without a list;
- ``410 Gone`` (HTTP status, or an ERROR event whose object is a Status with ``code: 410``: the
  version was compacted) means events were lost: the collection is re-listed and the owner's
  cache REPLACED with the complete new set, so deletions missed meanwhile are applied;
- any other failure backs off (`meshcore.backoff`, 0.2 s doubling, cap 10 s, jitter ±20%) and
  retries; the attempt counter resets once a watch ended normally.

What the objects mean stays with the owner: it gets `replace(items)` after every list and
`event(type, object)` for every ADDED/MODIFIED/DELETED event (both called from the event loop).
Used by the control plane's Kubernetes source and the node agent's label watch.

Invariants: a malformed event (not a JSON object, or an ERROR we do not understand) fails the
watch (logged, backed off, resumed), never the process; counters `lists` and `watches` count
every request, so tests and operators see re-lists and resumptions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshcore.backoff import Backoff, Retry
from meshcore.errors import MeshError
from meshcore.kubeapi import KubeApi, json_lines

log = logging.getLogger(__name__)

WATCH_BACKOFF = Backoff(initial=0.2, cap=10.0)

Query = Sequence[tuple[str, Any]]


class WatchGone(MeshError):
    """410 Gone: the resourceVersion was compacted; re-list."""


class WatchFailed(MeshError):
    """The API server answered a list or watch with an error, or sent a malformed event."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Collection:
    """What a reflector lists and watches."""

    path: str
    """The collection's API path, e.g. ``/api/v1/pods``."""
    name: str
    """For logs and errors (the kind)."""
    query: Query = ()
    """Extra query parameters of both list and watch (field/label selectors)."""
    watch_timeout: int = 300
    """``timeoutSeconds`` of each watch; the client waits 30 s longer."""
    list_timeout: float = 30


class Reflector:
    """List+watch of one collection; `run()` forever (cancel to stop)."""

    def __init__(
        self,
        kube: KubeApi,
        collection: Collection,
        *,
        replace: Callable[[list[Mapping[str, Any]]], None],
        event: Callable[[str, Mapping[str, Any]], None],
        retry: Retry | None = None,
    ) -> None:
        self.kube = kube
        self.path = collection.path
        self.name = collection.name
        self.replace = replace
        self.event = event
        self.query = list(collection.query)
        self.watch_timeout = collection.watch_timeout
        self.list_timeout = collection.list_timeout
        self.retry = retry or Retry(WATCH_BACKOFF)
        self.lists = 0
        """Full lists (1 + re-lists after 410 Gone)."""
        self.watches = 0
        """Watch requests (resumptions included)."""
        self.resource_version = ""

    async def run(self) -> None:
        rv: str | None = None
        while True:
            try:
                if rv is None:
                    rv = await self.list()
                rv = await self.watch(rv)
                self.retry.reset()
            except WatchGone:
                log.info("%s: resourceVersion %s is gone (410); re-listing", self.name, rv)
                rv = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self.retry.next_delay()
                log.warning("%s list/watch failed (%s); retry in %.1fs", self.name, exc, delay)
                await self.retry.wait(delay)

    async def list(self) -> str:
        """One list: `replace` gets every item; returns the collection's resourceVersion."""
        resp = await self.kube.open("GET", self.path, query=self.query, timeout=self.list_timeout)
        try:
            if resp.status != 200:
                raise WatchFailed(f"list {self.name}: HTTP {resp.status}")
            data = await resp.json(content_type=None)
        finally:
            resp.release()
        if not isinstance(data, Mapping):
            raise WatchFailed(f"list {self.name}: not a JSON object")
        items = [o for o in data.get("items") or [] if isinstance(o, Mapping)]
        if skipped := len(data.get("items") or []) - len(items):
            log.warning("list %s: %d items are not JSON objects; skipped", self.name, skipped)
        self.replace(items)
        self.lists += 1
        rv = str((data.get("metadata") or {}).get("resourceVersion", ""))
        self.resource_version = rv
        log.info("listed %d %s (resourceVersion %s)", len(items), self.name, rv)
        return rv

    async def _events(self, rv: str) -> AsyncIterator[Mapping[str, Any]]:
        query: list[tuple[str, Any]] = [
            *self.query,
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", self.watch_timeout),
        ]
        if rv:
            query.append(("resourceVersion", rv))
        self.watches += 1
        resp = await self.kube.open("GET", self.path, query=query, timeout=self.watch_timeout + 30)
        try:
            if resp.status == 410:
                raise WatchGone(f"watch {self.name} at {rv}: HTTP 410")
            if resp.status != 200:
                raise WatchFailed(f"watch {self.name}: HTTP {resp.status}")
            async for event in json_lines(resp):
                yield event
        finally:
            resp.release()

    async def watch(self, rv: str) -> str:
        """One watch from `rv` until the server ends it; returns the last resourceVersion."""
        async for event in self._events(rv):
            etype = str(event.get("type"))
            obj = event.get("object") or {}
            if not isinstance(obj, Mapping):
                raise WatchFailed(f"watch {self.name}: {etype} event without an object")
            if etype == "ERROR":
                if obj.get("code") == 410:
                    raise WatchGone(f"watch {self.name}: {obj.get('message', 'Gone')}")
                raise WatchFailed(f"watch {self.name}: error event {obj.get('message')}")
            new_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if new_rv:
                rv = str(new_rv)
                self.resource_version = rv
            if etype in ("ADDED", "MODIFIED", "DELETED"):
                self.event(etype, obj)
        return rv


class ReflectorCounters:
    """Per-kind counters of an owner's reflectors (`_reflectors`: kind -> Reflector), for tests
    and operators; a kind appears once its reflector has listed (watched) at least once."""

    _reflectors: dict[str, Reflector]

    @property
    def lists(self) -> dict[str, int]:
        """Full lists per kind (1 + re-lists after 410 Gone)."""
        return {k: r.lists for k, r in self._reflectors.items() if r.lists}

    @property
    def watches(self) -> dict[str, int]:
        """Watch requests per kind (resumptions included)."""
        return {k: r.watches for k, r in self._reflectors.items() if r.watches}

    @property
    def resource_versions(self) -> dict[str, str]:
        """The last resourceVersion seen per kind."""
        return {k: r.resource_version for k, r in self._reflectors.items() if r.lists}
