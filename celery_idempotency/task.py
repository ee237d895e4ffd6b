"""`IdempotentTask`: Celery's adapter to the idempotency protocol (`protocol`).

Two places hook into Celery, because its signals cannot cancel anything (``Signal.send``
swallows receiver exceptions): ``apply_async`` deduplicates at publish (`protocol.publish`),
``__call__`` (which the tracer calls instead of ``run`` when it is overridden; its return value
becomes the SUCCESS result and is passed to callbacks) deduplicates at execution
(`protocol.Execution`). What is Celery's own stays here: its control-flow exceptions
(Retry/Ignore/Reject), re-publishing a message, result handles, key derivation from a task's
signature.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

from celery import Signature, Task
from celery.backends.base import DisabledBackend
from celery.exceptions import Ignore, Reject, Retry
from celery.result import EagerResult, ResultBase
from celery.utils import uuid
from kombu.utils import json as kombu_json

from . import celery_compat, group_batch, pool_check, signals
from .batch import BatchCall, publish_many
from .celery_compat import current_worker_task, dump_pydantic_arguments
from .config import (
    FINGERPRINT_HEADER,
    KEY_HEADER,
    PER_MESSAGE,
    PREFIX,
    IdempotencyConfig,
    reject_unknown_names,
    resolve,
    task_options_of,
)
from .exceptions import (
    ArgumentsNotCanonical,
    BulkPublishError,
    ConfigurationError,
    IdempotencyError,
    IdempotencyKeyRequired,
)
from .keys import (
    Binder,
    RecordRef,
    arguments_digest,
    bind_arguments,
    derive_key,
    fingerprint_of,
    signature_of,
    validate_key,
)
from .protocol import (
    BUSY_ATTEMPT_HEADER,
    PARKED_HEADER,
    STORE_ATTEMPT_HEADER,
    Execution,
    KeyTarget,
    NoOutcome,
    Publication,
    publish,
)
from .result import IdempotentResult, accept_for, lookup
from .steps import Steps
from .store import KeyStore, ParkedDuplicate, store_for_app
from .store.eviction import eviction_guard
from .worker import IdempotentRequest

__all__ = ["STORE_ATTEMPT_HEADER", "IdempotentTask", "KeyTarget"]

_CELERY_BUILTINS = "celery.app.builtins"  # the module of Celery's own tasks

# Options of a message that is part of a canvas: such a message is always published, and its
# duplicate short-circuits at execution, so that callbacks, chords and group results still fire.
# Present, even empty, is enough: the last step of a chain is sent with ``chain=[]``.
_CANVAS_OPTIONS = frozenset(("link", "link_error", "chain", "chord", "group_id"))
_OUR_HEADERS = (KEY_HEADER, FINGERPRINT_HEADER, STORE_ATTEMPT_HEADER, BUSY_ATTEMPT_HEADER,
                PARKED_HEADER,
                *(PREFIX + name for name in PER_MESSAGE))
_UNSET: Any = object()
# Options of a message that its parked copy does not keep (`_CeleryExecution.park_data`): its id
# is the record field's name, and the copy is due at once.
_NOT_PARKED = ("task_id", "countdown", "eta", "redelivered")

# The steps of the task run in progress in this thread (or greenlet), with its task: set
# around the task body, so that `IdempotentTask.step` finds its own run's, never another's.
# Either the steps, or what makes them on first use (most tasks take no step).
_current_steps: ContextVar[tuple[Any, Steps | Callable[[], Steps]] | None] = ContextVar(
    "celery_idempotency_steps", default=None)


def _call_with_steps(task: Any, steps: Steps | Callable[[], Steps], call: Callable[..., Any],
                     args: Any, kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` with ``steps`` as the task's current run (not a
    generator-based context manager: this is on every task's path)."""
    token = _current_steps.set((task, steps))
    try:
        return call(*args, **kwargs)
    finally:
        _current_steps.reset(token)


def _message_options(source: Mapping[str, Any]) -> dict[str, Any]:
    return {PREFIX + name: source[PREFIX + name] for name in PER_MESSAGE
            if source.get(PREFIX + name) is not None}


class IdempotentTask(Task):  # type: ignore[misc]
    """Base class: ``@app.task(base=IdempotentTask)``. Runs once per idempotency key.

    Its options are the ``idempotency_*`` settings (`config.IdempotencyConfig` lists them
    with their meaning), given as task options or class attributes, and resolved like
    Celery's own (task option, else app setting, else default)."""

    #: Main-process hooks: a dead pool child's or a revoked task's claim is given up at once.
    Request = IdempotentRequest

    #: This task's resolved settings, once read; cleared by ``bind`` (as Celery clears
    #: ``_exec_options``) and by `reset_idem_config`.
    _idem_config: IdempotencyConfig | None = None
    #: (``_idem_config``, its store), once the store's eviction check passed (`idem_store`).
    _idem_store_kept: tuple[IdempotencyConfig, KeyStore] | None = None

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
        reject_unknown_names(list(task_options_of(cls)),
                             f"option(s) of task class {cls.__name__!r}")

    @classmethod
    def on_bound(cls, app: Any) -> None:
        super().on_bound(app)
        # Its workers refuse a memory store split between pool processes (see pool_check).
        pool_check.register(app)

    @classmethod
    def bind(cls, app: Any) -> Any:
        cls.reset_idem_config()
        return super().bind(app)

    # -- settings and store --------------------------------------------------------------------

    def idem_config(self) -> IdempotencyConfig:
        """This task's resolved settings (app setting, overridden by task options)."""
        cached: IdempotencyConfig | None = type(self).__dict__.get("_idem_config")
        if cached is None:
            cached = resolve(self.app.conf, task_options_of(type(self)), task_name=self.name,
                             namespace=getattr(self.app, "namespace", None))
            if type(self).__module__ == _CELERY_BUILTINS:
                # With task_cls=IdempotentTask, Celery's own tasks (celery.backend_cleanup,
                # celery.chord_unlock, ...) get this class too. They are plumbing, not side
                # effects: a daily backend_cleanup would otherwise be deduplicated for the TTL.
                cached = dataclasses.replace(cached, enabled=False)
            type(self)._idem_config = cached
        return cached

    @classmethod
    def reset_idem_config(cls) -> None:
        """Forget the resolved settings: the next use reads ``app.conf`` again (after it
        changed, e.g. a test pointing the app at another store)."""
        cls._idem_config = None
        cls._idem_store_kept = None

    def idem_store(self, config: IdempotencyConfig | None = None) -> KeyStore:
        config = config or self.idem_config()
        # Every publish and execution asks: the store of the task's own settings is kept on
        # the class once its eviction check passed (`store_for_app` takes a lock and checks
        # again on each call). A message's own scope/ttl make another config: the long way.
        kept = type(self).__dict__.get("_idem_store_kept")
        if kept is not None and kept[0] is config:
            store: KeyStore = kept[1]
            return store
        store = store_for_app(self.app, config.store_url, prefix=config.key_prefix,
                              timeout=config.store_timeout,
                              allow_evicting=config.allow_evicting_store)
        own = config is type(self).__dict__.get("_idem_config")
        if own and eviction_guard.passed(store, allow_evicting=config.allow_evicting_store):
            type(self)._idem_store_kept = (config, store)
        return store

    def key_target(self, args: Any, kwargs: Any, *, key: str | None,
                   message_options: Mapping[str, Any], fp: str | None = None) -> KeyTarget:
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
            computed = arguments_digest(arguments)
            if key is None:
                key = derive_key(arguments, fields=config.key_fields, func=config.key_func,
                                 args=args, kwargs=kwargs, full_digest=computed)
            if fp is None:
                fp = fingerprint_of(computed)
        return KeyTarget(RecordRef(config.scope or self.name, key), fp, config)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        binder: Binder | None = self.__dict__.get("_idem_binder")
        if binder is None:  # inspect.signature is slow: once per task
            binder = self.__dict__["_idem_binder"] = Binder(signature_of(self.run))
        signature = binder.signature
        misplaced = sorted(name for name in kwargs if name.startswith(PREFIX)) if kwargs \
            else None
        if misplaced and (signature is None or not all(
                name in signature.parameters for name in misplaced)):
            raise ArgumentsNotCanonical(
                f"{misplaced} were passed as task arguments (e.g. to .delay()); pass them to "
                "apply_async(..., idempotency_key=...) or publish inside "
                "`with idempotency_key(...):`", key=kwargs.get(KEY_HEADER))
        try:
            return binder.bind(args, kwargs)
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

    def key_target_of_message(self, args: Any, kwargs: Any,
                              headers: Mapping[str, Any]) -> KeyTarget:
        """The key target of a received message (its headers, else derived from arguments)."""
        return self.key_target(args, kwargs, key=headers.get(KEY_HEADER),
                               message_options=_message_options(headers),
                               fp=headers.get(FINGERPRINT_HEADER))

    def result_for_key(self, key: str, *, scope: str | None = None) -> IdempotentResult | None:
        """The handle of the task that owns ``key`` (e.g. in a result endpoint), or None."""
        config = self.idem_config()
        ref = RecordRef(scope or config.scope or self.name, validate_key(key))
        return lookup(self.app, self.idem_store(config), ref,
                      serializer=config.result_serializer, task_name=self.name,
                      replayable=config.cache_errors)

    # -- steps (recovery points) ----------------------------------------------------------------

    def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` as the recovery point ``name`` of this run, recording
        its return value under the task's key; when the key already recorded ``name`` (an
        earlier attempt got that far), return the recorded value without calling ``fn``.

        Each step first checks that this run still holds the key (renewing its lease) and
        raises `OwnershipLost` if another worker took it over. A step whose ``fn`` raises
        records nothing. Outside a claimed run (called directly, idempotency disabled, run
        unprotected under fail_open) it just calls ``fn``. See `celery_idempotency.steps`."""
        return self._current_steps().run(name, fn, args, kwargs)

    def step_key(self, name: str) -> str:
        """A stable idempotency key for what step ``name`` sends to another API (Stripe's
        ``Idempotency-Key``, ...): the same on every attempt of this task's key, different for
        every other scope, key and step name. A UUID string (36 characters)."""
        return self._current_steps().key(name)

    def _current_steps(self) -> Steps:
        current = _current_steps.get()
        if current is not None and current[0] is self:
            steps = current[1]
            return steps if isinstance(steps, Steps) else steps()
        # Not inside this task's run (e.g. called from outside a task): no claim, no key.
        return Steps.unclaimed(ref=None, task_name=self.name, task_id=None, sender=self)

    # -- publish -------------------------------------------------------------------------------

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: Any = None, **options: Any) -> Any:
        call = self._prepare_call(args, kwargs, task_id=task_id, producer=producer, link=link,
                                  link_error=link_error, shadow=shadow, options=options)
        if call.target is None:
            return call.send()
        if group_batch.collect(self, call):  # a member of an IdempotentGroup: sent with it
            return None  # (Celery's group keeps the member's frozen result)
        # Never a local of this frame: see `protocol.publish`, on handles kept too long.
        return self._handle_of(publish(
            call.target, sender=self, task_name=self.name, task_id=call.task_id,
            open_store=self.idem_store, delay_ms=call.delay_ms, deduplicate=call.deduplicate,
            send=call.send), call.target, call.task_id)

    def _prepare_call(self, args: Any, kwargs: Any, *, task_id: str | None, producer: Any,
                      link: Any, link_error: Any, shadow: Any,
                      options: dict[str, Any]) -> BatchCall:
        """One publish, validated and keyed, ready to send (`BatchCall`: ``target`` None when
        it is sent unprotected). Raises for bad input before anything is reserved or sent."""
        idem_options = {name: options.pop(name) for name in list(options)
                        if name.startswith(PREFIX)}
        explicit_key = idem_options.pop(KEY_HEADER, None)
        reject_unknown_names(list(idem_options), "apply_async option(s)")
        # Validated before anything is sent, even for a task that is not deduplicated.
        self.idem_config().with_message_options(idem_options)

        def send(final_options: dict[str, Any], final_id: str | None) -> Any:
            return super(IdempotentTask, self).apply_async(
                args, kwargs, task_id=final_id, producer=producer, link=link,
                link_error=link_error, shadow=shadow, **final_options)

        if not self.idem_config().enabled or self._is_republish_of_running(task_id):
            # A retry (self.retry, autoretry, our own wait) re-sends the running task's id
            # with its headers: it must always be published, never deduplicated.
            return BatchCall(None, task_id or "", lambda: send(options, task_id))

        # Celery's own conversion first, so that the key is derived from what is sent.
        args, kwargs = dump_pydantic_arguments(self, args, kwargs, options)
        headers = dict(options.get("headers") or {})
        if explicit_key is None:
            explicit_key = headers.get(KEY_HEADER) or signals.current_idempotency_key()
        message_options = {**_message_options(headers), **_message_options(idem_options)}
        target = self.key_target(args, kwargs, key=explicit_key, message_options=message_options)
        # A caller that chose the task id (a frozen signature: its id may already be in a group
        # or chord result) must find an outcome under that id in Celery's result backend.
        holds_own_id = task_id is not None and self._has_result_backend()
        final_id = task_id or uuid()
        options["headers"] = {**headers, **message_options, KEY_HEADER: target.ref.key,
                              FINGERPRINT_HEADER: target.fingerprint}
        present = options.keys() & _CANVAS_OPTIONS  # mostly none: no generator to run
        in_canvas = bool(link or link_error) or (bool(present) and any(
            options[name] is not None for name in present))
        return BatchCall(target, final_id, lambda: send(options, final_id),
                         delay_ms=_retry_delay_ms(options.get("countdown") or options.get("eta")),
                         deduplicate=not (in_canvas or holds_own_id))

    def apply_many(self, calls: Iterable[Any], *, producer: Any = None,
                   return_exceptions: bool = False, batch_size: int = 1000,
                   **options: Any) -> list[Any]:
        """Publish many calls of this task, reserving their keys ``batch_size`` at a time in one
        store round trip (instead of one per call), and sending them on one producer.

        ``calls``: each is a signature of this task (``task.s(42)``, with its options:
        ``task.s(42).set(idempotency_key="order-42", countdown=5)``) or an ``(args, kwargs)``
        pair. ``options`` are ``apply_async`` options for every call; a signature's own
        options win. Returns one handle per call, in order, as ``apply_async`` would return
        it: a duplicate (of an earlier publish, or of an earlier call in ``calls``) is not sent
        and gets the original's handle (``.duplicate`` set).

        Errors: a call that cannot be published at all (not a call of this task, a bad key,
        arguments without a canonical form, a missing required key, an unknown option) raises
        before anything is reserved or sent. An error met at the store or broker (a key reused
        with other arguments, a corrupt record, the broker failing) is that call's own: the
        other calls are published all the same, then `BulkPublishError` is raised with every
        call's handle or error, or, with ``return_exceptions=True``, the error takes the
        call's place in the returned list. A failed send stops the batch: the calls after it
        are not sent and answer with the same error. Without any store (unreachable, not
        ``fail_open``) nothing is sent and `StoreUnavailable` is raised, as by ``apply_async``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"apply_many batch_size must be a positive integer, "
                                     f"not {batch_size!r}")
        results: list[Any] = []
        with self.app.producer_or_acquire(producer) as shared_producer:
            prepared = [self._prepare_one_of_many(index, call, shared_producer, options)
                        for index, call in enumerate(calls)]
            for start in range(0, len(prepared), batch_size):
                chunk = prepared[start:start + batch_size]
                try:
                    batch = publish_many(chunk, sender=self, task_name=self.name,
                                         config=self.idem_config(), open_store=self.idem_store)
                except IdempotencyError as exc:  # no store for this chunk: none of it is sent
                    if not results:
                        raise  # nothing sent at all: as apply_async raises it
                    results.extend(exc for _ in prepared[start:])
                    break
                for call, outcome in zip(chunk, batch.outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        results.append(outcome)
                    elif call.target is None:
                        results.append(outcome.sent)
                    else:
                        results.append(self._handle_of(outcome, call.target, call.task_id))
                if batch.stopped_by is not None:
                    # A send failed: the later chunks are not sent either.
                    results.extend(batch.stopped_by for _ in prepared[start + batch_size:])
                    break
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors and not return_exceptions:
            raise BulkPublishError(
                f"{len(errors)} of {len(results)} call(s) of {self.name} were not published "
                "(the others were): see .errors", results) from errors[0]
        return results

    def _prepare_one_of_many(self, index: int, call: Any, producer: Any,
                             options: Mapping[str, Any]) -> BatchCall:
        """Call ``index`` of `apply_many`, ready to send; errors say which call it was."""
        try:
            if isinstance(call, Signature):
                if call.get("subtask_type") or call.task != self.name:
                    raise TypeError(f"apply_many of {self.name} takes signatures of that task "
                                    f"only, not {call!r}")
                args, kwargs = call.args, call.kwargs
                call_options = {**options, **call.options}
            elif isinstance(call, (tuple, list)) and len(call) == 2 \
                    and isinstance(call[0], (tuple, list)) and isinstance(call[1], Mapping):
                args, kwargs = call
                call_options = dict(options)
            else:
                raise TypeError(f"apply_many takes signatures of {self.name} or (args, kwargs) "
                                f"pairs, not {call!r}")
            special = {name: call_options.pop(name, None)
                       for name in ("task_id", "link", "link_error", "shadow")}
            return self._prepare_call(tuple(args), dict(kwargs), producer=producer,
                                      options=call_options, **special)
        except Exception as exc:
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"in call {index} of {self.name}.apply_many: {call!r}")
            raise

    def _handle_of(self, publication: Publication, target: KeyTarget, task_id: str) -> Any:
        """The caller's handle: Celery's own if published unprotected, else one that reads
        the key's outcome from the store."""
        store, sent = publication.store, publication.sent
        if store is None:
            return sent
        accept = accept_for(target.config.result_serializer)
        replayable = target.config.cache_errors
        if publication.original_task_id is not None:  # a duplicate: nothing was sent
            return IdempotentResult(publication.original_task_id, store=store, ref=target.ref,
                                    accept=accept, duplicate=True, app=self.app,
                                    task_name=self.name, replayable=replayable)
        # What apply_async returns under task_always_eager (an app.conf lookup costs more).
        eager = sent if isinstance(sent, EagerResult) and sent.id == task_id else None
        handle = IdempotentResult(task_id, store=store, ref=target.ref, accept=accept,
                                  duplicate=publication.duplicate, app=self.app,
                                  task_name=self.name, eager=eager, replayable=replayable,
                                  published=True)
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
        if not task_id:
            return False
        current = current_worker_task()
        return bool(current is not None and current.request.id == task_id)

    # -- execute -------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        # None unless this execution holds the key (set once claimed).
        request.idempotency_fence = None
        # Custom headers are request attributes on a worker, and only in request.headers when
        # run eagerly by apply().
        # Read from the request's own attributes (none of ours is a class attribute of
        # Celery's Context): getattr of an absent one raises and formats an AttributeError.
        fields = vars(request)
        headers = {**(request.headers or {}),
                   **{name: value for name in _OUR_HEADERS
                      if (value := fields.get(name)) is not None}}
        if request.called_directly or not self.idem_config().enabled:
            # No claim: steps just run; step_key() uses the message's key, else derives it
            # from the arguments (only if asked: a direct call needs no key).
            steps = Steps.unclaimed(
                ref=lambda: self.key_target_of_message(args, kwargs, headers).ref,
                task_name=self.name, task_id=request.id, sender=self)
            return _call_with_steps(self, steps, super().__call__, args, kwargs)
        target = self.key_target_of_message(args, kwargs, headers)
        return _CeleryExecution(self, request, target, args, kwargs, headers,
                                store_attempt=int(headers.get(STORE_ATTEMPT_HEADER) or 0),
                                busy_attempt=_count(headers.get(BUSY_ATTEMPT_HEADER)),
                                parked=bool(_count(headers.get(PARKED_HEADER)))).execute()

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


class _CeleryExecution(Execution):
    """One execution of an `IdempotentTask`: the protocol's hooks in Celery's terms."""

    def __init__(self, task: IdempotentTask, request: Any, target: KeyTarget,
                 args: tuple[Any, ...], kwargs: dict[str, Any], headers: Mapping[str, Any], *,
                 store_attempt: int, busy_attempt: int = 0, parked: bool = False) -> None:
        super().__init__(target, sender=task, task_name=task.name, task_id=request.id,
                         lease_ms=target.config.lease_ms(task.time_limit),
                         store_attempt=store_attempt, busy_attempt=busy_attempt, parked=parked)
        # The request being executed (``task.request`` is a thread-local stack lookup).
        self.task, self.request, self.args, self.kwargs = task, request, args, kwargs
        self.headers = headers  # the message's headers, ours included

    def open_store(self, config: IdempotencyConfig) -> KeyStore:
        return self.task.idem_store(config)

    def run_task(self) -> Any:
        return _call_with_steps(self.task, self._steps_of_run,
                                super(IdempotentTask, self.task).__call__, self.args, self.kwargs)

    def _steps_of_run(self) -> Steps:
        return self.steps

    def claimed(self, fence: int) -> None:
        self.request.idempotency_fence = fence

    def no_outcome(self, exc: BaseException) -> NoOutcome | None:
        if isinstance(exc, Retry):
            # Celery published the retry (due at its countdown/eta).
            return NoOutcome.retry(_retry_delay_ms(exc.when))
        if isinstance(exc, Ignore):
            # The task chose to leave no outcome (e.g. self.replace()).
            return NoOutcome.discard()
        if isinstance(exc, Reject):
            # Reject(requeue=False) is also what self.retry() raises when the retry could not
            # be published: the message is gone.
            return NoOutcome.reject(requeue=bool(exc.requeue))
        return None

    def storable(self, result: Any) -> Any:
        # As Celery's backend stores it (Backend.prepare_value): a returned AsyncResult or
        # GroupResult as its id tuple.
        if isinstance(result, ResultBase) and self.config.result_serializer != "pickle":
            return result.as_tuple()
        return result

    def accept_for(self, serializer: str) -> Any:
        return accept_for(serializer)

    def message_requeues(self) -> bool:
        # Only under acks_late: otherwise it was acknowledged before the task ran.
        return bool(self.task.acks_late and not self.task.request.is_eager)

    def republish_later(self, delay: float, extra_headers: Mapping[str, Any]) -> BaseException:
        retry: BaseException = self.task._republish_later(delay, extra_headers)
        return retry

    def park_data(self) -> bytes | None:
        request = self.task.request
        if request.is_eager:  # nothing to wake: an eager run waits in place
            return None
        # What a retry would send (Celery's own list of a message's options), but its id.
        options = {name: value for name, value in
                   self.task.signature_from_request(request).options.items()
                   if value is not None and name not in _NOT_PARKED}
        options["headers"] = {**(options.get("headers") or {}), **self.headers,
                              BUSY_ATTEMPT_HEADER: self.busy_attempt + 1, PARKED_HEADER: 1}
        data: dict[str, Any] = {"task": self.task.name, "options": options}
        if self.ref.scope != self.task.name:
            # A scope shared by several tasks: the owner may be another task, whose arguments
            # are the same values (same fingerprint) but maybe not in the same places.
            data["args"], data["kwargs"] = list(self.args), self.kwargs
        text: str = kombu_json.dumps(data)  # type: ignore[no-untyped-call]
        return text.encode("utf-8")

    def wake_parked(self, parked: list[ParkedDuplicate]) -> None:
        app = self.task.app
        with app.producer_or_acquire() as producer:
            for duplicate in parked:
                data = kombu_json.loads(  # type: ignore[no-untyped-call]
                    duplicate.data.decode("utf-8"))
                name = data["task"]
                if "args" in data:
                    args, kwargs = data["args"], data["kwargs"]
                else:  # the same task and fingerprint: this run's arguments are its own
                    args, kwargs = self.args, self.kwargs
                app.send_task(name, args, kwargs, task_id=duplicate.task_id,
                              producer=producer, add_to_parent=False, **data["options"])

    def end_as_handled(self) -> BaseException:
        handled: BaseException = Ignore()  # no result stored, no callbacks
        return handled


def _count(value: Any) -> int:
    """A counter header as sent by us; anything else (a hand-made message) counts as 0."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


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
