"""A persistent (immutable) map whose updates copy only what they touch.

Owns: `PMap`, the map behind `MeshState`'s indexes, so that applying a one-record xDS delta to a
snapshot of 10,000 workloads costs O(changed), not a rebuild (issue 14).

Design: the keys are spread over `SHARDS` plain dicts by ``hash(key)``; the shard table is a
tuple. `evolve` copies the shard table and only the shards its keys fall in; every other shard
is shared with the previous map. A lookup is one hash and one dict lookup.

Invariants:
- A `PMap` never changes after construction (no method mutates it; `evolve` returns a new map
  and never writes to a shard it shares). Readers holding an old map see the old content.
- Iteration order is by shard, not insertion: callers that need an order sort.
- ``None`` is not a storable value: in `evolve` it means "delete".
- Every empty shard is the one `_EMPTY` dict, shared by all maps (a small mesh's node proxy
  holds ~20 maps of mostly empty shards: 64 bytes each, 0.3 MiB a worker otherwise); nothing
  writes to it, since `evolve` copies a shard before writing to it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any, Final, Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")

SHARDS: Final = 256
"""At 10,000 keys a shard holds ~40 entries: an update copies ~40 entries plus 256 pointers."""
_MASK: Final = SHARDS - 1
_EMPTY: Final[dict[Any, Any]] = {}


class PMap(Generic[K, V]):
    """An immutable mapping with cheap copy-on-write updates (`evolve`)."""

    __slots__ = ("_len", "_shards")

    _shards: tuple[dict[K, V], ...]
    _len: int

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        shards: list[dict[K, V]] = [{} for _ in range(SHARDS)]
        for k, v in items:
            shards[hash(k) & _MASK][k] = v
        self._shards = tuple(s if s else _EMPTY for s in shards)
        self._len = sum(len(s) for s in shards)

    @classmethod
    def _of(cls, shards: tuple[dict[K, V], ...], length: int) -> PMap[K, V]:
        new: PMap[K, V] = cls.__new__(cls)
        new._shards = shards
        new._len = length
        return new

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: D) -> V | D: ...
    def get(self, key: K, default: object = None) -> object:
        return self._shards[hash(key) & _MASK].get(key, default)

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & _MASK][key]

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    def items(self) -> Iterator[tuple[K, V]]:
        for shard in self._shards:
            yield from shard.items()

    def values(self) -> Iterator[V]:
        for shard in self._shards:
            yield from shard.values()

    def to_dict(self) -> dict[K, V]:
        return dict(self.items())

    def evolve(self, changes: Mapping[K, V | None]) -> PMap[K, V]:
        """A new map with `changes` applied (a ``None`` value deletes the key). Costs the
        touched shards plus the shard table; `self` is unchanged and shares the rest."""
        if not changes:
            return self
        shards = list(self._shards)
        copied: set[int] = set()
        length = self._len
        for k, v in changes.items():
            i = hash(k) & _MASK
            shard = shards[i]
            if v is None:
                if k not in shard:
                    continue
                if i not in copied:
                    shard = shards[i] = dict(shard)
                    copied.add(i)
                del shard[k]
                length -= 1
            else:
                if i not in copied:
                    shard = shards[i] = dict(shard)
                    copied.add(i)
                if k not in shard:
                    length += 1
                shard[k] = v
        return PMap._of(tuple(shards), length)

    def shared_shards(self, other: PMap[K, V]) -> int:
        """How many non-empty shards `self` and `other` share (same object; every empty shard
        is the one `_EMPTY`): tests of structural sharing. `m.shared_shards(m)` counts `m`'s
        non-empty shards."""
        return sum(bool(a) and a is b for a, b in zip(self._shards, other._shards, strict=True))
