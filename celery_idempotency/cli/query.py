"""What the commands do to the store, without the command line: filter a scan, find a key,
count, release and purge. Every scan streams (`KeyStore.entries`) in constant memory."""

from __future__ import annotations

import enum
import fnmatch
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import redis
from redis.exceptions import RedisClusterException

from ..keys import RecordRef
from ..records import KeyState, Record
from ..store import Entry, KeyStore, RedisKeyStore
from ..store.eviction import MemoryPolicy, PolicyUnknown, read_policies
from .terminal import shown

MEMORY_SAMPLES = 200


@dataclass(frozen=True)
class Filter:
    """Client-side filters: the store's key names are digests, so nothing can be matched there."""

    states: frozenset[KeyState] = frozenset()
    scopes: frozenset[str] = frozenset()
    match: str | None = None  # fnmatch pattern on the key as the client gave it, case-sensitive
    stale: bool = False  # only claims whose lease expired

    def __call__(self, record: Record, now_ms: int) -> bool:
        return ((not self.states or record.state in self.states)
                and (not self.scopes or record.scope in self.scopes)
                and (self.match is None or fnmatch.fnmatchcase(record.key, self.match))
                and (not self.stale or record.lease_expired(now_ms)))


@dataclass
class ScanCounter:
    """What a scan went through besides the records it yielded: keys under the prefix that
    are not records of ours (``foreign``: another type, a hash without our fields) and records
    that cannot be decoded (``undecodable``, also key names that are not UTF-8). Counted, never
    skipped silently."""

    scanned: int = 0
    undecodable: int = 0
    foreign: int = 0
    first_error: str | None = None
    first_foreign: str | None = None


def records(store: KeyStore, wanted: Filter, now_ms: int, counter: ScanCounter,
            *, on_scanned: Callable[[int], None] | None = None) -> Iterator[Entry]:
    """Entries whose record passes ``wanted`` (without cached results), in SCAN order."""
    for entry in store.entries(with_result=False):
        counter.scanned += 1
        if on_scanned is not None:
            on_scanned(counter.scanned)
        if entry.record is None:
            if entry.foreign:
                counter.foreign += 1
                if counter.first_foreign is None:
                    counter.first_foreign = str(entry.error)
            else:
                counter.undecodable += 1
                if counter.first_error is None:
                    counter.first_error = str(entry.error)
            continue
        if wanted(entry.record, now_ms):
            yield entry


class KeyNotFound(LookupError):
    def __init__(self, key: str, scope: str | None) -> None:
        where = f"in scope '{shown(scope)}'" if scope is not None else "in any scope"
        super().__init__(f"no record for key '{shown(key)}' {where}")


class AmbiguousKey(LookupError):
    def __init__(self, key: str, scopes: Sequence[str]) -> None:
        super().__init__(f"key '{shown(key)}' exists in {len(scopes)} scopes "
                         f"({', '.join(shown(scope) for scope in scopes)}); say which with "
                         "--scope")
        self.scopes = list(scopes)


def locate(store: KeyStore, key: str, scope: str | None) -> Entry:
    """The entry (with its result) for ``key``. Without a scope, scan for the one scope that has
    the key: `KeyNotFound` if none does, `AmbiguousKey` if several do."""
    if scope is None:
        # Kept: one scope per matching record, i.e. a handful (scopes are task names).
        scopes = sorted({entry.record.scope for entry in records(
            store, Filter(), 0, ScanCounter()) if entry.record and entry.record.key == key})
        if not scopes:
            raise KeyNotFound(key, None)
        if len(scopes) > 1:
            raise AmbiguousKey(key, scopes)
        scope = scopes[0]
    entry = store.entry(RecordRef(scope, key))
    if entry is None:
        raise KeyNotFound(key, scope)
    if entry.error is not None:
        raise entry.error
    return entry


# -- stats ---------------------------------------------------------------------------------------

@dataclass
class Stats:
    counter: ScanCounter = field(default_factory=ScanCounter)
    states: dict[KeyState, int] = field(default_factory=lambda: dict.fromkeys(KeyState, 0))
    stale: int = 0
    oldest: Record | None = None
    sample: list[str] = field(default_factory=list)  # store keys, a uniform random sample
    memory_bytes: int | None = None

    @property
    def total(self) -> int:
        return sum(self.states.values())


def collect_stats(store: KeyStore, wanted: Filter, now_ms: int, *,
                  on_scanned: Callable[[int], None] | None = None,
                  rng: random.Random | None = None) -> Stats:
    """Counts per state, stale leases, the oldest record, and memory estimated as MEMORY USAGE of
    a random sample (reservoir sampling: constant memory) times the count."""
    stats = Stats()
    rng = rng or random.Random()
    for entry in records(store, wanted, now_ms, stats.counter, on_scanned=on_scanned):
        record = entry.record
        assert record is not None
        seen = stats.total
        stats.states[record.state] += 1
        if record.lease_expired(now_ms):
            stats.stale += 1
        # A succeeded record keeps no creation time: its age counts from its completion.
        if stats.oldest is None or record.since_ms < stats.oldest.since_ms:
            stats.oldest = record
        if seen < MEMORY_SAMPLES:
            stats.sample.append(entry.store_key)
        elif (slot := rng.randrange(seen + 1)) < MEMORY_SAMPLES:
            stats.sample[slot] = entry.store_key
    sizes = [size for size in store.memory_usage(stats.sample) if size is not None]
    if sizes:
        stats.memory_bytes = round(sum(sizes) / len(sizes) * stats.total)
    return stats


def memory_policies(store: KeyStore) -> tuple[list[MemoryPolicy] | None, str | None]:
    """(maxmemory, policy and evicted_keys of each server holding records, or why unknown).
    ``(None, None)`` for the memory store, which never evicts."""
    if not isinstance(store, RedisKeyStore):
        return None, None
    try:
        return read_policies(store.client, with_evictions=True), None
    except PolicyUnknown as exc:
        return None, f"CONFIG GET and INFO denied ({exc})"
    except (redis.RedisError, RedisClusterException) as exc:  # the counts are still worth showing
        return None, str(exc)


# -- release ---------------------------------------------------------------------------------------

class ReleaseStatus(str, enum.Enum):
    RELEASED = "released"
    LIVE_CLAIM = "live_claim"  # refused: a worker holds a live lease
    HAS_RESULT = "has_result"  # refused: succeeded; releasing lets the task run again
    CHANGED = "changed"  # the record changed since it was read: nothing deleted
    GONE = "gone"  # the record disappeared since it was read


@dataclass(frozen=True)
class Release:
    status: ReleaseStatus
    record: Record  # as read before deciding
    now: Record | None = None  # for CHANGED: as it is now


def release(store: KeyStore, record: Record, now_ms: int, *, force: bool) -> Release:
    """Delete the record if it is still exactly as read (compare-and-delete), unless it is a
    live claim or a cached result and ``force`` is not given."""
    if not force:
        if record.state is KeyState.STARTED and not record.lease_expired(now_ms):
            return Release(ReleaseStatus.LIVE_CLAIM, record)
        if record.state is KeyState.SUCCEEDED:
            return Release(ReleaseStatus.HAS_RESULT, record)
    if store.delete_if_unchanged(record):
        return Release(ReleaseStatus.RELEASED, record)
    current = store.entry(RecordRef(record.scope, record.key))
    if current is None:
        return Release(ReleaseStatus.GONE, record)
    return Release(ReleaseStatus.CHANGED, record, current.record)


# -- purge -----------------------------------------------------------------------------------------

@dataclass
class Purge:
    counter: ScanCounter = field(default_factory=ScanCounter)
    matched: int = 0
    deleted: int = 0
    changed: int = 0  # matched, but changed before it could be deleted: kept
    live: int = 0  # live claims: never purged


def purge(store: KeyStore, wanted: Filter, older_than_ms: int, now_ms: int, *, dry_run: bool,
          on_scanned: Callable[[int], None] | None = None) -> Purge:
    """Delete records that pass ``wanted`` and last changed more than ``older_than_ms`` ago,
    each with compare-and-delete. Live claims (started, lease alive) are never deleted."""
    outcome = Purge()
    cutoff = now_ms - older_than_ms
    for entry in records(store, wanted, now_ms, outcome.counter, on_scanned=on_scanned):
        record = entry.record
        assert record is not None
        if record.updated_ms > cutoff:
            continue
        if record.state is KeyState.STARTED and not record.lease_expired(now_ms):
            outcome.live += 1
            continue
        outcome.matched += 1
        if dry_run:
            continue
        if store.delete_if_unchanged(record):
            outcome.deleted += 1
        else:
            outcome.changed += 1
    return outcome
