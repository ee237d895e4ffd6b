"""`IdempotentTask`: reserve at publish, claim at execution, cache the outcome.

Two places do the work, because Celery's signals cannot cancel anything (``Signal.send``
swallows receiver exceptions): ``apply_async`` deduplicates at publish, ``__call__`` (which the
tracer calls instead of ``run`` when it is overridden; its return value becomes the SUCCESS
result and is passed to callbacks) deduplicates at execution.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from celery import Task
from celery.backends.base import DisabledBackend
from celery.exceptions import Ignore, Reject, Retry
from celery.result import ResultBase
from celery.utils import uuid

from . import celery_compat, pool_check, signals
from .celery_compat import current_worker_task, dump_pydantic_arguments
from .config import (
    DEFAULT_LEASE,
    FINGERPRINT_HEADER,
    KEY_HEADER,
    PER_MESSAGE,
    PREFIX,
    IdempotencyConfig,
    check_names,
    resolve,
    task_options_of,
)
from .exceptions import (
    ArgumentsNotCanonical,
    CorruptRecord,
    IdempotencyError,
    IdempotencyKeyRequired,
    OwnershipLost,
    ResultNotStored,
    StoreMisconfigured,
    StoreUnavailable,
)
from .keys import (
    RecordRef,
    bind_arguments,
    derive_key,
    fingerprint,
    signature_of,
    validate_key,
)
from .leases import lease_keeper, new_owner_token
from .outcomes import decode_result, encode_error, encode_result, rebuild_error
from .result import IdempotentResult, accept_for, lookup
from .store import ClaimStatus, KeyStore, ReserveStatus, store_for_app
from .worker import IdempotentRequest

logger = logging.getLogger("celery_idempotency")

_CELERY_BUILTINS = "celery.app.builtins"  # the module of Celery's own tasks

STORE_ATTEMPT_HEADER = "idempotency_store_attempt"
# Options of a message that is part of a canvas: such a message is always published, and its
# duplicate short-circuits at execution, so that callbacks, chords and group results still fire.
# Present, even empty, is enough: the last step of a chain is sent with ``chain=[]``.
_CANVAS_OPTIONS = ("link", "link_error", "chain", "chord", "group_id")
# Pauses between outcome-write attempts while the store is unreachable: short, so that the
# write lands soon after the store is back, before a duplicate could take the expired lease
# over (the lease keeper renews it as soon as the store answers).
_WRITE_PAUSE_FIRST, _WRITE_PAUSE_MAX = 0.05, 1.0
_OUR_HEADERS = (KEY_HEADER, FINGERPRINT_HEADER, STORE_ATTEMPT_HEADER,
                *(PREFIX + name for name in PER_MESSAGE))
_UNSET: Any = object()
TIME_LIMIT_MARGIN = 5.0


@dataclass(frozen=True)
class KeyContext:
    """Everything needed to address one key: where it lives and what payload it stands for."""

    ref: RecordRef
    fingerprint: str
    config: IdempotencyConfig


def _message_options(source: Mapping[str, Any]) -> dict[str, Any]:
    return {PREFIX + name: source[PREFIX + name] for name in PER_MESSAGE
            if source.get(PREFIX + name) is not None}


class IdempotentTask(Task):  # type: ignore[misc]
    """Base class: ``@app.task(base=IdempotentTask)``. Runs once per idempotency key."""

    #: Main-process hooks: a dead pool child's or a revoked task's claim is given up at once.
    Request = IdempotentRequest

    if not celery_compat.PUSH_REQUEST_KEEPS_REQUEST:  # Celery 5.4
        def push_request(self, *args: Any, **kwargs: Any) -> None:
            # Task.__call__ (which our __call__ ends in) pushes a request holding only args and
            # kwargs: the task body would see no id, headers, retries or idempotency_fence,
            # and self.retry() would re-send under a new id. Keep the current request's
            # fields, as Celery >= 5.5 does.
            super().push_request(*args, **{**self.request.__dict__, **kwargs})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Fail at decoration time on a misspelt option, not silently at run time.
        check_names(list(task_options_of(cls)), f"option(s) of task class {cls.__name__!r}")

    @classmethod
    def on_bound(cls, app: Any) -> None:
        super().on_bound(app)
        # Its workers refuse a memory store split between pool processes (see pool_check).
        pool_check.register(app)

    # -- settings and store --------------------------------------------------------------------

    def idem_config(self) -> IdempotencyConfig:
        """This task's resolved settings (app setting, overridden by task options)."""
        cached: IdempotencyConfig | None = self.__dict__.get("_idem_config_cache")
        if cached is None:
            cached = resolve(self.app.conf, task_options_of(type(self)), task_name=self.name)
            if type(self).__module__ == _CELERY_BUILTINS:
                # With task_cls=IdempotentTask, Celery's own tasks (celery.backend_cleanup,
                # celery.chord_unlock, ...) get this class too. They are plumbing, not side
                # effects: a daily backend_cleanup would otherwise be deduplicated for the TTL.
                cached = dataclasses.replace(cached, enabled=False)
            self.__dict__["_idem_config_cache"] = cached
        return cached

    def idem_store(self, config: IdempotencyConfig | None = None) -> KeyStore:
        config = config or self.idem_config()
        return store_for_app(self.app, config.store_url, prefix=config.key_prefix,
                             timeout=config.store_timeout,
                             allow_evicting=config.allow_evicting_store)

    def key_context(self, args: Any, kwargs: Any, *, key: str | None,
                    message_options: Mapping[str, Any], fp: str | None = None) -> KeyContext:
        """Resolve the key (explicit or derived), its scope and the payload fingerprint."""
        config = self.idem_config().with_message_options(message_options)
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if key is not None:
            key = validate_key(key)
        elif config.require_key:
            raise IdempotencyKeyRequired(
                f"task {self.name!r} requires an explicit idempotency key "
                "(apply_async(..., idempotency_key=...) or the idempotency_key header)")
        if key is None or fp is None:
            # Not needed for a message we published: it carries its key and fingerprint.
            arguments = self._bind(args, kwargs)
            computed = fingerprint(arguments)
            if key is None:
                key = derive_key(arguments, fields=config.key_fields, func=config.key_func,
                                 args=args, kwargs=kwargs, fp=computed)
            if fp is None:
                fp = computed
        return KeyContext(RecordRef(config.scope or self.name, key), fp, config)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        signature = self.__dict__.get("_idem_signature", _UNSET)
        if signature is _UNSET:  # inspect.signature is slow: once per task
            signature = self.__dict__["_idem_signature"] = signature_of(self.run)
        misplaced = sorted(name for name in kwargs if name.startswith(PREFIX))
        if misplaced and (signature is None or not all(
                name in signature.parameters for name in misplaced)):
            raise ArgumentsNotCanonical(
                f"{misplaced} were passed as task arguments (e.g. to .delay()); pass them to "
                "apply_async(..., idempotency_key=...) or publish inside "
                "`with idempotency_key(...):`", key=kwargs.get(KEY_HEADER))
        try:
            return bind_arguments(signature, args, kwargs)
        except ArgumentsNotCanonical:
            if self.typing:
                # Celery's own check says it as Celery would (a TypeError either way).
                check_arguments = getattr(self, "__header__", None)
                if check_arguments is not None:
                    check_arguments(*args, **kwargs)
                raise
            # typing=False: Celery sends a call that does not fit unchecked, and it fails when
            # it runs; key it by the call as given, so that it fails the same way here.
            return bind_arguments(None, args, kwargs)

    def key_context_of_message(self, args: Any, kwargs: Any,
                               headers: Mapping[str, Any]) -> KeyContext:
        """The key context of a received message (its headers, else derived from arguments)."""
        return self.key_context(args, kwargs, key=headers.get(KEY_HEADER),
                                message_options=_message_options(headers),
                                fp=headers.get(FINGERPRINT_HEADER))

    def lease_ms(self, config: IdempotencyConfig) -> int:
        """``idempotency_lease``, else 60 s; a task with a shorter hard time limit is killed
        by then, so its lease need not (and, to free its key sooner, should not) outlast it."""
        if config.lease is not None:
            return int(config.lease * 1000)
        lease = DEFAULT_LEASE
        if self.time_limit and self.time_limit + TIME_LIMIT_MARGIN < lease:
            lease = self.time_limit + TIME_LIMIT_MARGIN
        return int(lease * 1000)

    def result_for_key(self, key: str, *, scope: str | None = None) -> IdempotentResult | None:
        """The handle of the task that owns ``key`` (e.g. in a result endpoint), or None."""
        config = self.idem_config()
        ref = RecordRef(scope or config.scope or self.name, validate_key(key))
        return lookup(self.app, self.idem_store(config), ref,
                      serializer=config.result_serializer, task_name=self.name,
                      replayable=config.cache_errors)

    # -- publish -------------------------------------------------------------------------------

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: Any = None, **options: Any) -> Any:
        idem_options = {name: options.pop(name) for name in list(options)
                        if name.startswith(PREFIX)}
        explicit_key = idem_options.pop(KEY_HEADER, None)
        check_names(list(idem_options), "apply_async option(s)")
        config = self.idem_config().with_message_options(idem_options)

        def publish(final_options: dict[str, Any], final_id: str | None) -> Any:
            return super(IdempotentTask, self).apply_async(
                args, kwargs, task_id=final_id, producer=producer, link=link,
                link_error=link_error, shadow=shadow, **final_options)

        if not config.enabled or self._is_republish_of_running(task_id):
            # A retry (self.retry, autoretry, our own wait) re-sends the running task's id
            # with its headers: it must always be published, never deduplicated.
            return publish(options, task_id)

        # Celery's own conversion first, so that the key is derived from what is sent.
        args, kwargs = dump_pydantic_arguments(self, args, kwargs, options)

        headers = dict(options.get("headers") or {})
        if explicit_key is None:
            explicit_key = headers.get(KEY_HEADER) or signals.current_idempotency_key()
        message_options = {**_message_options(headers), **_message_options(idem_options)}
        context = self.key_context(args, kwargs, key=explicit_key,
                                   message_options=message_options)
        # A caller that chose the task id (a frozen signature: its id may already be in a group
        # or chord result) must find an outcome under that id in Celery's result backend.
        holds_own_id = task_id is not None and self._has_result_backend()
        task_id = task_id or uuid()
        headers.update(message_options)
        headers[KEY_HEADER] = context.ref.key
        headers[FINGERPRINT_HEADER] = context.fingerprint
        options["headers"] = headers

        try:
            # Opening may fail like any call (a Cluster connects at once); an evicting store
            # is refused here (StoreMisconfigured, never bypassed by fail_open).
            store = self.idem_store(config)
            # The reservation must outlive the wait for a countdown/eta, and then the TTL.
            delay_ms = _retry_delay_ms(options.get("countdown") or options.get("eta"))
            reservation = store.reserve(
                context.ref, task_id=task_id, fingerprint=context.fingerprint,
                task_name=self.name, ttl_ms=context.config.ttl_ms + delay_ms,
                pending_ms=context.config.pending_ms + delay_ms)
        except StoreUnavailable:
            if not config.fail_open:
                raise
            logger.warning("idempotency store unreachable; publishing %s[%s] key=%r "
                           "UNPROTECTED (idempotency_on_store_error='fail_open')",
                           self.name, task_id, context.ref.key)
            return publish(options, task_id)

        if reservation.replaced_task_id:
            logger.warning("%s key=%r: task %s was reserved but never reached a worker within "
                           "idempotency_pending_timeout; its message is taken as lost and %s "
                           "is published instead", self.name, context.ref.key,
                           reservation.replaced_task_id, task_id)
        in_canvas = bool(link or link_error) or any(
            options.get(name) is not None for name in _CANVAS_OPTIONS)
        accept = accept_for(config.result_serializer)
        if reservation.status is ReserveStatus.DUPLICATE and not (in_canvas or holds_own_id):
            assert reservation.record is not None
            logger.info("duplicate publish of %s key=%r: not sent, original task %s (%s)",
                        self.name, context.ref.key, reservation.record.task_id,
                        reservation.record.state.value)
            signals.duplicate_published.send(
                sender=self, key=context.ref.key, scope=context.ref.scope, task_id=task_id,
                original_task_id=reservation.record.task_id)
            return IdempotentResult(reservation.record.task_id, store=store, ref=context.ref,
                                    accept=accept, duplicate=True, app=self.app,
                                    task_name=self.name, replayable=config.cache_errors)
        try:
            sent = publish(options, task_id)
        except BaseException:
            if reservation.status is ReserveStatus.RESERVED:
                # Compare-and-delete: only our own, still pending reservation goes.
                try:
                    store.unreserve(context.ref, task_id=task_id)
                except IdempotencyError as exc:  # the publish error is the one to raise
                    logger.error("publish of %s[%s] failed and its reservation of key %r could "
                                 "not be undone (%s); release it with the CLI", self.name,
                                 task_id, context.ref.key, exc)
            raise
        eager = sent if getattr(sent, "id", None) == task_id and self.app.conf.task_always_eager \
            else None
        handle = IdempotentResult(task_id, store=store, ref=context.ref, accept=accept,
                                  duplicate=reservation.status is ReserveStatus.DUPLICATE,
                                  app=self.app, task_name=self.name, eager=eager,
                                  replayable=config.cache_errors, published=True)
        # What Celery's send_task set on its own handle. That handle is kept alive with ours:
        # when it is collected, it unsubscribes from the task's result channel (redis backend).
        handle.ignored = bool(getattr(sent, "ignored", False))
        handle.parent = getattr(sent, "parent", None)
        handle.sent = sent
        return handle

    def _has_result_backend(self) -> bool:
        return not isinstance(self.backend, DisabledBackend)

    @staticmethod
    def _is_republish_of_running(task_id: str | None) -> bool:
        # Not self.request: a task bound lazily by another thread may not have one yet.
        current = current_worker_task()
        return bool(task_id and current is not None and current.request.id == task_id)

    # -- execute -------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        # None unless this execution holds the key (set below, once claimed).
        request.idempotency_fence = None
        config = self.idem_config()
        if request.called_directly or not config.enabled:
            return super().__call__(*args, **kwargs)
        # Custom headers are request attributes on a worker, and only in request.headers when
        # run eagerly by apply().
        headers = {**(request.headers or {}),
                   **{name: value for name in _OUR_HEADERS
                      if (value := getattr(request, name, None)) is not None}}
        context = self.key_context_of_message(args, kwargs, headers)
        ref = context.ref
        owner = new_owner_token()
        lease_ms = self.lease_ms(context.config)
        try:
            # In the try: a store refused as evicting (StoreMisconfigured) or unreachable at
            # open (a Cluster connects at once) is handled like a refused claim, not lost.
            store = self.idem_store(context.config)
            claim = store.claim(ref, task_id=request.id, owner=owner,
                                fingerprint=context.fingerprint, task_name=self.name,
                                lease_ms=lease_ms, ttl_ms=context.config.ttl_ms)
        except CorruptRecord as exc:
            # This key's record is damaged: it cannot be claimed until an operator deletes it,
            # and running the task unprotected could run it twice. Not run; the task fails
            # with the error naming the key (the caller's result shows it).
            logger.error("%s[%s] key=%r not run: %s", self.name, request.id, ref.key, exc)
            raise
        except (StoreUnavailable, StoreMisconfigured) as exc:
            misconfigured = isinstance(exc, StoreMisconfigured)
            if context.config.fail_open and not misconfigured:
                logger.warning("idempotency store unreachable; running %s[%s] key=%r "
                               "UNPROTECTED (idempotency_on_store_error='fail_open')",
                               self.name, request.id, ref.key)
                return super().__call__(*args, **kwargs)
            # Not run, and not lost: the message comes back with backoff until the claim
            # lands. A store that refuses for good (ACL, credentials) is an operator's to fix,
            # loudly; fail_open does not bypass it.
            attempt = int(headers.get(STORE_ATTEMPT_HEADER) or 0)
            delay = min(0.5 * 2 ** attempt, context.config.store_retry_max_delay)
            log = logger.error if misconfigured else logger.warning
            log("idempotency store %s; %s[%s] key=%r not run, tried again in %.1f s: %s",
                "misconfigured" if misconfigured else "unreachable", self.name, request.id,
                ref.key, delay, exc)
            raise self._republish_later(delay, {STORE_ATTEMPT_HEADER: attempt + 1}) from None

        if claim.status is ClaimStatus.BUSY:
            assert claim.record is not None
            try:
                remaining = ((claim.record.lease_expires_ms or 0) - store.now_ms()) / 1000
            except IdempotencyError:  # only a hint: never lose the message over it
                remaining = context.config.busy_retry_delay
            delay = max(0.05, min(context.config.busy_retry_delay, remaining))
            logger.info("%s[%s] key=%r is running as task %s; looking again in %.2f s",
                        self.name, request.id, ref.key, claim.record.task_id, delay)
            raise self._republish_later(delay, {})
        if claim.status is ClaimStatus.SUCCEEDED:
            assert claim.record is not None
            logger.info("%s[%s] key=%r already succeeded as task %s: replaying its result",
                        self.name, request.id, ref.key, claim.record.task_id)
            signals.outcome_replayed.send(sender=self, key=ref.key, scope=ref.scope,
                                          task_id=request.id, state="succeeded")
            try:
                return decode_result(claim.record, accept=accept_for(
                    context.config.result_serializer))
            except ResultNotStored:
                logger.warning("%s[%s] key=%r succeeded before without a cached result; "
                               "returning None", self.name, request.id, ref.key)
                return None
        if claim.status is ClaimStatus.FAILED:
            assert claim.record is not None
            logger.info("%s[%s] key=%r already failed as task %s: replaying its error",
                        self.name, request.id, ref.key, claim.record.task_id)
            signals.outcome_replayed.send(sender=self, key=ref.key, scope=ref.scope,
                                          task_id=request.id, state="failed")
            raise rebuild_error(claim.record, replayable=context.config.cache_errors)
        if claim.status is ClaimStatus.TAKEN_OVER:
            logger.warning("%s[%s] key=%r: the lease of task %s expired; taken over "
                           "(fence %d)", self.name, request.id, ref.key,
                           claim.previous_task_id, claim.fence)
            signals.lease_taken_over.send(sender=self, key=ref.key, scope=ref.scope,
                                          task_id=request.id, fence=claim.fence,
                                          previous_task_id=claim.previous_task_id)
        signals.key_claimed.send(sender=self, key=ref.key, scope=ref.scope, task_id=request.id,
                                 fence=claim.fence,
                                 took_over=claim.status is ClaimStatus.TAKEN_OVER)
        request.idempotency_fence = claim.fence
        held = lease_keeper.hold(store, ref, owner, lease_ms)
        try:
            return self._run_claimed(context, store, owner, args, kwargs)
        finally:
            lease_keeper.release(held)

    def _run_claimed(self, context: KeyContext, store: KeyStore, owner: str,
                     args: Any, kwargs: Any) -> Any:
        ref, config = context.ref, context.config
        task_id = self.request.id
        try:
            result = super().__call__(*args, **kwargs)
        except Retry as exc:
            # Celery published the retry: pending for it, with a deadline past its countdown.
            extra_ms = _retry_delay_ms(exc.when)
            self._write(ref, "release for retry",
                        lambda: store.release(ref, owner=owner, ttl_ms=config.ttl_ms + extra_ms,
                                              pending_ms=config.pending_ms + extra_ms),
                        config.store_write_timeout)
            self._released(ref, "retry")
            raise
        except Ignore:
            # The task chose to leave no outcome (e.g. self.replace()): free the key.
            self._write(ref, "discard", lambda: store.discard(ref, owner=owner),
                        config.store_write_timeout)
            self._released(ref, "ignore")
            raise
        except Reject as exc:
            # Reject(requeue=False), also what self.retry() raises when the retry could not be
            # published: the message is gone, so the key fails (retryable) and the next publish
            # runs the task; handles already given out see the error instead of waiting.
            self._give_up(context, store, owner, exc, requeue=bool(exc.requeue),
                          reason="reject", timeout=config.store_write_timeout)
            raise
        except Exception as exc:
            error = encode_error(exc, max_bytes=config.max_result_bytes)
            cacheable = isinstance(exc, config.cache_errors)
            self._write(ref, "record failure", lambda: store.fail(
                ref, owner=owner, error=error, retryable=not cacheable, ttl_ms=config.ttl_ms),
                config.store_write_timeout)
            raise
        except BaseException as exc:
            # Worker shutting down mid-task (SystemExit, KeyboardInterrupt): give the claim
            # back so that the redelivered message runs at once instead of waiting out the lease.
            # Shutting down: do not hold the worker up; the lease frees the key regardless.
            self._give_up(context, store, owner, exc, requeue=True, reason="shutdown",
                          timeout=1.0)
            raise
        # As Celery's backend stores it (Backend.prepare_value): a returned AsyncResult or
        # GroupResult as its id tuple.
        stored = result.as_tuple() if isinstance(result, ResultBase) \
            and config.result_serializer != "pickle" else result
        payload = encode_result(stored, serializer=config.result_serializer,
                                max_bytes=config.max_result_bytes, key=ref.key, task_id=task_id)
        self._write(ref, "record success",
                    lambda: store.complete(ref, owner=owner, result=payload, ttl_ms=config.ttl_ms),
                    config.store_write_timeout)
        return result

    def _write(self, ref: RecordRef, what: str, action: Callable[[], Any],
               timeout: float) -> None:
        """An owner-checked outcome write, never forced over a new owner.

        While the store is unreachable it is retried for up to ``timeout`` seconds
        (``idempotency_store_write_timeout``): the message is acknowledged once the task
        returns, so this write is the only thing that will ever record the outcome. The
        task's own outcome goes to Celery either way."""
        deadline = time.monotonic() + timeout
        pause = _WRITE_PAUSE_FIRST
        while True:
            try:
                action()
                return
            except OwnershipLost as exc:
                logger.error("%s[%s]: did not %s: %s", self.name, self.request.id, what, exc)
                signals.ownership_lost.send(sender=self, key=ref.key, scope=ref.scope,
                                            task_id=self.request.id, action=what)
                return
            except (StoreMisconfigured, CorruptRecord) as exc:
                # Retrying cannot help: say so at once instead of for store_write_timeout.
                logger.error("%s[%s] key=%r: could not %s: %s; the claim stays until its lease "
                             "expires", self.name, self.request.id, ref.key, what, exc)
                return
            except StoreUnavailable as exc:
                if time.monotonic() + pause > deadline:
                    logger.error("%s[%s] key=%r: could not %s, store unreachable for %.0f s "
                                 "(%s); the claim stays until its lease expires", self.name,
                                 self.request.id, ref.key, what, timeout, exc)
                    return
                if pause == _WRITE_PAUSE_FIRST:
                    logger.warning("%s[%s] key=%r: store unreachable, trying to %s for up to "
                                   "%.0f s (%s)", self.name, self.request.id, ref.key, what,
                                   timeout, exc)
                time.sleep(pause)
                pause = min(pause * 2, _WRITE_PAUSE_MAX)

    def _give_up(self, context: KeyContext, store: KeyStore, owner: str, exc: BaseException,
                 *, requeue: bool, reason: str, timeout: float) -> None:
        """The task ends without an outcome of its own. If its message goes back to the
        broker (only under acks_late: otherwise it was acknowledged before the task ran), the
        key is ``pending`` with a deadline for the redelivery; if the message is gone, it is
        ``failed`` (retryable), so that the next publish runs the task."""
        ref, config = context.ref, context.config
        if requeue and self.acks_late and not self.request.is_eager:
            self._write(ref, "release", lambda: store.release(
                ref, owner=owner, pending_ms=config.pending_ms), timeout)
            self._released(ref, reason)
            return
        error = encode_error(exc, max_bytes=config.max_result_bytes)
        self._write(ref, "record failure", lambda: store.fail(
            ref, owner=owner, error=error, retryable=True, ttl_ms=config.ttl_ms), timeout)
        self._released(ref, reason)

    def _released(self, ref: RecordRef, reason: str) -> None:
        signals.claim_released.send(sender=self, key=ref.key, scope=ref.scope,
                                    task_id=self.request.id, reason=reason)

    def _republish_later(self, countdown: float, extra_headers: Mapping[str, Any]) -> Retry:
        """Re-send this very message later, without spending the user's retry budget.

        ``self.retry`` would count against ``max_retries`` (and its ``max_retries=None`` means
        the task default, not unlimited): waiting for another owner is not a failure.
        """
        request = self.request
        if request.is_eager:
            # Eager apply() re-runs a Retry's signature at once: wait here instead.
            time.sleep(countdown)
        signature = self.signature_from_request(request, countdown=countdown,
                                                retries=request.retries)
        if extra_headers:
            signature.options["headers"] = {**(signature.options.get("headers") or {}),
                                            **extra_headers}
        if not request.is_eager:
            try:
                signature.apply_async()
            except Exception as exc:
                # Celery's own retry drops the message here (Reject(requeue=False)); requeue
                # it instead, so that nothing is lost while the broker recovers.
                raise Reject(exc, requeue=True) from exc
        return Retry(f"idempotency: looking again in {countdown:.2f} s", when=countdown,
                     is_eager=request.is_eager, sig=signature)


def _retry_delay_ms(when: Any) -> int:
    """How far ahead a Retry's countdown or eta lies, in ms (so the record's TTL covers it)."""
    if isinstance(when, (int, float)):
        return int(max(0.0, float(when)) * 1000)
    if isinstance(when, str):  # an eta given as an ISO 8601 string
        try:
            when = datetime.fromisoformat(when)
        except ValueError:
            return 0
    if isinstance(when, datetime):
        moment = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        return int(max(0.0, (moment - datetime.now(timezone.utc)).total_seconds()) * 1000)
    return 0
