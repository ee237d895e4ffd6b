"""Settings: ``idempotency_*`` read from ``app.conf``, overridden per task and per message.

Resolution order, most specific first: message header -> task option -> app setting -> default.
Only a few settings make sense per message (``PER_MESSAGE``); the rest are per task or per app.
Unknown ``idempotency_*`` names are an error wherever they appear, because a misspelt
``idempotency_tll=60`` silently meaning "7 days" is exactly the bug this library exists to stop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from celery.exceptions import TaskPredicate
from celery.utils.imports import symbol_by_name

from .exceptions import ConfigurationError
from .keys import KeyFunc
from .redact import redact_url

PREFIX = "idempotency_"
SEVEN_DAYS = 7 * 24 * 3600
DEFAULT_LEASE = 60.0  # idempotency_lease when unset (a task's hard time limit may shorten it)
TIME_LIMIT_MARGIN = 5.0  # a default lease outlasts a task's hard time limit by this much
FAIL_CLOSED = "fail_closed"
FAIL_OPEN = "fail_open"

# Per-message options: accepted by apply_async(idempotency_...=) and read from message headers.
PER_MESSAGE = ("scope", "ttl")
# The key itself is not a setting, but shares the prefix and travels in a header.
KEY_HEADER = "idempotency_key"
FINGERPRINT_HEADER = "idempotency_fp"


@dataclasses.dataclass(frozen=True)
class IdempotencyConfig:
    """Resolved settings for one task (and, with headers, one message)."""

    # Each field is a setting: ``idempotency_<field>`` in ``app.conf``, as a task option
    # (``@app.task(base=IdempotentTask, idempotency_ttl=3600)`` or a class attribute), and for
    # ``PER_MESSAGE`` ones per message. This class is the one list of them (`SETTING_NAMES`).

    #: Where keys live: ``redis://...`` (also sentinel, cluster, unix) or ``memory://``
    #: (tests). Required: there is no fallback to the broker.
    store_url: str
    #: Seconds a key's record (and its cached outcome) is kept. Also per message.
    ttl: float = SEVEN_DAYS
    #: Seconds a claim is held without renewal before another worker may take it over.
    #: None: `DEFAULT_LEASE`, or less for a task with a shorter hard time limit (`lease_ms`).
    lease: float | None = None
    #: Prefix of every key the store writes.
    key_prefix: str = "idem:"
    #: When the store is unreachable: ``fail_closed`` (wait for it) or ``fail_open`` (run
    #: unprotected).
    on_store_error: str = FAIL_CLOSED
    #: False: the task is not deduplicated at all (Celery's own tasks are never).
    enabled: bool = True
    #: The key's namespace; default: the task name. Also per message.
    scope: str | None = None
    #: The arguments a derived key is made of (default: all of them).
    key_fields: tuple[str, ...] | None = None
    #: A function of the task's arguments that returns its key.
    key_func: KeyFunc | None = None
    #: Refuse to publish or run a message without an explicit key.
    require_key: bool = False
    #: Exception classes cached as the outcome (replayed); other errors leave the key
    #: retryable.
    cache_errors: tuple[type[BaseException], ...] = ()
    #: Serializer of cached results.
    result_serializer: str = "json"
    #: Largest cached result or error, in bytes.
    max_result_bytes: int = 512 * 1024
    #: First pause, in seconds, before a duplicate looks again at a key another worker runs;
    #: doubled at each further look, and never past the owner's lease left.
    busy_retry_delay: float = 1.0
    #: Longest pause, in seconds, before a message refused by the store is tried again.
    store_retry_max_delay: float = 60.0
    #: Seconds one store call may take.
    store_timeout: float = 2.0
    #: Seconds an outcome write is retried while the store is unreachable.
    store_write_timeout: float = 300.0
    #: Seconds a published message may take to reach a worker before its reservation is
    #: taken as lost.
    pending_timeout: float = 600.0
    #: Accept a store whose maxmemory-policy may evict records (they all have a TTL): an
    #: evicted record is a task that runs again (store/eviction.py).
    allow_evicting_store: bool = False

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    @property
    def pending_ms(self) -> int:
        return int(self.pending_timeout * 1000)

    def lease_ms(self, time_limit: float | None) -> int:
        """``idempotency_lease``, else `DEFAULT_LEASE`; a task with a shorter hard
        ``time_limit`` is killed by then, so its lease need not (and, to free its key sooner,
        should not) outlast it."""
        if self.lease is not None:
            return int(self.lease * 1000)
        lease = DEFAULT_LEASE
        if time_limit and time_limit + TIME_LIMIT_MARGIN < lease:
            lease = time_limit + TIME_LIMIT_MARGIN
        return int(lease * 1000)

    @property
    def fail_open(self) -> bool:
        return self.on_store_error == FAIL_OPEN

    def with_message_options(self, options: Mapping[str, Any]) -> IdempotencyConfig:
        """Apply per-message overrides (``scope``, ``ttl``) given as ``idempotency_*`` names."""
        if not options:  # the common case, on every publish and execution
            return self
        changes: dict[str, Any] = {}
        for name, value in options.items():
            short = name[len(PREFIX):] if name.startswith(PREFIX) else name
            if short not in PER_MESSAGE:
                raise ConfigurationError(
                    f"{PREFIX}{short} cannot be set per message; per-message options are "
                    f"{[PREFIX + n for n in PER_MESSAGE]}")
            if value is not None:
                changes[short] = _validate(short, value)
        if not changes:
            return self
        changed = dataclasses.replace(self, **changes)
        check_consistent(changed, "per-message idempotency_ttl")
        return changed


def check_consistent(config: IdempotencyConfig, where: str) -> None:
    """Refuse settings under which a record would be forgotten while its work is in flight.

    The record of a running task must outlive its lease, and a reservation its pending
    deadline (the store lengthens the TTL to cover both whatever is set, but a TTL shorter
    than either contradicts what the user asked for). A countdown/eta is added to the TTL at
    publish, so it needs no setting. ``store_write_timeout`` is not compared: the lease keeper
    renews the lease (and the TTL with it) while an outcome write waits for the store.
    """
    lease = config.lease if config.lease is not None else DEFAULT_LEASE
    lease_text = f"{PREFIX}lease ({lease:g} s)" if config.lease is not None else \
        f"the default lease ({lease:g} s; {PREFIX}lease sets it)"
    if config.ttl < lease:
        raise ConfigurationError(
            f"{PREFIX}ttl ({config.ttl:g} s, {where}) is shorter than {lease_text}: a running "
            f"task's record must outlive its lease; raise the TTL or shorten the lease")
    if config.ttl < config.pending_timeout:
        raise ConfigurationError(
            f"{PREFIX}ttl ({config.ttl:g} s, {where}) is shorter than "
            f"{PREFIX}pending_timeout ({config.pending_timeout:g} s): a reservation must "
            f"outlive the time its message may take to reach a worker; raise the TTL or "
            f"lower {PREFIX}pending_timeout")


SETTING_NAMES = frozenset(field.name for field in dataclasses.fields(IdempotencyConfig))


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{PREFIX}{name} must be a positive number of seconds, "
                                 f"got {value!r}")
    return float(value)


def _exception_class(name: str, value: Any) -> type[BaseException]:
    resolved = symbol_by_name(value) if isinstance(value, str) else value
    if not (isinstance(resolved, type) and issubclass(resolved, BaseException)):
        raise ConfigurationError(f"{PREFIX}{name} must list exception classes, got {value!r}")
    if not issubclass(resolved, Exception) or issubclass(resolved, TaskPredicate):
        # Listing these would do nothing: a task that raises them gives its claim back
        # (Retry/Ignore/Reject steer the message; the others mean the worker is stopping).
        raise ConfigurationError(
            f"{PREFIX}{name} lists {resolved.__module__}.{resolved.__qualname__}, which is "
            "never cached as an outcome (a control-flow exception); list Exception subclasses")
    return resolved


def _validate(name: str, value: Any) -> Any:
    if name == "store_url":
        if not isinstance(value, str) or "://" not in value:
            raise ConfigurationError(
                f"{PREFIX}store_url must be a URL such as redis://127.0.0.1:6379/1 or "
                f"memory://, got {redact_url(value) if isinstance(value, str) else value!r}")
        return value
    if name in ("ttl", "lease", "busy_retry_delay", "store_retry_max_delay", "store_timeout",
                "store_write_timeout", "pending_timeout"):
        return _positive_number(name, value)
    if name in ("key_prefix", "scope", "result_serializer"):
        if not isinstance(value, str) or not value or "{" in value or "}" in value:
            raise ConfigurationError(
                f"{PREFIX}{name} must be a non-empty string without braces, got {value!r}")
        return value
    if name == "on_store_error":
        if value not in (FAIL_CLOSED, FAIL_OPEN):
            raise ConfigurationError(
                f"{PREFIX}on_store_error must be {FAIL_CLOSED!r} or {FAIL_OPEN!r}, got {value!r}")
        return value
    if name in ("enabled", "require_key", "allow_evicting_store"):
        if not isinstance(value, bool):
            raise ConfigurationError(f"{PREFIX}{name} must be True or False, got {value!r}")
        return value
    if name == "key_fields":
        if isinstance(value, str) or not isinstance(value, Sequence) or not value or not all(
                isinstance(item, str) and item for item in value):
            raise ConfigurationError(
                f"{PREFIX}key_fields must be a non-empty sequence of parameter names, "
                f"got {value!r}")
        return tuple(value)
    if name == "key_func":
        resolved = symbol_by_name(value) if isinstance(value, str) else value
        if not callable(resolved):
            raise ConfigurationError(f"{PREFIX}key_func must be callable, got {value!r}")
        return resolved
    if name == "cache_errors":
        items = (value,) if isinstance(value, (str, type)) else tuple(value)
        return tuple(_exception_class(name, item) for item in items)
    if name == "max_result_bytes":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigurationError(
                f"{PREFIX}max_result_bytes must be a positive integer, got {value!r}")
        return value
    raise ConfigurationError(  # pragma: no cover - guarded by reject_unknown_names
        f"unknown setting {PREFIX}{name}")


def reject_unknown_names(names: Sequence[str], where: str) -> None:
    """Raise `ConfigurationError` for any ``idempotency_*`` name that is not a setting."""
    if not names:
        return
    unknown = sorted(n for n in names if n.startswith(PREFIX)
                     and n[len(PREFIX):] not in SETTING_NAMES)
    if unknown:
        raise ConfigurationError(
            f"unknown {where} {unknown!r}; known settings are "
            f"{sorted(PREFIX + n for n in SETTING_NAMES)}")


def resolve(app_conf: Mapping[str, Any], task_options: Mapping[str, Any],
            *, task_name: str = "?", namespace: str | None = None) -> IdempotencyConfig:
    """Build the config for one task: task option -> app setting -> default, validated.

    ``namespace`` is the app's ``config_from_object(..., namespace=...)`` (``app.namespace``):
    Celery then reads ``CELERY_IDEMPOTENCY_TTL`` as ``idempotency_ttl``, so a misspelt
    ``CELERY_IDEMPOTENCY_*`` name is checked like a misspelt ``idempotency_*`` one."""
    app_names = [name for name in app_conf if isinstance(name, str) and name.startswith(PREFIX)]
    if namespace:
        spelled = f"{namespace}_{PREFIX}".upper()
        app_names += [name[len(namespace) + 1:].lower() for name in app_conf
                      if isinstance(name, str) and name.upper().startswith(spelled)]
    reject_unknown_names(app_names, "app setting(s)")
    reject_unknown_names(list(task_options), f"option(s) of task {task_name!r}")
    values: dict[str, Any] = {}
    for short in SETTING_NAMES:
        name = PREFIX + short
        if name in task_options:
            value = task_options[name]
        elif name in app_conf:
            value = app_conf[name]
        else:
            continue
        if value is None and short != "store_url":
            continue
        values[short] = _validate(short, value)
    if values.get("store_url") is None:
        raise ConfigurationError(
            f"task {task_name!r} needs {PREFIX}store_url (e.g. app.conf.idempotency_store_url = "
            "'redis://127.0.0.1:6379/1', or 'memory://' for tests); there is no fallback to "
            "the broker, so that keys never land somewhere nobody meant")
    config = IdempotencyConfig(**values)
    check_consistent(config, f"task {task_name!r}")
    return config


def task_options_of(cls: type) -> dict[str, Any]:
    """The ``idempotency_*`` attributes set on a task class or its user-defined bases.

    Read from the class dicts, not with getattr: a function given as ``idempotency_key_func``
    would otherwise come back as a bound method of the task.
    """
    options: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if name.startswith(PREFIX):
                options[name] = value.__func__ if isinstance(value, staticmethod) else value
    return options
