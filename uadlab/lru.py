"""A small thread-safe least-recently-used cache for values that are expensive to make (backbones, runs,
datasets, volumes).

Bottom layer: imports nothing from uadlab. ``functools.lru_cache`` serves pure functions; this serves
caches that are keyed by hand, dropped in part (a user's entries) or bounded by the size of their values.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """At most ``size`` entries; with ``weigh`` also at most ``budget`` in total (the ``keep`` newest stay)."""

    def __init__(self, size: int | None, weigh: Callable[[V], float] | None = None, budget: float | None = None,
                 keep: int = 1) -> None:
        self.size, self.weigh, self.budget, self.keep = size, weigh, budget, keep
        self._d: "OrderedDict[Hashable, V]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The cached value of ``key``, or ``make()`` cached now."""
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()  # outside the lock: a slow load must not block other keys (two may load the same once)
        self.put(key, value)
        return value

    def peek(self, key: Hashable) -> V | None:
        """The value of ``key`` or None, without making one (and without marking it used)."""
        with self._lock:
            return self._d.get(key)

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while self.size is not None and len(self._d) > self.size:
                self._d.popitem(last=False)
            if self.weigh is not None and self.budget is not None:
                while len(self._d) > self.keep and sum(map(self.weigh, self._d.values())) > self.budget:
                    self._d.popitem(last=False)

    def drop(self, match: Callable[[Any], bool]) -> None:
        """Forget every entry whose key ``match``es."""
        with self._lock:
            for k in [k for k in self._d if match(k)]:
                del self._d[k]

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)
