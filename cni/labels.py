"""The label sources the node agent reads (who is ambient is decided by
`meshcore.config.labels.wants_ambient`, the rule the control plane uses too).

Owns `ManifestLabels`, the label source without an API server: Kubernetes-style YAML manifests
(Namespace, Pod) in a directory, optionally overlaid by a JSON overrides file. Two users: the
chart's ``labelsFrom: configMap`` mode (the agent reads the mounted ConfigMap,
/etc/ambient/enrollment) and the lab (which edits the directory and the overrides for
`ambientctl lab label`; the control plane watches the same directory). It is therefore not
lab-only and stays with the agent.

Invariant: `ManifestLabels.version()` changes whenever any input file changes (mtime and size),
so the agent re-reconciles exactly when something could have changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from meshcore.config.labels import DATAPLANE_MODE as DATAPLANE_MODE
from meshcore.config.labels import wants_ambient as wants_ambient

REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"


class LabelSource(Protocol):
    def labels(self, namespace: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
        """(namespace labels, pod labels); empty dicts for what is unknown."""

    def version(self) -> object:
        """A value that changes whenever the labels may have changed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    pods: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)


def load_manifests(directory: Path) -> list[dict[str, Any]]:
    """Every YAML document (with a ``kind``) of *.yaml/*.yml under `directory`, sorted by path."""
    docs: list[dict[str, Any]] = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and isinstance(doc.get("kind"), str):
                docs.append(doc)
    return docs


def apply_overrides(
    labels: Mapping[str, str], overrides: Mapping[str, str | None]
) -> dict[str, str]:
    """`key: value` sets, `key: null` removes (the ``key-`` form of kubectl label)."""
    out = dict(labels)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def snapshot(docs: list[dict[str, Any]], overrides: Mapping[str, Any]) -> Snapshot:
    namespaces: dict[str, dict[str, str]] = {}
    pods: dict[tuple[str, str], dict[str, str]] = {}
    for doc in docs:
        meta = doc.get("metadata") or {}
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        if doc["kind"] == "Namespace":
            namespaces[str(meta.get("name"))] = labels
        elif doc["kind"] == "Pod":
            pods[(str(meta.get("namespace", "default")), str(meta.get("name")))] = labels
    for ns, changes in (overrides.get("namespaces") or {}).items():
        namespaces[ns] = apply_overrides(namespaces.get(ns, {}), changes)
    for key, changes in (overrides.get("pods") or {}).items():
        ns, _, name = key.partition("/")
        pods[(ns, name)] = apply_overrides(pods.get((ns, name), {}), changes)
    return Snapshot(namespaces=namespaces, pods=pods)


class ManifestLabels:
    """Labels from a manifest directory plus an overrides file (re-read when they change)."""

    def __init__(self, directory: Path, overrides: Path | None = None) -> None:
        self.directory = directory
        self.overrides = overrides
        self._version: object = None
        self._snap = Snapshot()

    def _files(self) -> list[Path]:
        files = sorted([*self.directory.glob("*.yaml"), *self.directory.glob("*.yml")])
        if self.overrides is not None:
            files.append(self.overrides)
        return files

    def version(self) -> object:
        stamp = []
        for path in self._files():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            stamp.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def _refresh(self) -> None:
        version = self.version()
        if version == self._version:
            return
        overrides: dict[str, Any] = {}
        if self.overrides is not None and self.overrides.exists():
            overrides = json.loads(self.overrides.read_text() or "{}")
        self._snap = snapshot(load_manifests(self.directory), overrides)
        self._version = version

    def labels(self, namespace: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
        self._refresh()
        return (
            dict(self._snap.namespaces.get(namespace, {})),
            dict(self._snap.pods.get((namespace, name), {})),
        )
