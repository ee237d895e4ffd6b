"""Owner tokens and the lease keeper: one thread per process renews the leases of the claims
that this process's running tasks hold.

Short tasks cost nothing here: registering a claim is a dict insert, and a lease is renewed
only once a third of it has passed, so a task that ends sooner never causes a Redis call.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from .exceptions import IdempotencyError
from .keys import RecordRef
from .records import KeyState
from .store.base import KeyStore

logger = logging.getLogger("celery_idempotency")

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def owner_prefix(pid: int) -> str:
    """The part of an owner token that names a process: the worker's main process can match
    the claims of a pool child it saw die, without knowing their random part."""
    return f"{_HOST}:{pid:x}."


_prefix_of_pid: tuple[int, str] = (-1, "")


def new_owner_token() -> str:
    # Unique per process by the prefix; 32 random bits tell its claims apart. Short, because
    # the owner stays in every record.
    global _prefix_of_pid
    pid = os.getpid()
    if _prefix_of_pid[0] != pid:  # formatted once per process (a fork changes the pid)
        _prefix_of_pid = (pid, owner_prefix(pid))
    return _prefix_of_pid[1] + os.urandom(4).hex()  # as secrets.token_hex(4)


@dataclass
class _Held:
    store: KeyStore
    ref: RecordRef
    owner: str
    lease_ms: int
    fence: int
    renewed_at: float = field(default_factory=time.monotonic)
    lost: bool = False

    def due_at(self) -> float:
        return self.renewed_at + self.lease_ms / 3000


class LeaseKeeper:
    """Renews held leases from one daemon thread (never keeps a process from exiting)."""

    IDLE_WAIT = 5.0

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # After fork the child has a copy of the parent's state but not its thread.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._held: dict[int, _Held] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        # When the sleeping thread wakes next (0: it is not asleep and will look again before
        # sleeping). A new lease only wakes it when due sooner: a task must not cost a thread
        # switch.
        self._wake_at = 0.0

    def hold(self, store: KeyStore, ref: RecordRef, owner: str, lease_ms: int, *,
             fence: int) -> int:
        """Renew ``owner``'s lease of ``ref`` (its claim's ``fence``) until `release`."""
        with self._lock:
            token = next(self._ids)
            held = self._held[token] = _Held(store, ref, owner, lease_ms, fence)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="idempotency-leases",
                                                daemon=True)
                self._thread.start()
            elif held.due_at() < self._wake_at:
                self._wakeup.notify()
            return token

    def release(self, token: int) -> bool:
        """Stop renewing; returns False if the lease was found lost while the task ran."""
        with self._lock:
            held = self._held.pop(token, None)
        return held is not None and not held.lost

    def held_count(self) -> int:
        with self._lock:
            return len(self._held)

    def _run(self) -> None:
        while True:
            try:
                self._run_once()
            except Exception:
                # Never let the thread die: every running task depends on it. Whatever went
                # wrong (a bug, a store client raising something unexpected), go on after a
                # pause so that a persistent error does not spin.
                logger.exception("lease keeper: unexpected error; renewing again in 1 s")
                time.sleep(1.0)

    def _run_once(self) -> None:
        """Renew what is due, or sleep until something is."""
        while True:
            with self._lock:
                now = time.monotonic()
                due = [(token, held) for token, held in self._held.items()
                       if not held.lost and held.due_at() <= now]
                if not due:
                    waits = [held.due_at() - now for held in self._held.values() if not held.lost]
                    wait = min(waits, default=self.IDLE_WAIT)
                    self._wake_at = now + wait
                    self._wakeup.wait(wait)
                    self._wake_at = 0.0
                    continue
            for token, held in due:  # Redis calls outside the lock
                self._renew(token, held)

    def _renew(self, token: int, held: _Held) -> None:
        try:
            renewed = held.store.renew(held.ref, owner=held.owner, lease_ms=held.lease_ms)
        except Exception as exc:
            # Any error, classified or not. Try again soon; if the store stays away the lease
            # may expire and be taken over, and the late completion is then refused (fencing),
            # never written over the new one.
            logger.log(logging.WARNING if isinstance(exc, IdempotencyError) else logging.ERROR,
                       "could not renew the lease of key %r: %s", held.ref.key, exc,
                       exc_info=not isinstance(exc, IdempotencyError))
            with self._lock:
                held.renewed_at = time.monotonic() - held.lease_ms / 3000 + 0.5
            return
        if renewed:
            with self._lock:
                held.renewed_at = time.monotonic()
            return
        if self._finished_by_its_owner(held):
            return  # the task wrote its outcome between our pick and the renewal: not a loss
        with self._lock:
            held.lost = True
        logger.error("lease of key %r (owner %s) was lost while its task ran: another "
                     "worker took it over; this run's outcome will not be recorded",
                     held.ref.key, held.owner)

    @staticmethod
    def _finished_by_its_owner(held: _Held) -> bool:
        try:
            record = held.store.get(held.ref)
        except Exception:  # unknown: report the loss (the claim was not renewed)
            return False
        if record is None or record.state is KeyState.STARTED:
            return False
        if record.state is KeyState.SUCCEEDED:  # keeps no owner token: the claim's fence
            return record.fence == held.fence
        return record.owner == held.owner


lease_keeper = LeaseKeeper()
