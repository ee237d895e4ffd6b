"""The classification of store errors for the replies a local redis-server cannot produce
(Cluster's CLUSTERDOWN and TRYAGAIN, Redis 6's wording of errors inside scripts): each reply is
parsed by redis-py's own parser, as it would be off the wire."""

from __future__ import annotations

import pytest
import redis
from redis._parsers.base import BaseParser

from celery_idempotency import CorruptRecord, StoreMisconfigured, StoreUnavailable
from celery_idempotency.store.errors import Fault, classify, error_code, store_error


def parsed(reply: str) -> redis.RedisError:
    """The exception redis-py raises for the error reply ``-<reply>``."""
    error = BaseParser.parse_error(reply)
    assert isinstance(error, redis.RedisError)
    return error


NOT_NOW = [
    "CLUSTERDOWN The cluster is down",
    "CLUSTERDOWN Hash slot not served",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "LOADING Redis is loading the dataset in memory",
    "READONLY You can't write against a read only replica.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "NOREPLICAS Not enough good replicas to write.",
    "NOTENOUGHREPLICAS Not enough good replicas to write.",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
    "NOSCRIPT No matching script. Please use EVAL.",
    # Redis 7: an error met by redis.call inside a script keeps its code
    "NOREPLICAS Not enough good replicas to write. script: 04c8, on @user_script:42.",
    # Redis 6 wrapped it
    "ERR Error running script (call to f_04c8): @user_script:42: -READONLY You can't write "
    "against a read only replica.",
    "ERR Error running script (call to f_04c8): @user_script:9: @user_script: 9: -OOM command "
    "not allowed when used memory > 'maxmemory'. ",
    "ERR max number of clients reached",
]


@pytest.mark.parametrize("reply", NOT_NOW)
def test_not_now_replies_are_store_unavailable(reply: str) -> None:
    error = store_error(parsed(reply), key="k", store_key="t:{x}", prefix="t:")
    assert isinstance(error, StoreUnavailable), error
    assert error.key == "k"


def test_the_code_redis_py_strips_is_put_back_in_the_message() -> None:
    exc = parsed("READONLY You can't write against a read only replica.")
    assert str(exc) == "You can't write against a read only replica."  # redis-py's doing
    assert error_code(exc) == "READONLY"
    assert "READONLY You can't write" in str(store_error(exc, key=None, store_key=None,
                                                         prefix="t:"))


def test_connection_errors_and_timeouts_are_unreachable() -> None:
    for exc in (redis.ConnectionError("Error 111 connecting"), redis.TimeoutError("Timeout")):
        error = store_error(exc, key=None, store_key=None, prefix="t:")
        assert isinstance(error, StoreUnavailable) and "unreachable" in str(error)


@pytest.mark.parametrize("reply, hint", [
    ("NOPERM this user has no permissions to run the 'evalsha' command", "~t:*"),
    ("NOAUTH Authentication required.", "password"),
    ("WRONGPASS invalid username-password pair or user is disabled.", "password"),
    ("ERR unknown command 'EVALSHA', with args beginning with: ", "EVALSHA and Lua"),
    ("ERR Error compiling script (new function): user_script:1: '=' expected near 'is'",
     "Lua scripting"),
    ("ERR something nobody has seen before", "retrying cannot help"),
])
def test_never_replies_are_misconfigured_with_what_to_change(reply: str, hint: str) -> None:
    error = store_error(parsed(reply), key="k", store_key="t:{x}", prefix="t:")
    assert isinstance(error, StoreMisconfigured), error
    assert hint in str(error)


@pytest.mark.parametrize("reply", [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "WRONGTYPE Operation against a key holding the wrong kind of value script: 04c8, on "
    "@user_script:30.",
    "ERR Error running script (call to f_04c8): @user_script:30: -WRONGTYPE Operation against "
    "a key holding the wrong kind of value",
])
def test_wrongtype_is_corrupt_record_naming_the_redis_key(reply: str) -> None:
    error = store_error(parsed(reply), key="k", store_key="t:{x}", prefix="t:")
    assert isinstance(error, CorruptRecord) and error.key == "t:{x}"


def test_a_script_runtime_error_is_told_apart() -> None:
    for reply in ("ERR user_script:58: attempt to compare number with nil script: 04c8, on "
                  "@user_script:58.",
                  "ERR Error running script (call to f_04c8): @user_script:58: user_script:58: "
                  "attempt to compare number with nil"):
        exc = parsed(reply)
        assert classify(exc) is Fault.SCRIPT_RUNTIME
        assert isinstance(store_error(exc, key="k", store_key="t:{x}", prefix="t:"),
                          CorruptRecord)
        # Without a record (a store-wide call), it is no record's fault.
        assert isinstance(store_error(exc, key=None, store_key=None, prefix="t:"),
                          StoreMisconfigured)


def test_cluster_exceptions_raised_by_redis_py_itself_are_transient() -> None:
    from redis.exceptions import ClusterDownError, MasterDownError, SlotNotCoveredError
    for exc in (ClusterDownError("The cluster is down"), MasterDownError("link down"),
                SlotNotCoveredError("slot 12 not covered")):
        assert classify(exc) is Fault.TRANSIENT
