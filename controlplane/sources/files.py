"""Manifest-directory source: YAML/JSON manifests in a directory tree, watched for changes.

Owns: reading ``*.yaml``/``*.yml``/``*.json`` files (multi-document, ``kind: List`` expanded),
polling them for changes, and publishing the complete object set to the store as source
``files``.

Invariants:
- One bad file or object never blocks the others: a YAML error is reported against the file, a
  malformed object against the object (``Kind ns/name: field``), and both are skipped.
- A file is re-parsed only when its (mtime_ns, size, inode) changed; each scan publishes the
  full set with `ConfigStore.replace_source`, so a deleted file or object is deleted from the
  store. An edit is seen within one poll interval (default 0.2 s): polling, not inotify, so it
  works on every filesystem (bind mounts, ConfigMap volumes' symlink swaps).
- Two files defining the same object: the later path (sorted) wins, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controlplane.objects import KubeObject, ObjectKey, object_key, parse_object
from controlplane.store import ConfigStore
from meshcore.config.findings import kind_support
from meshcore.errors import ConfigError

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
IGNORED_KINDS = frozenset(
    (
        "Deployment",
        "ReplicaSet",
        "StatefulSet",
        "DaemonSet",
        "Job",
        "CronJob",
        "ConfigMap",
        "Secret",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "Endpoints",
        "CustomResourceDefinition",
        "GatewayClass",
        "Telemetry",
        "ServiceEntry",
        "WorkloadEntry",
        "Sidecar",
        "EnvoyFilter",
        "ReferenceGrant",
        "WasmPlugin",
    )
)
"""Kinds a manifest directory commonly holds that the control plane does not read. Those the
field table lists as not implemented (ServiceEntry, Telemetry...) are reported
(AMB0204) on /debug/warnings, never dropped silently."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedFile:
    stamp: tuple[int, int, int]
    objects: tuple[KubeObject, ...]
    warnings: tuple[tuple[str, str], ...]
    """(object reference, message)."""


def parse_manifest_text(text: str, where: str) -> ParsedFile:
    """Parse one file's text (pure). Errors become warnings; the good objects are kept."""
    objects: list[KubeObject] = []
    warnings: list[tuple[str, str]] = []
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        return ParsedFile(stamp=(0, 0, 0), objects=(), warnings=((where, f"invalid YAML: {exc}"),))
    items: list[tuple[str, object]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List":
            for j, item in enumerate(doc.get("items") or []):
                items.append((f"{where}[{i}].items[{j}]", item))
        else:
            items.append((f"{where}[{i}]", doc))
    for loc, raw in items:
        if isinstance(raw, dict) and raw.get("kind") in IGNORED_KINDS:
            unsupported = kind_support(str(raw["kind"]), raw)
            if unsupported is not None:  # said, not silently dropped (field table, AMB0204)
                ref = _kind_ref(raw, loc)
                warnings.append((ref, f"[{unsupported.code}] {unsupported.message}"))
            continue
        try:
            objects.append(parse_object(raw))
        except ConfigError as exc:
            ref = exc.path.split(":", 1)[0] if ":" in exc.path else loc
            warnings.append((ref, f"skipped ({loc}): {exc}"))
    return ParsedFile(stamp=(0, 0, 0), objects=tuple(objects), warnings=tuple(warnings))


def _kind_ref(raw: dict[str, Any], loc: str) -> str:
    meta = raw.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("name"), str):
        return f"{raw['kind']} {meta.get('namespace') or 'default'}/{meta['name']}"
    return loc


class ManifestDirectory:
    """Polls `directory` and keeps the store's ``files`` source equal to its manifests."""

    def __init__(
        self,
        directory: Path,
        store: ConfigStore,
        *,
        poll_interval: float = 0.2,
        source: str = "files",
    ) -> None:
        self.directory = Path(directory)
        self.store = store
        self.poll_interval = poll_interval
        self.source = source
        self._files: dict[Path, ParsedFile] = {}
        self.scans = 0

    def _stamp(self, path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _list(self) -> list[Path]:
        out = []
        for root, dirs, files in os.walk(self.directory, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in files:
                if f.endswith(SUFFIXES) and not f.startswith("."):
                    out.append(Path(root) / f)
        return sorted(out)

    def scan(self) -> bool:
        """Re-read changed files; publish the full set if anything changed. Returns whether
        anything changed."""
        self.scans += 1
        changed = False
        seen: set[Path] = set()
        for path in self._list():
            stamp = self._stamp(path)
            if stamp is None:
                continue
            seen.add(path)
            old = self._files.get(path)
            if old is not None and old.stamp == stamp:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                parsed = ParsedFile(stamp=stamp, objects=(), warnings=((str(path), str(exc)),))
            else:
                p = parse_manifest_text(text, str(path.relative_to(self.directory)))
                parsed = ParsedFile(stamp=stamp, objects=p.objects, warnings=p.warnings)
            self._files[path] = parsed
            changed = True
        for path in [p for p in self._files if p not in seen]:
            del self._files[path]
            changed = True
        if not changed and self.scans > 1:
            return False
        objects: dict[ObjectKey, KubeObject] = {}
        warnings: dict[str, str] = {}
        for path in sorted(self._files):
            parsed = self._files[path]
            for ref, msg in parsed.warnings:
                warnings[ref] = msg
            for obj in parsed.objects:
                key = object_key(obj)
                if key in objects:
                    warnings[str(key)] = f"defined more than once; {path.name} wins"
                objects[key] = obj
        self.store.set_source_warnings(self.source, warnings)
        for ref, msg in warnings.items():
            log.warning("%s: %s", ref, msg)
        self.store.replace_source(self.source, objects.values())
        return True

    async def run(self) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            try:
                self.scan()
            except Exception:
                log.exception("manifest directory scan failed; retrying")
            await asyncio.sleep(self.poll_interval)
