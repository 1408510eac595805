"""`meshcore.pmap.PMap`'s empty shards (issue 14, memory): a small mesh's maps hold one shared
empty dict in every empty shard instead of 256 dicts each, and no update ever writes to it."""

from __future__ import annotations

from meshcore.pmap import SHARDS, PMap


def test_empty_shards_are_one_shared_dict_that_updates_never_write() -> None:
    a: PMap[str, int] = PMap([("x", 1)])
    b: PMap[str, int] = PMap()
    # Before: every map had SHARDS fresh dicts (64 bytes each), shared with no other map.
    assert sum(x is y for x, y in zip(a._shards, b._shards, strict=True)) == SHARDS - 1
    assert len({id(s) for s in b._shards}) == 1
    assert a.shared_shards(b) == 0  # counts non-empty shards only
    # ... and no update writes to it.
    empty: PMap[str, int] = PMap()
    other: PMap[str, int] = PMap([("y", 2)])
    grown = empty.evolve({f"k{i}": i for i in range(1000)})
    assert len(grown) == 1000
    assert all(grown[f"k{i}"] == i for i in range(1000))
    assert len(empty) == 0
    assert list(empty) == []
    assert list(other.items()) == [("y", 2)]
    assert list(PMap[str, int]()) == []  # a fresh map is still empty
    shrunk = grown.evolve({f"k{i}": None for i in range(1000)})
    assert len(shrunk) == 0
    assert list(shrunk) == []
