"""Waking the waiters of a key when its record changes, instead of having them poll.

Every script that makes an outcome final or removes a record (complete, fail, abandon,
discard) announces it on the record's *wake channel* (`wake_channel`: the record's name plus
``:wake``, so bounded, never the user's key and never a pattern). A waiter:

1. opens a `Watch` on the key (the subscription is confirmed by the server before ``watch``
   returns), and only then
2. reads the record, and between reads waits on the watch: a change announced after the
   subscription sets the watch's flag, which the next ``wait`` sees at once, so no wake-up is
   lost between a read and a wait.

A notification carries nothing but "look again": the waiter re-reads the record, so a stale,
duplicated or spurious one is harmless, and a lost one costs at most a safety poll
(`SAFETY_POLL`). Pub/sub is at-most-once; the record is the truth.

Redis (`RedisWaker`): one subscriber connection per store object, shared by every watch of the
process (one thread reads it). The scripts publish with ``SPUBLISH`` (Redis >= 7; on a
Cluster it stays within the record's shard) and fall back to ``PUBLISH`` (Redis 6); both
through ``redis.pcall``, so an ACL without pub/sub permissions never fails a write. When the
subscriber connection drops, every watch is woken and polls with backoff until the
subscription is back (then they are woken once more, to re-read what they may have missed).
An ACL that forbids subscribing, and a Redis Cluster, get `PollingWatch`: the waiter polls.

The memory store wakes its waiters with a condition variable (`ChangeWatch`).
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import redis

logger = logging.getLogger("celery_idempotency")
T = TypeVar("T")

WAKE_SUFFIX = ":wake"
# While notifications are trusted, a waiter still re-reads the record this often: pub/sub may
# drop a message (a subscriber's output buffer limit, a failover) and nothing says so.
SAFETY_POLL = 2.0
# How long `RedisWaker.watch` waits for the server to confirm a subscription before the watch
# falls back to polling.
_CONFIRM_TIMEOUT = 1.0
# Pauses between attempts to re-open a dropped subscriber connection.
_REOPEN_FIRST, _REOPEN_MAX = 0.05, 2.0


def wake_channel(store_key: str) -> str:
    """The channel a record's changes are announced on (same hash tag: same Cluster slot)."""
    return store_key + WAKE_SUFFIX


class Watch(abc.ABC):
    """A waiter's subscription to one record's changes. Use as a context manager."""

    @property
    @abc.abstractmethod
    def live(self) -> bool:
        """Whether a change now wakes `wait` (else the waiter must poll: short pauses)."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block until the record may have changed since the last call (True) or ``timeout``
        seconds passed (False). A change made after the watch was opened is never missed
        while `live`."""

    def read(self, fetch: Callable[[], T]) -> T:
        """``fetch()`` (a read of the record). Watches of one key in one process may share
        one read per wake-up: a hundred waiters woken by one outcome read it once."""
        return fetch()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop watching."""

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class PollingWatch(Watch):
    """No notifications: `wait` only sleeps, the waiter polls."""

    @property
    def live(self) -> bool:
        return False

    def wait(self, timeout: float) -> bool:
        time.sleep(max(0.0, timeout))
        return False


class ChangeWatch(Watch):
    """Watch over a version counter guarded by a condition variable (the memory store)."""

    def __init__(self, condition: threading.Condition, version: Callable[[], int],
                 release: Callable[[], None]) -> None:
        self._condition = condition
        self._version = version
        self._release: Callable[[], None] | None = release
        with condition:
            self._seen = version()

    @property
    def live(self) -> bool:
        return True

    def wait(self, timeout: float) -> bool:
        with self._condition:
            changed = self._condition.wait_for(lambda: self._version() != self._seen,
                                               max(0.0, timeout))
            self._seen = self._version()
            return changed

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class _Channel:
    """Watches of one channel, and whether the server confirmed its subscription."""

    def __init__(self) -> None:
        self.watches: set[_RedisWatch] = set()
        self.confirmed = threading.Event()
        # Bumped by every wake-up: a read made at this generation reflects every change
        # announced so far, so the channel's other watches may reuse it.
        self.generation = 0
        self.read_lock = threading.Lock()
        self.last_read: tuple[int, Any] | None = None

    def wake(self) -> None:
        self.generation += 1
        for watch in list(self.watches):
            watch.flag.set()


class _RedisWatch(Watch):
    def __init__(self, waker: RedisWaker, name: bytes, channel: _Channel) -> None:
        self._waker = waker
        self.name = name
        self.channel = channel
        self.flag = threading.Event()

    @property
    def live(self) -> bool:
        return self._waker.healthy and self.channel.confirmed.is_set()

    def wait(self, timeout: float) -> bool:
        woken = self.flag.wait(max(0.0, timeout))
        self.flag.clear()
        return woken

    def read(self, fetch: Callable[[], T]) -> T:
        channel = self.channel
        if not self.live:  # without notifications a generation proves nothing
            return fetch()
        with channel.read_lock:
            generation = channel.generation
            last = channel.last_read
            if last is not None and last[0] == generation:
                value: T = last[1]
                return value
            value = fetch()  # an error is not shared: the next waiter reads again
            channel.last_read = (generation, value)
            return value

    def close(self) -> None:
        self._waker.release(self)


class RedisWaker:
    """One subscriber connection for every watch of a store, read by one daemon thread.

    Subscribing is done by the thread that opens a watch (redis-py sends under the PubSub's
    lock, as its own ``run_in_thread`` does); only the reader thread reads. Shard channels
    (``SSUBSCRIBE``) unless the server is older than Redis 7."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()  # a forked child starts over: the reader thread is not there
        self._channels: dict[bytes, _Channel] = {}
        # Subscribe commands sent and not yet confirmed, per channel: a late confirmation of
        # an earlier subscription must not confirm a newer one.
        self._unconfirmed: dict[bytes, int] = {}
        self._pubsub: Any = None
        self._own: redis.Redis | None = None
        self._reader: threading.Thread | None = None
        self._sharded: bool | None = None
        self.healthy = False
        #: Subscribing is refused for good (an ACL without channel permissions): poll.
        self.forbidden = False
        self._closed = False

    # -- watches -------------------------------------------------------------------------------

    def watch(self, channel: str) -> Watch:
        name = channel.encode("utf-8")
        if self._pid != os.getpid():
            # A forked child (a prefork pool's): no reader thread here, and the parent's lock
            # may have been copied held. Start over with a lock of its own.
            self._lock = threading.Lock()
            self._reset()
        with self._lock:
            if self.forbidden or self._closed:
                return PollingWatch()
            self._start()
            entry = self._channels.get(name)
            new = entry is None
            if entry is None:
                entry = self._channels[name] = _Channel()
            watch = _RedisWatch(self, name, entry)
            entry.watches.add(watch)
            if new and self.healthy:
                try:
                    self._send_subscribe(name)
                except redis.RedisError:
                    self._mark_unhealthy()  # the reader thread re-opens and subscribes
        # Outside the lock: the reader thread confirms. Unconfirmed, the watch polls.
        if self.healthy:
            entry.confirmed.wait(_CONFIRM_TIMEOUT)
        # Not a change: the first confirmation (the caller reads the record next, after this).
        watch.flag.clear()
        return watch

    def release(self, watch: _RedisWatch) -> None:
        with self._lock:
            entry = self._channels.get(watch.name)
            if entry is None or watch not in entry.watches:
                return
            entry.watches.discard(watch)
            if entry.watches:
                return
            del self._channels[watch.name]
            if self.healthy:
                try:
                    self._command("unsubscribe", watch.name)
                except redis.RedisError:
                    self._mark_unhealthy()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pubsub, self._pubsub = self._pubsub, None
            self.healthy = False
            for entry in self._channels.values():
                entry.wake()
        if pubsub is not None:
            pubsub.close()
        if self._own is not None and self._own is not self._client:
            self._own.close()

    # -- the subscriber connection (under self._lock) -------------------------------------------

    def _start(self) -> None:
        if self._reader is not None:
            return
        self._open()
        self._reader = threading.Thread(target=self._read_forever,
                                        name="celery-idempotency-wakeups", daemon=True)
        self._reader.start()

    def _open(self) -> None:
        """A new subscriber connection, subscribed to every channel watched now."""
        if self._sharded is None:
            self._sharded = self._server_has_shard_channels()
        self._pubsub = self._subscriber().pubsub()  # type: ignore[no-untyped-call]
        self._unconfirmed.clear()
        self.healthy = True  # until a command or a read fails
        try:
            for name, entry in self._channels.items():
                entry.confirmed.clear()
                self._send_subscribe(name)
        except redis.RedisError:
            self._mark_unhealthy()

    def _subscriber(self) -> redis.Redis:
        """The client the subscriber connection comes from: a pool of its own where that is
        simple (a plain server), so that it never takes one of the store's pooled
        connections (redis-py's pool has a limit: a hundred threads already reach it)."""
        if self._own is None:
            pool = self._client.connection_pool
            if type(pool) is redis.ConnectionPool:
                self._own = redis.Redis(connection_pool=redis.ConnectionPool(
                    connection_class=pool.connection_class, max_connections=2,
                    **pool.connection_kwargs))
            else:  # Sentinel: its pool finds the master
                self._own = self._client
        return self._own

    def _server_has_shard_channels(self) -> bool:
        try:
            version = str(self._client.info("server").get("redis_version", "7"))
        except redis.RedisError:  # INFO may be denied by an ACL: try shard channels
            return True
        try:
            return int(version.split(".")[0]) >= 7
        except ValueError:
            return True

    def _command(self, verb: str, name: bytes) -> None:
        command = ("s" + verb) if self._sharded else verb
        getattr(self._pubsub, command)(name)

    def _send_subscribe(self, name: bytes) -> None:
        self._unconfirmed[name] = self._unconfirmed.get(name, 0) + 1
        self._command("subscribe", name)

    def _mark_unhealthy(self) -> None:
        """The connection is gone: wake every watch (it polls until the subscription is back)."""
        self.healthy = False
        for entry in self._channels.values():
            entry.confirmed.clear()
            entry.wake()

    # -- the reader thread ------------------------------------------------------------------------

    def _read_forever(self) -> None:
        pause = _REOPEN_FIRST
        while True:
            with self._lock:
                if self._closed or self._pid != os.getpid():
                    return
                pubsub = self._pubsub if self.healthy else None
            if pubsub is None:
                time.sleep(pause)
                pause = min(pause * 2, _REOPEN_MAX)
                with self._lock:
                    if not self._closed and not self.healthy and not self.forbidden:
                        if self._pubsub is not None:
                            self._pubsub.close()
                        self._open()
                continue
            try:
                message = pubsub.get_message(timeout=1.0)
            except Exception as exc:  # this thread must outlive any failure
                # Besides RedisError: redis-py's connection torn down under a read by close()
                # (TypeError, AttributeError). Either way: poll until re-opened.
                self._lost(exc)
                continue
            pause = _REOPEN_FIRST
            if message is not None:
                self._dispatch(message)

    def _lost(self, exc: BaseException) -> None:
        text = str(exc)
        with self._lock:
            if self._closed:
                return
            if "NOPERM" in text or "permission" in text.lower():
                self.forbidden = True
                logger.warning("idempotency store: subscribing to wake-up channels is not "
                               "allowed (%s); waiters poll instead (allow the channels "
                               "&<prefix>* and SSUBSCRIBE/SUBSCRIBE to wake them at once)", exc)
            elif self._sharded and "unknown command" in text.lower():
                self._sharded = False  # a server without shard channels: plain ones
            else:
                logger.info("idempotency store: wake-up subscription lost (%s); waiters poll "
                            "until it is back", exc)
            self._mark_unhealthy()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, name = message.get("type"), message.get("channel")
        if not isinstance(name, bytes):
            return
        with self._lock:
            entry = self._channels.get(name)
            if kind in ("subscribe", "ssubscribe"):
                left = max(0, self._unconfirmed.get(name, 0) - 1)
                self._unconfirmed[name] = left
                if left == 0:
                    self._unconfirmed.pop(name, None)
                    if entry is not None:
                        # Also a resubscription after a reconnect by redis-py itself: changes
                        # may have been missed meanwhile, so the watches re-read.
                        entry.confirmed.set()
                        entry.wake()
            elif kind in ("message", "smessage") and entry is not None:
                entry.wake()
