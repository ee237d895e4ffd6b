"""One classification of what a Redis store call raised, used by every store path.

Redis answers some commands with an *error reply* instead of a result. Three kinds matter here:

transient ("not now")
    ``READONLY`` (the endpoint is a replica, e.g. after a failover), ``OOM`` (``maxmemory`` with
    ``noeviction``), ``MISCONF`` (a failed background save stops writes), ``LOADING``, ``BUSY``
    (another script runs too long), ``NOREPLICAS`` (``min-replicas-to-write``),
    ``MASTERDOWN``, ``CLUSTERDOWN``, ``TRYAGAIN``, and every connection error or timeout. The
    same call will succeed later: `StoreUnavailable`, exactly like an unreachable store.
misconfigured ("never, until someone changes the setup")
    ``NOPERM`` (ACL), a wrong or missing password, an unknown command, a script the server
    cannot compile: `StoreMisconfigured`, with what to change.
corrupt ("this record")
    ``WRONGTYPE`` (another type under a record's name), or a script that failed at run time on
    a record's fields (a hand-edited lease ``l`` = "abc": "attempt to compare number with nil"):
    `CorruptRecord` naming the Redis key.

The error is classified after it happens, from the reply itself: no command on the happy path.
Redis 7 passes the code of an error met by ``redis.call`` inside a script through unchanged
("NOREPLICAS Not enough good replicas to write. script: <sha>, on @user_script:42."); Redis 6
wrapped it ("ERR Error running script ...: @user_script:42: -NOREPLICAS ..."); both are read.
redis-py strips the code from the message of the replies it maps to a class of its own
(``ReadOnlyError``, ``OutOfMemoryError``, ``NoPermissionError``, ``BusyLoadingError``...) and
keeps it in ``status_code``; that is read too.
"""

from __future__ import annotations

import enum
import re

import redis
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterError,
    RedisClusterException,
)

from ..exceptions import CorruptRecord, IdempotencyError, StoreMisconfigured, StoreUnavailable

TRANSIENT_CODES = frozenset({
    "READONLY", "OOM", "MISCONF", "LOADING", "BUSY", "NOREPLICAS", "NOTENOUGHREPLICAS",
    "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
    # A script flushed between redis-py's SCRIPT LOAD and EVALSHA: the next call loads it again.
    "NOSCRIPT",
})
CORRUPT_CODES = frozenset({"WRONGTYPE"})
AUTH_CODES = frozenset({"NOAUTH", "WRONGPASS"})

# What the library runs, for the message of a NOPERM (keep in step with store/redis.py and lua/).
REQUIRED_COMMANDS = ("EVALSHA", "SCRIPT LOAD", "HGETALL", "HMGET", "HGET", "HSET", "HDEL", "DEL",
                     "EXISTS", "PEXPIRE", "PTTL", "TIME", "SCAN", "PING")
# Optional: waking waiters (store/wakeups.py), with the channels ``&<prefix>*``. Without them
# every write still works (the scripts publish through redis.pcall) and waiters poll instead.
# INFO tells a Redis 6 (plain channels) from a 7 (shard channels); denied, 7 is assumed.
WAKEUP_COMMANDS = ("SPUBLISH", "PUBLISH", "SSUBSCRIBE", "SUBSCRIBE", "SUNSUBSCRIBE",
                   "UNSUBSCRIBE", "INFO")

_CODE = re.compile(r"[A-Z][A-Z_]+")
# Redis 6 wraps an error met inside a script: "... @user_script:12: -WRONGTYPE Operation ...",
# sometimes twice ("@user_script:9: @user_script: 9: -OOM command not allowed ...").
_WRAPPED_CODE = re.compile(r"user_script: ?\d+: -?([A-Z][A-Z_]+) ")
# A script that failed at run time (Lua error, not a Redis error reply): "user_script:58: ..."
_SCRIPT_RUNTIME = re.compile(r"user_script:\d+: ")


class Fault(enum.Enum):
    TRANSIENT = "transient"
    MISCONFIGURED = "misconfigured"
    CORRUPT = "corrupt"  # the reply names a record problem (WRONGTYPE)
    SCRIPT_RUNTIME = "script runtime"  # a script failed on a record's fields (or our own bug)


def reply_text(exc: BaseException) -> str:
    """The error as Redis sent it: redis-py drops the code of the replies it maps to a class."""
    text = str(exc)
    code = getattr(exc, "status_code", None)
    if code and code != "ERR" and not text.startswith(code):
        return f"{code} {text}"
    return text


def error_code(exc: BaseException) -> str | None:
    """The reply's error code (``READONLY``...), also when a script met it; None if none."""
    text = reply_text(exc)
    wrapped = _WRAPPED_CODE.findall(text)
    if wrapped:
        return str(wrapped[-1])
    first = text.split(" ", 1)[0]
    if _CODE.fullmatch(first):
        return first
    code = getattr(exc, "status_code", None)
    return code if isinstance(code, str) else None


def classify(exc: BaseException) -> Fault:
    """What a failed store call means (see the module docstring)."""
    if isinstance(exc, (AuthenticationError, AuthorizationError)):
        # Subclasses of ConnectionError in redis-py, but a wrong password does not heal.
        return Fault.MISCONFIGURED
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ClusterError,
                        RedisClusterException)):
        return Fault.TRANSIENT  # includes BusyLoadingError (LOADING) and MasterDownError
    code = error_code(exc)
    if code in TRANSIENT_CODES:
        return Fault.TRANSIENT
    if code in CORRUPT_CODES:
        return Fault.CORRUPT
    if code in AUTH_CODES or code == "NOPERM":
        return Fault.MISCONFIGURED
    text = reply_text(exc)
    if "Error compiling script" not in text and _SCRIPT_RUNTIME.search(text):
        return Fault.SCRIPT_RUNTIME
    # Anything else (unknown command, a script that does not compile, an error we do not
    # know): retrying the same call cannot help.
    return Fault.MISCONFIGURED


def store_error(exc: BaseException, *, key: str | None, store_key: str | None,
                prefix: str) -> IdempotencyError:
    """The library's exception for a failed store call on ``store_key`` (None: no record)."""
    fault = classify(exc)
    text = reply_text(exc)
    if fault is Fault.TRANSIENT:
        what = "unreachable" if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) \
            and not isinstance(exc, redis.exceptions.BusyLoadingError) else "unavailable"
        return StoreUnavailable(f"idempotency store {what}: {text}", key=key)
    if fault in (Fault.CORRUPT, Fault.SCRIPT_RUNTIME) and store_key is not None:
        return corrupt_record(store_key, text)
    return StoreMisconfigured(misconfigured_message(exc, text, prefix), key=key)


def script_failed(store_key: str, text: str) -> CorruptRecord:
    """A script failed on a record that decodes: a field the decoder does not check."""
    return CorruptRecord(
        f"a store script failed on record {store_key!r} ({text}); if nothing else writes "
        "under the key prefix, report this as a bug of celery-idempotency; inspect the record "
        "(redis-cli HGETALL) and delete it (DEL) or let it expire", key=store_key)


def corrupt_record(store_key: str, text: str) -> CorruptRecord:
    return CorruptRecord(
        f"record {store_key!r} cannot be used ({text}); it was written or edited by something "
        "other than this library: inspect it (redis-cli TYPE / HGETALL) and delete it (DEL) "
        "or let it expire", key=store_key)


def misconfigured_message(exc: BaseException, text: str, prefix: str) -> str:
    code = error_code(exc)
    if isinstance(exc, (AuthenticationError, AuthorizationError)) or code in AUTH_CODES:
        return (f"the idempotency store refused the credentials ({text}); check the user name "
                "and password in idempotency_store_url")
    if code == "NOPERM":
        return (f"the idempotency store's ACL refuses a command ({text}); the Redis user needs "
                f"the keys ~{prefix}* and the commands {', '.join(REQUIRED_COMMANDS)}")
    if "unknown command" in text:
        return (f"the idempotency store does not support a command the library needs ({text}); "
                "it needs a Redis server (or a compatible one) with EVALSHA and Lua scripting")
    if "Error compiling script" in text:
        return (f"the idempotency store cannot compile the library's Lua scripts ({text}); it "
                "needs a Redis server (or a compatible one) with Lua scripting")
    return f"the idempotency store refused the command ({text}); retrying cannot help"


__all__ = ["Fault", "classify", "corrupt_record", "error_code", "reply_text", "script_failed",
           "store_error"]
