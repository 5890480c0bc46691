"""A bounded, TTL-based, thread-safe cache with one load in flight per key.

The keyring uses one instance for unwrapped DEKs (the DEK cache, keyed by
key id, holding ready AEAD objects) and smaller ones for "which key is
active" lookups. An entry lives ``ttl`` seconds from the moment it was
loaded. A TTL of 0 disables caching: every lookup loads.

Single-flight: when several threads miss the same key at once, one runs the
loader and the others wait for its result (or its exception), so a cold
cache causes one KMS unwrap per DEK, not one per thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..keys import LeaseGeneration

__all__ = ["CacheStats", "TtlCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    """Counters of one cache since it was created.

    ``kms_calls`` counts the KMS calls the keyring made to fill the cache
    (unwraps, and data key generation for new DEKs). ``hits`` counts the
    lookups that reached the keyring, not the values sealed or opened:
    column types keep a lease on each key and ask again only when it ends.
    """

    hits: int
    misses: int
    kms_calls: int
    size: int
    evictions: int


class _Entry(Generic[V]):
    __slots__ = ("expires_at", "value")

    def __init__(self, value: V, expires_at: float) -> None:
        self.value = value
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return f"<cache entry {self.value!r}>"

    def __reduce__(self) -> str:
        raise TypeError("cache entries may hold key material and cannot be pickled")


class _Flight(Generic[V]):
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: V | None = None
        self.error: BaseException | None = None


class TtlCache(Generic[K, V]):
    """LRU cache with a per-entry TTL and single-flight loading."""

    def __init__(
        self,
        max_entries: int = 1000,
        ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "cache",
        removals: LeaseGeneration | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if ttl < 0:
            raise ValueError("ttl must be 0 (no caching) or a positive number of seconds")
        self.max_entries = max_entries
        self.ttl = ttl
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._flights: dict[K, _Flight[V]] = {}
        # Bumped by every invalidation, so a load that started before an
        # invalidation does not store a value the invalidation meant to drop.
        self._generation = 0
        # Bumped whenever an entry leaves before its TTL (invalidation,
        # clear, eviction), so that leases on entries, kept outside the
        # cache, can tell that they may be stale. Several caches may share it.
        self.removals = removals if removals is not None else LeaseGeneration()
        self._hits = 0
        self._misses = 0
        self._kms_calls = 0
        self._evictions = 0

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} size={len(self._entries)} "
            f"max_entries={self.max_entries} ttl={self.ttl}>"
        )

    def __reduce__(self) -> str:
        raise TypeError(f"{type(self).__name__} may hold key material and cannot be pickled")

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                kms_calls=self._kms_calls,
                size=len(self._entries),
                evictions=self._evictions,
            )

    def expires_at(self, key: K) -> float | None:
        """Return the clock time at which ``key``'s entry expires, or None if
        it is not cached."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.expires_at

    def record_hit(self) -> None:
        """Count a hit served from a copy of an entry kept outside the cache."""
        with self._lock:
            self._hits += 1

    def record_kms_call(self) -> None:
        with self._lock:
            self._kms_calls += 1

    def _live(self, key: K, now: float) -> _Entry[V] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def get(self, key: K) -> V | None:
        """Return the cached value, counting a hit, or None without counting a miss."""
        with self._lock:
            entry = self._live(key, self._clock())
            if entry is None:
                return None
            self._hits += 1
            return entry.value

    def put(self, key: K, value: V) -> None:
        if self.ttl == 0:
            return
        with self._lock:
            self._store(key, value)

    def _store(self, key: K, value: V) -> None:
        self._entries[key] = _Entry(value, self._clock() + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self._evictions += 1
            self.removals.bump()

    def get_or_load(self, key: K, loader: Callable[[], V]) -> V:
        """Return the cached value, or run ``loader`` once for all waiting threads."""
        if self.ttl == 0:
            with self._lock:
                self._misses += 1
            return loader()
        with self._lock:
            entry = self._live(key, self._clock())
            if entry is not None:
                self._hits += 1
                return entry.value
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = _Flight()
                self._flights[key] = flight
                self._misses += 1
            else:
                self._hits += 1
            generation = self._generation
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value  # type: ignore[return-value]
        try:
            value = loader()
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.value = value
            with self._lock:
                if generation == self._generation:
                    self._store(key, value)
            return value
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()

    def invalidate(self, key: K) -> None:
        with self._lock:
            self._generation += 1
            # Leases can only come from a cached entry or a load in flight,
            # so invalidating a key with neither leaves every lease current.
            if key in self._entries or key in self._flights:
                self.removals.bump()
            self._entries.pop(key, None)

    def invalidate_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry for which ``predicate(key, value)`` is true; return the count."""
        with self._lock:
            self._generation += 1
            self.removals.bump()
            doomed = [key for key, entry in self._entries.items() if predicate(key, entry.value)]
            for key in doomed:
                del self._entries[key]
            return len(doomed)

    def purge_expired(self) -> int:
        """Drop every entry whose TTL has passed; return how many were dropped.

        Expired entries are otherwise dropped only when they are looked up
        or evicted. Leases on them have expired too, so no lease goes stale.
        """
        with self._lock:
            now = self._clock()
            doomed = [key for key, entry in self._entries.items() if entry.expires_at <= now]
            for key in doomed:
                del self._entries[key]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self.removals.bump()
            self._entries.clear()
