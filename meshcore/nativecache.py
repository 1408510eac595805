"""The user-level cache of the compiled (mypyc) build of the hot modules (`meshcore.native`).

Owns: the cache key of a build, the cache entries under
``${XDG_CACHE_HOME:-~/.cache}/ambient-mesh/mypyc/<key>/`` (the project's rule: builds are cached
in the user's cache directory, as scripts/kube-build caches Kubernetes), their publication and
their restoration into a tree. scripts/setup runs `build_cached` (``python -m
meshcore.nativecache``) when the tree has no current build: a fresh clone of sources already
built on this machine (CI clones fresh every run) restores the extension modules in about a
second instead of compiling them (~100 s of CPU).

The key is the sha256 of everything that changes the compiled output: the sources the build
depends on (`meshcore.native.build_inputs`, the set the tree's stamp records too;
`meshcore/native.py` is among them: the list of modules, the group and the build recipe), the
versions of the third-party distributions they import, mypy/mypyc's and setuptools' versions,
the interpreter (version, ABI tag, extension suffix, machine), the optimisation level and the
compiler settings of the environment (``CC``, ``CFLAGS``, ``LDFLAGS``, ``CPPFLAGS``, ``MYPYC_*``).

Invariants:
- An entry is published whole or not at all: staged in a temporary directory of the cache
  and renamed to its key (`os.rename` is atomic and refuses an existing entry: a whole one is
  kept, a damaged one replaced); a crash leaves a ``.tmp-*`` directory, never read and removed
  by a later `prune`.
- Nothing in a tree changes unless the whole entry checked out first: its manifest names the
  key and exactly the extension modules `meshcore.native.COMPILED` needs, each with its sha256,
  and every file matches. Files then replace the tree's by rename (a running process keeps its
  mapped copy), the stamp (``meshcore/_native.json``) last, so an interrupted restore leaves a
  tree without a stamp: pure Python, never a mix.
- A build is published under the key its sources had before it began, and only if they still
  have it after (a source edited during the build is not cached).
- At most `KEEP` entries are kept, the least recently used removed first.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from meshcore import native

KEEP = 8
"""Entries kept (one per combination of sources in use: branches, worktrees)."""
STALE_STAGING = 3600.0
"""Seconds after which a ``.tmp-*`` staging directory is a crashed publish's and removed."""
MANIFEST = "manifest.json"
ENV_KEYS = ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/ambient-mesh/mypyc`` (``~/.cache`` when unset or not absolute)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "ambient-mesh" / "mypyc"


def _versions(top_names: set[str]) -> dict[str, str]:
    """Version of the distribution(s) providing each top-level module name."""
    providers = importlib.metadata.packages_distributions()
    out: dict[str, str] = {}
    for top in sorted(top_names):
        for dist in sorted(set(providers.get(top, []))):
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[dist] = "?"
        if top not in providers:
            out[f"module:{top}"] = "?"
    return out


def cache_key(root: Path = native.ROOT, opt_level: str = "3") -> str:
    """The sha256 (hex) of everything that changes the compiled output (module doc)."""
    import mypy.version  # build time only

    files, third = native.build_inputs(root)
    doc = {
        "files": files,
        "distributions": _versions({*third, "mypy", "setuptools"}),
        "mypy": mypy.version.__version__,
        "python": sys.version,
        "abi": [sys.implementation.cache_tag, sysconfig.get_config_var("SOABI")],
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "machine": platform.machine(),
        "cc": sysconfig.get_config_var("CC"),
        "opt_level": opt_level,
        "compiled": list(native.COMPILED),
        "group": native.GROUP,
        "env": {
            k: v for k, v in sorted(os.environ.items()) if k in ENV_KEYS or k.startswith("MYPYC_")
        },
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def outputs(root: Path = native.ROOT) -> list[Path]:
    """The extension modules of a build (this interpreter's suffix): one per compiled module
    beside its source, and the group's shared library."""
    ext = str(sysconfig.get_config_var("EXT_SUFFIX"))
    group = native.GROUP.split(".")
    shared = root.joinpath(*group[:-1], f"{group[-1]}__mypyc{ext}")
    modules = [root.joinpath(*m.split(".")).with_suffix(ext) for m in native.COMPILED]
    return [shared, *modules]


def _replace(path: Path, data: bytes) -> None:
    """Write `path` by rename: a process that has the old file mapped keeps it intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o755 if path.suffix == ".so" else 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(entry: Path, key: str, root: Path) -> dict[str, bytes] | None:
    """The files of the entry at `entry` (tree-relative path -> content) if it is whole: its
    manifest names `key` and exactly the extension modules `root` needs, and every file has
    the recorded sha256; else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        want = {p.relative_to(root).as_posix() for p in outputs(root)}
        if manifest.get("key") != key or set(files) != want:
            return None
        blobs: dict[str, bytes] = {}
        for rel, digest in files.items():
            blobs[rel] = (entry / "files" / rel).read_bytes()
            if hashlib.sha256(blobs[rel]).hexdigest() != digest:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return blobs


def restore(key: str, root: Path = native.ROOT, cache: Path | None = None) -> bool:
    """Copy the entry `key` into the tree at `root`; False (the tree untouched) on a miss or
    an entry that is not whole and exactly the build this tree needs."""
    entry = (cache or cache_root()) / key
    blobs = _load(entry, key, root)
    if blobs is None:
        return False
    stamp = native.stamp_path(root)
    stamp.unlink(missing_ok=True)  # until every module is in place: pure Python
    for rel, data in blobs.items():
        _replace(root / rel, data)
    _replace(stamp, native.stamp_text(root).encode())
    with contextlib.suppress(OSError):  # pruned meanwhile: what we read was whole
        os.utime(entry)  # recently used (`prune`)
    return True


def _discard(cache: Path, entry: Path) -> None:
    """Remove `entry`, renamed away first: a concurrent restore sees a miss, not half of it."""
    gone = cache / f".tmp-gone-{entry.name}-{os.getpid()}"
    try:
        os.rename(entry, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def publish(key: str, root: Path = native.ROOT, cache: Path | None = None) -> bool:
    """Store the tree's current build as the entry `key` (staged, then renamed); False when the
    tree has no complete build or another process published `key` first."""
    cache = cache or cache_root()
    built = outputs(root)
    stamp = native.stamp_path(root)
    if not all(p.is_file() for p in built) or not stamp.is_file():
        return False
    if stamp.read_text() != native.stamp_text(root):
        return False
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        files: dict[str, str] = {}
        for path in built:
            rel = path.relative_to(root).as_posix()
            data = path.read_bytes()
            target = staging / "files" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            files[rel] = hashlib.sha256(data).hexdigest()
        manifest = {"key": key, "files": files, "created": time.time()}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(staging, cache / key)
        except OSError:  # ENOTEMPTY / EEXIST: there is an entry already
            if _load(cache / key, key, root) is not None:
                return False  # published meanwhile by another process: kept
            _discard(cache, cache / key)  # damaged: replaced by ours
            try:
                os.rename(staging, cache / key)
            except OSError:
                return False
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        prune(cache)


def prune(cache: Path, keep: int = KEEP, now: float | None = None) -> None:
    """Keep the `keep` most recently used entries; remove crashed publishes' staging dirs."""
    now = time.time() if now is None else now
    entries: list[tuple[float, Path]] = []
    try:
        children = list(cache.iterdir())
    except OSError:
        return
    for child in children:
        try:
            mtime = child.stat().st_mtime
        except OSError:
            continue
        if child.name.startswith(".tmp-"):
            if now - mtime > STALE_STAGING:
                shutil.rmtree(child, ignore_errors=True)
        elif child.is_dir():
            entries.append((mtime, child))
    for _, old in sorted(entries, reverse=True)[keep:]:
        _discard(cache, old)


def build_cached(
    root: Path = native.ROOT,
    cache: Path | None = None,
    *,
    opt_level: str = "3",
    build: Callable[[], None] | None = None,
) -> str:
    """Restore the build of `root`'s sources from the cache, else build (`build`, default
    `meshcore.native.build`) and publish it. Returns what happened, for the log."""
    cache = cache or cache_root()
    key = cache_key(root, opt_level)
    if restore(key, root, cache):
        return f"restored from {cache / key}"
    if build is None:
        if root != native.ROOT:
            raise ValueError("the default build compiles meshcore.native.ROOT only")

        def build() -> None:
            native.build(opt_level)

    build()
    if cache_key(root, opt_level) != key:
        return "compiled (sources changed during the build: not cached)"
    if publish(key, root, cache):
        return f"compiled; cached in {cache / key}"
    return "compiled (not cached: published meanwhile or incomplete)"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshcore.nativecache``: what scripts/setup runs."""
    p = argparse.ArgumentParser(prog="python -m meshcore.nativecache", description=__doc__)
    p.add_argument("--key", action="store_true", help="print the cache key and exit")
    args = p.parse_args(argv)
    if args.key:
        print(cache_key())
        return 0
    print(build_cached())
    return 0


if __name__ == "__main__":
    sys.exit(main())
