"""Counting a Redis client's round trips without mocking Redis: a real connection class that
counts its writes to the socket (one per round trip: a pipeline is packed into one write)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis


class CountingConnection(redis.Connection):
    """`redis.Connection`, counting the times it sends (class-wide: every pool using it)."""

    writes = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        super().send_packed_command(command, check_health)


class RoundTrips:
    def __init__(self) -> None:
        self.start = CountingConnection.writes

    @property
    def count(self) -> int:
        return CountingConnection.writes - self.start


@contextlib.contextmanager
def counting_round_trips(client: redis.Redis) -> Iterator[RoundTrips]:
    """Count ``client``'s round trips (a plain TCP ``redis.Redis``) inside the block: its pool
    is emptied and makes `CountingConnection`s until the block ends."""
    pool = client.connection_pool
    original = pool.connection_class
    if original is not redis.Connection:
        raise TypeError(f"counting needs a plain TCP connection pool, not {original!r}")
    pool.disconnect()
    pool.reset()  # drop the idle connections too: new ones are made of the counting class
    pool.connection_class = CountingConnection
    try:
        client.ping()  # connect (and the client's handshake) before counting
        yield RoundTrips()
    finally:
        pool.disconnect()
        pool.reset()
        pool.connection_class = original
