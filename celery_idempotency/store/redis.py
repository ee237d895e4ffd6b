"""`RedisKeyStore`: every transition is one Lua script, run with EVALSHA (redis-py's
``register_script``, which reloads the script after a NOSCRIPT, e.g. after a Redis restart).

Each script touches exactly one key, whose whole name is a hash tag, so it works unchanged on
Redis Cluster (a task's recorded steps are fields of that same hash). Replies carry the
status and the record in one round trip.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisClusterException

from ..exceptions import CorruptRecord, IdempotencyError
from ..keys import RecordRef
from ..records import (
    ALL_FIELDS,
    F_CONTENT_ENCODING,
    F_CONTENT_TYPE,
    F_OWNER,
    F_RESULT,
    F_RESULT_STATUS,
    F_STATE,
    F_TASK_ID,
    KeyState,
    Record,
    decode_record,
    fields_from_flat,
    result_meta_fields,
    state_code,
    step_field,
)
from .base import (
    Claim,
    ClaimStatus,
    Entry,
    KeyStore,
    ParkedDuplicate,
    Reservation,
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    ResultPayload,
    foreign_entry,
    make_entry,
    mismatch_error,
    ownership_lost_error,
    step_ownership_lost_error,
    unchanged_conditions,
)
from .connect import redis_client
from .errors import Fault, classify, corrupt_record, reply_text, script_failed, store_error
from .wakeups import PollingWatch, RedisWaker, Watch, wake_channel

# Each script's ARGV, in order: the one place the Python side spells it (the store and the
# benchmarks build their arguments with `script_args`). Each script names the same values at
# its top (tests/store/test_lua_contract.py checks both agree). discard takes field/value pairs.
SCRIPT_ARGS: dict[str, tuple[str, ...]] = {
    "reserve": ("task_id", "fingerprint", "key", "scope", "task_name", "ttl_ms", "pending_ms"),
    "claim": ("task_id", "owner", "fingerprint", "key", "scope", "task_name", "lease_ms",
              "ttl_ms", "park", "unpark"),
    "complete": ("owner", "fence", "result", "content_type", "content_encoding",
                 "result_status", "ttl_ms"),
    "fail": ("owner", "error", "retryable", "ttl_ms"),
    "requeue": ("owner", "ttl_ms", "pending_ms"),
    "renew": ("owner", "lease_ms"),
    "abandon": ("task_id", "owner_prefix", "to_state", "error", "ttl_ms", "pending_ms"),
    "begin_step": ("owner", "fence", "field", "lease_ms"),
    "save_step": ("owner", "fence", "field", "value"),
}
_SCRIPTS = (*SCRIPT_ARGS, "discard")
# Every failure of a call to Redis; store/errors.py says what each one means.
_REDIS_ERRORS = (redis.RedisError, RedisClusterException)

T = TypeVar("T")


def script_args(script: str, **values: Any) -> list[Any]:
    """``values`` as ``script``'s ARGV, in its order."""
    names = SCRIPT_ARGS[script]
    if len(values) != len(names):
        raise TypeError(f"{script}.lua takes {', '.join(names)}; got {', '.join(values)}")
    return [values[name] for name in names]


def complete_args(*, owner: str, fence: int, result: ResultPayload, ttl_ms: int) -> list[Any]:
    """complete.lua's ARGV for ``result``: a default content type, encoding or status is passed
    as '' and left out of the record (absent means default: records.py)."""
    meta = result_meta_fields(result.content_type, result.content_encoding, result.status)
    return script_args("complete", owner=owner, fence=str(fence), result=result.data,
                       content_type=meta.get(F_CONTENT_TYPE, ""),
                       content_encoding=meta.get(F_CONTENT_ENCODING, ""),
                       result_status=meta.get(F_RESULT_STATUS, ""), ttl_ms=ttl_ms)


def _load_script(name: str) -> str:
    lua = importlib.resources.files(__package__).joinpath("lua")
    return lua.joinpath("_common.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else _text(value).encode("utf-8")


def _ttl(pttl: Any) -> int | None:
    """PTTL's reply as a TTL: -1 means no expiry (-2, gone, does not reach here)."""
    return int(pttl) if isinstance(pttl, int) and pttl >= 0 else None


# What a listing reads of a record: everything but the cached result.
_LISTED_FIELDS = tuple(field for field in ALL_FIELDS if field != F_RESULT)


def _fields(reply: Any) -> dict[str, bytes]:
    return {_text(k): v if isinstance(v, bytes) else _text(v).encode() for k, v in reply.items()}


class RedisKeyStore(KeyStore):
    """Records as Redis hashes; TTLs and lease clocks kept by Redis itself."""

    def __init__(self, client: redis.Redis | RedisCluster, *, prefix: str = "idem:") -> None:
        self.client = client
        self.prefix = prefix
        self._scripts: dict[str, Script] = {
            name: client.register_script(_load_script(name)) for name in _SCRIPTS}
        # Waiters' wake-ups: one subscriber connection for the store. Not on a Cluster (a
        # shard channel lives on its slot's node: one connection per node, not done yet).
        self._waker = None if isinstance(client, RedisCluster) else RedisWaker(client)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "idem:", timeout: float = 2.0) -> RedisKeyStore:
        """A store on a single server, a Sentinel-managed master or a Cluster (see connect)."""
        return cls(redis_client(url, timeout=timeout), prefix=prefix)

    def store_key(self, ref: RecordRef) -> str:
        return ref.store_key(self.prefix)

    def _call(self, ref: RecordRef | None, action: Callable[..., T], *args: Any) -> T:
        """Run one call; a failure becomes `StoreUnavailable` (transient: connection errors
        and "not now" replies), `StoreMisconfigured` or `CorruptRecord` (see errors.py)."""
        try:
            return action(*args)
        except _REDIS_ERRORS as exc:
            raise self._error(exc, ref) from exc

    def _error(self, exc: BaseException, ref: RecordRef | None) -> Exception:
        store_key = self.store_key(ref) if ref is not None else None
        error = store_error(exc, key=ref.key if ref else None, store_key=store_key,
                            prefix=self.prefix)
        if ref is not None and classify(exc) is Fault.SCRIPT_RUNTIME:
            # A script failed on the record's fields (a hand-edited lease, say): name the
            # field if the record does not decode. Only after an error: no cost otherwise.
            try:
                self.get(ref)
            except CorruptRecord as precise:
                return precise
            except Exception:  # the first error is the one to report
                return error
            return script_failed(store_key or "", reply_text(exc))
        return error

    def _run(self, name: str, ref: RecordRef, args: Sequence[Any]) -> Any:
        script = self._scripts[name]
        return self._call(ref, lambda: script(keys=[self.store_key(ref)], args=list(args)))

    def _record(self, ref: RecordRef, flat: Sequence[Any]) -> Record | None:
        return decode_record(self.store_key(ref), fields_from_flat(flat))

    def reserve(self, ref: RecordRef, *, task_id: str, fingerprint: str, task_name: str,
                ttl_ms: int, pending_ms: int = 600_000) -> Reservation:
        reply = self._run("reserve", ref, script_args(
            "reserve", task_id=task_id, fingerprint=fingerprint, key=ref.key, scope=ref.scope,
            task_name=task_name, ttl_ms=ttl_ms, pending_ms=pending_ms))
        return self._reservation(ref, reply)

    def _reservation(self, ref: RecordRef, reply: Sequence[Any]) -> Reservation:
        """reserve.lua's reply as a `Reservation` (`IdempotencyKeyMismatch` for 'mismatch')."""
        status = _text(reply[0])
        if status == "reserved":
            return Reservation(ReserveStatus.RESERVED,
                               replaced_task_id=_text(reply[1]) if len(reply) > 1 else None)
        record = self._record(ref, reply[1:])
        if status == "mismatch":
            raise mismatch_error(ref, record)
        return Reservation(ReserveStatus(status), record)

    def reserve_many(self, requests: Sequence[ReserveRequest]) -> list[ReserveOutcome]:
        replies = self._run_many("reserve", [(request.ref, script_args(
            "reserve", task_id=request.task_id, fingerprint=request.fingerprint,
            key=request.ref.key, scope=request.ref.scope, task_name=request.task_name,
            ttl_ms=request.ttl_ms, pending_ms=request.pending_ms)) for request in requests])
        outcomes: list[ReserveOutcome] = []
        for request, reply in zip(requests, replies, strict=True):
            try:
                if isinstance(reply, Exception):
                    raise self._error(reply, request.ref) from reply
                outcomes.append(self._reservation(request.ref, reply))
            except IdempotencyError as exc:  # this request's answer, as reserve would raise it
                outcomes.append(exc)
        return outcomes

    def unreserve_many(self, reservations: Sequence[tuple[RecordRef, str]]) -> list[bool]:
        conditions = [(ref, [F_TASK_ID, task_id, F_STATE, state_code(KeyState.PENDING)])
                      for ref, task_id in reservations]
        replies = self._run_many("discard", conditions)
        for (ref, _), reply in zip(reservations, replies, strict=True):
            if isinstance(reply, Exception):
                raise self._error(reply, ref) from reply
        return [bool(reply) for reply in replies]

    def _run_many(self, name: str, calls: Sequence[tuple[RecordRef, Sequence[Any]]]) -> list[Any]:
        """Run script ``name`` once per ``(ref, args)`` in one pipelined round trip (not a
        transaction: each script is atomic for its one key). Replies in order; an error reply
        is its call's (an exception in its place), a failure to reach the store raises.

        EVALSHA is sent as is: redis-py's own pipelined scripts would first ask SCRIPT EXISTS, a
        second round trip per batch. Calls answered NOSCRIPT (the server lost its scripts: a
        restart, SCRIPT FLUSH) did not run; they are sent once more after loading the script.
        On a Cluster the pipeline splits the calls by node (each key is one hash tag) and
        follows MOVED/ASK redirections."""
        script = self._scripts[name]
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for index in todo:
                ref, args = calls[index]
                # execute_command, not pipe.evalsha: a Cluster pipeline refuses the latter by
                # name, although it routes EVALSHA by its key like any keyed command.
                pipe.execute_command("EVALSHA", script.sha, 1, self.store_key(ref), *args)
            answers = self._call(None, pipe.execute, False) if todo else []
            missing = []
            for index, answer in zip(todo, answers, strict=True):
                if attempt == 0 and isinstance(answer, NoScriptError):
                    missing.append(index)
                else:
                    replies[index] = answer
            if not missing:
                break
            self._call(None, self.client.script_load, script.script)
            todo = missing
        return replies

    def _discard_if(self, ref: RecordRef, conditions: Mapping[str, str]) -> bool:
        args = [item for pair in conditions.items() for item in pair]
        return bool(self._run("discard", ref, args))

    def unreserve(self, ref: RecordRef, *, task_id: str) -> bool:
        return self._discard_if(ref, {F_TASK_ID: task_id, F_STATE: state_code(KeyState.PENDING)})

    def claim(self, ref: RecordRef, *, task_id: str, owner: str, fingerprint: str,
              task_name: str, lease_ms: int, ttl_ms: int, park: bytes | None = None,
              unpark: bool = False) -> Claim:
        reply = self._run("claim", ref, script_args(
            "claim", task_id=task_id, owner=owner, fingerprint=fingerprint, key=ref.key,
            scope=ref.scope, task_name=task_name, lease_ms=lease_ms, ttl_ms=ttl_ms,
            park=park or "", unpark="1" if unpark else ""))
        status = _text(reply[0])
        if status == "handled":
            return Claim(ClaimStatus.HANDLED)
        if status in ("claimed", "taken_over"):
            previous = _text(reply[2]) if len(reply) > 2 else None
            return Claim(ClaimStatus(status), fence=int(reply[1]),
                         previous_task_id=previous or None)
        if status in ("busy", "parked"):  # {status, lease_remaining_ms, <record fields>...}
            return Claim(ClaimStatus.BUSY, record=self._record(ref, reply[2:]),
                         lease_remaining_ms=int(reply[1]), parked=status == "parked")
        record = self._record(ref, reply[1:])
        if status == "mismatch":
            raise mismatch_error(ref, record)
        return Claim(ClaimStatus(status), record=record)

    def complete(self, ref: RecordRef, *, owner: str, fence: int, result: ResultPayload,
                 ttl_ms: int) -> list[ParkedDuplicate]:
        reply = self._run("complete", ref, complete_args(owner=owner, fence=fence, result=result,
                                                         ttl_ms=ttl_ms))
        return self._check_owner(ref, owner, reply, "complete")

    def fail(self, ref: RecordRef, *, owner: str, error: str, retryable: bool,
             ttl_ms: int) -> list[ParkedDuplicate]:
        reply = self._run("fail", ref, script_args(
            "fail", owner=owner, error=error, retryable="1" if retryable else "0", ttl_ms=ttl_ms))
        return self._check_owner(ref, owner, reply, "fail")

    def _check_owner(self, ref: RecordRef, owner: str, reply: Sequence[Any],
                     action: str) -> list[ParkedDuplicate]:
        """``{'ok', <parked duplicates>...}``: the parked duplicates; else `OwnershipLost`."""
        if _text(reply[0]) != "ok":
            raise ownership_lost_error(ref, owner, self._record(ref, reply[1:]), action)
        return [ParkedDuplicate(_text(reply[index]), _bytes(reply[index + 1]))
                for index in range(1, len(reply) - 1, 2)]

    def requeue(self, ref: RecordRef, *, owner: str, pending_ms: int,
                ttl_ms: int | None = None) -> bool:
        return bool(self._run("requeue", ref, script_args(
            "requeue", owner=owner, ttl_ms="" if ttl_ms is None else ttl_ms,
            pending_ms=pending_ms)))

    def renew(self, ref: RecordRef, *, owner: str, lease_ms: int) -> bool:
        return bool(self._run("renew", ref, script_args("renew", owner=owner,
                                                        lease_ms=lease_ms)))

    def discard(self, ref: RecordRef, *, owner: str) -> bool:
        return self._discard_if(ref, {F_OWNER: owner, F_STATE: state_code(KeyState.STARTED)})

    def abandon(self, ref: RecordRef, *, task_id: str, owner_prefix: str, requeued: bool,
                error: str, ttl_ms: int, pending_ms: int) -> bool:
        to_state = KeyState.PENDING if requeued else KeyState.FAILED
        return bool(self._run("abandon", ref, script_args(
            "abandon", task_id=task_id, owner_prefix=owner_prefix, to_state=state_code(to_state),
            error=error, ttl_ms=ttl_ms, pending_ms=pending_ms)))

    def begin_step(self, ref: RecordRef, *, owner: str, fence: int, name: str,
                   lease_ms: int) -> bytes | None:
        reply = self._run("begin_step", ref, script_args(
            "begin_step", owner=owner, fence=str(fence), field=step_field(name),
            lease_ms=lease_ms))
        if _text(reply[0]) != "ok":
            raise step_ownership_lost_error(ref, owner, fence, self._record(ref, reply[1:]), name)
        value = reply[1] if len(reply) > 1 else None
        return value if value is None or isinstance(value, bytes) else _text(value).encode()

    def save_step(self, ref: RecordRef, *, owner: str, fence: int, name: str,
                  value: bytes) -> None:
        reply = self._run("save_step", ref, script_args(
            "save_step", owner=owner, fence=str(fence), field=step_field(name), value=value))
        if _text(reply[0]) != "ok":
            raise step_ownership_lost_error(ref, owner, fence, self._record(ref, reply[1:]), name,
                                            saving=True)

    def delete_if_unchanged(self, record: Record) -> bool:
        return self._discard_if(RecordRef(record.scope, record.key), unchanged_conditions(record))

    def get(self, ref: RecordRef) -> Record | None:
        name = self.store_key(ref)
        fields = self._call(ref, self.client.hgetall, name)
        return decode_record(name, _fields(fields))

    def now_ms(self) -> int:
        seconds, micros = self._call(None, self.client.time)
        return int(seconds) * 1000 + int(micros) // 1000

    def _scan_pattern(self) -> str:
        # The prefix is ours (validated: no braces), but escape glob characters all the same.
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return escaped + "{*}"

    def _servers(self) -> list[Any]:
        """Clients to SCAN: the server, or each primary of a Cluster (a cursor is per node)."""
        if isinstance(self.client, RedisCluster):
            primaries = self._call(None, self.client.get_primaries)
            return [self.client.get_redis_connection(node) for node in primaries]
        return [self.client]

    def entries(self, *, batch: int = 1000, with_result: bool = True) -> Iterator[Entry]:
        for server in self._servers():
            cursor: int = 0
            while True:
                cursor, names = self._call(None, server.scan, cursor, self._scan_pattern(),
                                           batch)
                readable = []
                for name in names:
                    try:
                        readable.append(name.decode("utf-8") if isinstance(name, bytes)
                                        else str(name))
                    except UnicodeDecodeError:  # never one of ours: ours are UTF-8
                        shown = name.decode("utf-8", "backslashreplace")
                        yield Entry(shown, None, CorruptRecord(
                            f"key '{shown}' under the prefix is not UTF-8 (bytes that are "
                            "not shown as text are written \\xNN)", key=shown), None)
                if readable:
                    yield from self._read_entries(readable, with_result, server)
                if int(cursor) == 0:
                    break

    def _read_entries(self, names: Sequence[str], with_result: bool, server: Any = None,
                      ref: RecordRef | None = None) -> Iterator[Entry]:
        """Fields and TTLs of a batch of records in one round trip (pipelined, not atomic)."""
        pipe = (server or self.client).pipeline(transaction=False)
        for name in names:
            if with_result:
                pipe.hgetall(name)
            else:
                pipe.hmget(name, _LISTED_FIELDS)
            pipe.pttl(name)
        replies = self._call(ref, pipe.execute, False)  # raise_on_error=False
        for index, name in enumerate(names):
            reply, ttl = replies[2 * index], replies[2 * index + 1]
            for failed in (reply, ttl):
                # Only a record problem (WRONGTYPE: not a hash) is this entry's; a transient
                # or permanent store error is the whole listing's.
                if isinstance(failed, Exception) and classify(failed) is not Fault.CORRUPT:
                    raise self._error(failed, ref) from failed
            if isinstance(reply, Exception):  # WRONGTYPE: not a hash, so not ours
                yield Entry(name, None, corrupt_record(name, str(reply)), None, foreign=True)
                continue
            if with_result:
                fields = _fields(reply)
            else:
                fields = {field: value for field, value in zip(_LISTED_FIELDS, reply, strict=True)
                          if value is not None}
            entry = make_entry(name, fields, _ttl(ttl))
            if entry is None and ttl != -2:  # -2: expired between SCAN and reading it
                # It exists, but HMGET found none of our fields: a hash of someone else's.
                entry = foreign_entry(name, _ttl(ttl), "a hash without its fields")
            if entry is not None:
                yield entry

    def entry(self, ref: RecordRef) -> Entry | None:
        return next(self._read_entries([self.store_key(ref)], True, ref=ref), None)

    def memory_usage(self, store_keys: Sequence[str]) -> list[int | None]:
        pipe = self.client.pipeline(transaction=False)
        for name in store_keys:
            pipe.memory_usage(name, samples=0)
        replies = self._call(None, pipe.execute, False)
        for reply in replies:
            # A refusal for good (e.g. an ACL without MEMORY) reads as unknown; "not now" does
            # not: the caller learns that the store is unavailable.
            if isinstance(reply, Exception) and classify(reply) is Fault.TRANSIENT:
                raise self._error(reply, None) from reply
        return [reply if isinstance(reply, int) else None for reply in replies]

    def ping(self) -> None:
        self._call(None, self.client.ping)

    def watch(self, ref: RecordRef) -> Watch:
        if self._waker is None:
            return PollingWatch()
        return self._waker.watch(wake_channel(self.store_key(ref)))

    def close(self) -> None:
        if self._waker is not None:
            self._waker.close()
        self.client.close()

