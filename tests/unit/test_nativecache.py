"""The user-level cache of the mypyc build (`meshcore.nativecache`): a fresh tree of sources
built before restores the same extension modules (and runs them compiled); any change to what
the build depends on misses; an entry that is not whole is never used and leaves the tree as it
was. The trees are copies of this repository's packages with this checkout's real build
(scripts/setup made it), the caches temporary directories: nothing is compiled here."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from meshcore import native, nativecache
from tests.unit.test_native import _files

PACKAGES = ("meshcore", "ztunnel", "waypoint")


def _built_here() -> list[Path]:
    built = nativecache.outputs()
    if not all(p.is_file() for p in built) or native.select() != "compiled":
        pytest.fail("no current compiled build: scripts/setup builds it")
    return built


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages with this checkout's compiled build and stamp."""
    _built_here()
    root = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(
            native.ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.tmp")
        )
    return root


def _strip(root: Path) -> None:
    """What a fresh clone has: sources only."""
    for p in nativecache.outputs(root):
        p.unlink()
    (root / "meshcore" / "_native.json").unlink()


def _selected(root: Path) -> dict[str, str]:
    """What a fresh interpreter runs from the tree at `root` (not this checkout)."""
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    return _files({**env, "PYTHONPATH": str(root)}, cwd=root)


def test_a_fresh_tree_restores_the_same_modules_and_runs_them_compiled(
    tree: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    built: list[str] = []
    first = nativecache.build_cached(tree, cache, build=lambda: built.append("x"))
    # The tree's build is current, yet the key was not in the cache: "build" (a stand-in
    # here: the tree holds the real build already), then publish.
    assert built == ["x"]
    assert "cached in" in first
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert entry.name == nativecache.cache_key(tree)

    _strip(tree)
    assert _selected(tree)["mode"] == "pure"
    second = nativecache.build_cached(tree, cache, build=lambda: built.append("again"))
    assert built == ["x"], "a cache hit must not build"
    assert second.startswith("restored from")
    for ours, theirs in zip(nativecache.outputs(tree), _built_here(), strict=True):
        assert ours.read_bytes() == theirs.read_bytes(), ours
    assert (tree / "meshcore" / "_native.json").read_text() == native.STAMP.read_text()
    files = _selected(tree)
    assert files.pop("mode") == "compiled"
    assert all(f.startswith(str(tree)) and f.endswith(".so") for f in files.values()), files


@pytest.mark.parametrize(
    "edit",
    [
        "meshcore/hbone/frames.py",  # a compiled module
        "meshcore/errors.py",  # a module compiled ones import: its types are compiled in
        "meshcore/native.py",  # the list of modules and the build recipe
    ],
)
def test_a_changed_input_misses(tree: Path, tmp_path: Path, edit: str) -> None:
    cache = tmp_path / "cache"
    key = nativecache.cache_key(tree)
    assert nativecache.publish(key, tree, cache)
    _strip(tree)
    with (tree / edit).open("a") as f:
        f.write("\n# edited\n")
    changed = nativecache.cache_key(tree)
    assert changed != key
    assert not nativecache.restore(changed, tree, cache)
    assert not any(p.exists() for p in nativecache.outputs(tree))
    assert not (tree / "meshcore" / "_native.json").exists()


def test_the_key_follows_the_interpreter_and_the_compiler_settings(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = nativecache.cache_key(tree)
    assert nativecache.cache_key(tree, opt_level="2") != key
    monkeypatch.setenv("CFLAGS", "-O0")
    assert nativecache.cache_key(tree) != key
    monkeypatch.delenv("CFLAGS")
    monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    assert nativecache.cache_key(tree) != key
    monkeypatch.undo()
    assert nativecache.cache_key(tree) == key


@pytest.mark.parametrize("damage", ["truncate", "missing", "extra", "manifest", "wrong-key"])
def test_an_entry_that_is_not_whole_is_never_used(tree: Path, tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    key = nativecache.cache_key(tree)
    assert nativecache.publish(key, tree, cache)
    entry = cache / key
    victim = entry / "files" / "meshcore" / "hbone" / nativecache.outputs(tree)[1].name
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:1000])
    elif damage == "missing":
        victim.unlink()
    elif damage == "extra":
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["files"]["meshcore/extra.so"] = "0" * 64
        (entry / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "manifest":
        (entry / "manifest.json").write_text('{"key": "')
    else:
        shutil.copytree(entry, cache / ("f" * 64))
        entry = cache / ("f" * 64)
        key = entry.name
    before = {p: p.read_bytes() for p in nativecache.outputs(tree)}
    stamp = (tree / "meshcore" / "_native.json").read_text()
    assert not nativecache.restore(key, tree, cache)
    # Untouched: neither the modules nor the stamp.
    assert {p: p.read_bytes() for p in nativecache.outputs(tree)} == before
    assert (tree / "meshcore" / "_native.json").read_text() == stamp
    if damage != "wrong-key":  # the next build replaces the damaged entry
        nativecache.build_cached(tree, cache, build=lambda: None)
        assert nativecache.restore(key, tree, cache)


def test_publish_is_atomic_and_first_wins(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    key = nativecache.cache_key(tree)
    assert nativecache.publish(key, tree, cache)
    assert not nativecache.publish(key, tree, cache)  # published already: kept as it is
    assert sorted(p.name for p in cache.iterdir()) == [key]  # no staging dir left behind
    # A tree whose stamp does not match its sources (stale) or lacks a module is not published.
    (tree / "meshcore" / "deadlines.py").write_text("X = 1\n")
    assert not nativecache.publish("a" * 64, tree, cache)
    assert not (cache / ("a" * 64)).exists()


def test_prune_keeps_the_recently_used_and_drops_crashed_staging(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for i in range(5):
        (cache / f"{i:064x}").mkdir(parents=True)
        os.utime(cache / f"{i:064x}", (1000 + i, 1000 + i))
    (cache / ".tmp-crashed").mkdir()
    os.utime(cache / ".tmp-crashed", (0, 0))
    (cache / ".tmp-live").mkdir()
    nativecache.prune(cache, keep=2, now=2000.0 + nativecache.STALE_STAGING)
    left = sorted(p.name for p in cache.iterdir())
    assert left == [".tmp-live", f"{3:064x}", f"{4:064x}"]


def test_an_edit_to_a_module_the_compiled_ones_import_makes_the_build_stale(tree: Path) -> None:
    """`meshcore.errors` is not compiled, but the compiled modules import it (mypyc compiled
    against its classes): after an edit to it the tree's build is stale, as the cache key
    already said (one set of sources for both: `meshcore.native.build_inputs`). Before, only
    the compiled modules' own sources were compared and the stale build ran."""
    assert _selected(tree)["mode"] == "compiled"
    errors = tree / "meshcore" / "errors.py"
    errors.write_text(errors.read_text() + "\n# edited after the build\n")
    assert _selected(tree)["mode"] == "stale"
