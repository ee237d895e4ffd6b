"""Key stores of the chaos suite, and the faults a run injects into them.

- `RedisServer` (tests.support.services): a single private redis-server, restarted with its
  data during a run.
- `SentinelStore` (tests.support.services's `RedisSentinel` with a replica): a primary, a
  replica and a Sentinel, all private processes on free ports; the store URL is
  ``redis+sentinel://``. A run fails the primary over to the replica while tasks run.

Both take *error replies*: ``CONFIG SET min-replicas-to-write`` above the number of connected
replicas makes the primary refuse every write with ``NOREPLICAS`` until it is set back to 0.
"""

from __future__ import annotations

import time

import redis

from tests.support.services import RedisSentinel, RedisServer, start_sentinel, wait_until

SERVICE = "chaos-store"
REPLICATION = ("--repl-diskless-sync-delay", "0")


class SentinelStore(RedisSentinel):
    """A primary and a replica monitored by one Sentinel (quorum 1).

    Sentinel never fails over on its own here (a primary slow under load must not count as
    down): only `failover` does, with ``SENTINEL FAILOVER``.
    """

    def __init__(self) -> None:
        super().__init__(SERVICE, master=RedisServer(extra_args=REPLICATION))
        self.replica = RedisServer(extra_args=REPLICATION)
        self.servers = [self.master, self.replica]

    def start(self) -> SentinelStore:
        primary, replica = self.servers
        primary.start()
        replica.start()
        replica.client().replicaof("127.0.0.1", primary.port)
        wait_until(lambda: replica.client().info("replication").get("master_link_status") == "up",
                   "the replica to sync")
        config = self.dir / "sentinel.conf"  # a sentinel rewrites its config: a file of its own
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 60000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n")
        self.process = start_sentinel(config, self._knows_the_replica,
                                      "the sentinel to find the replica", timeout=30.0)
        return self

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def _knows_the_replica(self) -> bool:
        try:
            replicas = self.sentinel().sentinel_slaves(SERVICE)
        except redis.RedisError:
            return False
        return any("s_down" not in r.get("flags", "") and r.get("master-link-status") == "ok"
                   for r in replicas)

    def primary(self) -> RedisServer:
        """The server Sentinel currently names as the primary."""
        _host, port = self.sentinel().sentinel_get_master_addr_by_name(SERVICE)
        return next(server for server in self.servers if server.port == int(port))

    def failover(self, *, coordinated: bool) -> None:
        """Promote the replica while clients write.

        ``coordinated``: what Redis's own ``FAILOVER`` command does, through Sentinel: writes
        on the old primary are paused (``CLIENT PAUSE WRITE``) until the replica has every
        acknowledged write, and the old primary is made a replica before the pause ends, so
        that no acknowledged write is lost. Otherwise a plain ``SENTINEL FAILOVER``: clients
        keep writing to the old primary until Sentinel turns it into a replica, and those
        writes are lost (asynchronous replication).
        """
        old = self.primary()
        new = next(server for server in self.servers if server is not old)
        old_client, new_client = old.client(), new.client()
        # After a failover Sentinel learns about the new replica from its INFO (every 10 s).
        wait_until(self._knows_the_replica, "a replica Sentinel can promote")
        if coordinated:
            old_client.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
            offset = int(old_client.info("replication")["master_repl_offset"])
            wait_until(lambda: int(new_client.info("replication")["master_repl_offset"]) >= offset,
                       "the replica to catch up")
        try:
            while True:
                try:
                    self.sentinel().execute_command("SENTINEL", "FAILOVER", SERVICE)
                    break
                except redis.ResponseError as exc:  # INPROG, NOGOODSLAVE: not yet
                    if "INPROG" not in str(exc) and "NOGOODSLAVE" not in str(exc):
                        raise
                    time.sleep(0.2)
            wait_until(lambda: self.primary() is new, "Sentinel to switch to the new primary")
            wait_until(lambda: new_client.info("replication")["role"] == "master",
                       "the replica to be promoted")
            if coordinated:
                old_client.replicaof("127.0.0.1", new.port)
        finally:
            if coordinated:
                old_client.execute_command("CLIENT", "UNPAUSE")
        wait_until(lambda: old_client.info("replication").get("master_link_status") == "up",
                   "the old primary to replicate the new one", timeout=60)

    def close(self) -> None:
        super().close()  # the sentinel, the first primary, the sentinel's directory
        self.replica.close()


def primary_of(store: RedisServer | SentinelStore) -> RedisServer:
    return store.primary() if isinstance(store, SentinelStore) else store


def refuse_writes(server: RedisServer) -> None:
    """Make the server answer every write with NOREPLICAS (more replicas required than it
    has)."""
    client = server.client()
    replicas = int(client.info("replication").get("connected_slaves", 0))
    client.config_set("min-replicas-to-write", replicas + 1)


def accept_writes(server: RedisServer) -> None:
    server.client().config_set("min-replicas-to-write", 0)
