"""OpenTelemetry: span attributes and counters for every publish and execution of an
`IdempotentTask`, from the protocol's events (`celery_idempotency.events`).

Optional: ``pip install "celery-idempotency[otel]"`` (``opentelemetry-api`` only; the SDK and
exporters are the application's choice). Nothing happens until `instrument` is called, once
per process that publishes or runs tasks; in a prefork worker from ``worker_process_init``,
where ``opentelemetry-instrumentation-celery`` is set up too (tracing must start after the
fork).

Where the attributes go, and why:

- **A published message** (``idempotency.outcome`` ``reserved``, or ``duplicate`` for a known
  key that is sent anyway: a canvas member or a frozen task id) gets them on the publish span
  of ``opentelemetry-instrumentation-celery`` (``apply_async/<task>``), the span whose context
  travels with the message. The key is reserved *before* Celery's ``before_task_publish``
  creates that span, so the attributes are held until the span exists: our
  ``before_task_publish``/``after_task_publish`` receivers put them on whichever span is
  current there and is not the caller's, whatever order the receivers were connected in.
  Without the Celery instrumentation there is no publish span, and they go on the caller's
  span; so in eager mode (Celery publishes nothing), and for a task of an app that is not the
  current one (the instrumentation looks tasks up in the current app and, not finding one,
  ends its span at once).
- **A deduplicated publish** is never sent, so the Celery instrumentation never sees it: it
  gets a span of its own, ``deduplicate/<task>``, a child of the caller's current span.
- **An execution** (``claimed``, ``taken_over``, ``replayed``, ``busy``, later
  ``ownership_lost``) gets them on the current span while the task runs: the
  instrumentation's ``run/<task>`` span (the protocol runs inside the task's ``__call__``,
  between ``task_prerun`` and ``task_postrun``).

Keys may be personal data (an e-mail address, an order number), so spans carry the key's
digest by default (``idempotency.key_digest``): the hash tag of the record's Redis key name
(``<prefix>{<digest>}``), enough to find the record, not to read the key. It is an unsalted
SHA-256, so it hides a key that cannot be guessed; a guessable key can be confirmed by
hashing guesses: choose ``key_attribute="none"`` then. ``key_attribute="key"`` records the key
itself (``idempotency.key``). Counters never carry keys (unbounded cardinality).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

try:
    from opentelemetry import metrics, trace
except ImportError as exc:  # pragma: no cover - shown by tests/unit/test_otel.py in a subprocess
    raise ImportError(
        "celery_idempotency.otel needs the OpenTelemetry API: "
        "pip install 'celery-idempotency[otel]'") from exc

from celery.signals import after_task_publish, before_task_publish

from . import __version__, events
from .exceptions import ConfigurationError
from .keys import record_digest

__all__ = ["KEY_ATTRIBUTES", "OUTCOMES", "instrument", "key_digest", "uninstrument"]

KeyAttribute = Literal["digest", "key", "none"]
KEY_ATTRIBUTES: tuple[str, ...] = ("digest", "key", "none")

#: ``idempotency.outcome`` values.
OUTCOMES = ("reserved", "duplicate", "claimed", "taken_over", "replayed", "busy",
            "ownership_lost")

SCOPE = "idempotency.scope"
KEY = "idempotency.key"
KEY_DIGEST = "idempotency.key_digest"
OUTCOME = "idempotency.outcome"
FENCE = "idempotency.fence"
ORIGINAL_TASK_ID = "idempotency.original_task_id"
OWNER_TASK_ID = "idempotency.owner_task_id"
PREVIOUS_TASK_ID = "idempotency.previous_task_id"
REPLAYED_STATE = "idempotency.replayed_state"
RELEASE_REASON = "idempotency.release_reason"
LOST_WRITE = "idempotency.lost_write"
TASK_NAME = "celery.task_name"  # the name opentelemetry-instrumentation-celery uses

_UID = "celery_idempotency.otel"

def key_digest(scope: str, key: str) -> str:
    """The digest spans carry for ``key`` under ``scope``: the hash tag of its record's
    Redis key name."""
    return record_digest(scope, key)


@dataclass
class _HeldPublish:
    """A reservation's attributes, waiting for the publish span to exist."""

    task_id: str
    attributes: dict[str, Any]
    caller: trace.SpanContext


class _Instrumentation:
    def __init__(self, tracer: trace.Tracer, meter: metrics.Meter,
                 key_attribute: KeyAttribute) -> None:
        self.tracer = tracer
        self.key_attribute = key_attribute
        self.deduplicated = meter.create_counter(
            "idempotency.publish.deduplicated", unit="{publish}",
            description="Publishes not sent because their idempotency key was known")
        self.replayed = meter.create_counter(
            "idempotency.execution.replayed", unit="{execution}",
            description="Executions that replayed a cached outcome instead of running")
        self.taken_over = meter.create_counter(
            "idempotency.lease.taken_over", unit="{claim}",
            description="Claims taken over from an owner whose lease had expired")
        self.ownership_lost = meter.create_counter(
            "idempotency.ownership.lost", unit="{write}",
            description="Outcome writes refused because the claim had passed to another owner")
        # The publish in flight on this thread: one slot, overwritten by the next reservation,
        # so a send that failed before Celery's signals leaves nothing behind to grow.
        self._held = threading.local()

    # -- the protocol's events -----------------------------------------------------------------

    def on_event(self, event: str, sender: Any, fields: dict[str, Any]) -> None:
        handler = self._HANDLERS.get(event)
        if handler is not None:
            handler(self, sender, fields)

    def _key_attributes(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        scope, key = str(fields["scope"]), str(fields["key"])
        attributes: dict[str, Any] = {SCOPE: scope}
        if self.key_attribute == "digest":
            attributes[KEY_DIGEST] = key_digest(scope, key)
        elif self.key_attribute == "key":
            attributes[KEY] = key
        return attributes

    def _on_reserved(self, sender: Any, fields: dict[str, Any]) -> None:
        attributes = {**self._key_attributes(fields), TASK_NAME: _task_name(sender),
                      OUTCOME: "duplicate" if fields.get("duplicate") else "reserved"}
        current = trace.get_current_span()
        if _always_eager(sender):
            # Celery runs the task in place and publishes nothing: no publish span will come.
            current.set_attributes(attributes)
            return
        self._held.publish = _HeldPublish(str(fields["task_id"]), attributes,
                                          current.get_span_context())

    def _on_duplicate(self, sender: Any, fields: dict[str, Any]) -> None:
        name = _task_name(sender)
        attributes = {**self._key_attributes(fields), TASK_NAME: name, OUTCOME: "duplicate",
                      ORIGINAL_TASK_ID: str(fields["original_task_id"])}
        # Nothing is sent, so no instrumentation traces it: a span of our own, under the
        # caller's, shows that the publish happened and what it got instead.
        with self.tracer.start_as_current_span(f"deduplicate/{name}", attributes=attributes):
            pass
        self.deduplicated.add(1, _metric_attributes(sender, fields))

    def _on_claimed(self, sender: Any, fields: dict[str, Any]) -> None:
        trace.get_current_span().set_attributes({
            **self._key_attributes(fields),
            OUTCOME: "taken_over" if fields.get("took_over") else "claimed",
            FENCE: int(fields["fence"])})

    def _on_taken_over(self, sender: Any, fields: dict[str, Any]) -> None:
        previous = fields.get("previous_task_id")
        if previous:
            trace.get_current_span().set_attribute(PREVIOUS_TASK_ID, str(previous))
        self.taken_over.add(1, _metric_attributes(sender, fields))

    def _on_busy(self, sender: Any, fields: dict[str, Any]) -> None:
        trace.get_current_span().set_attributes({
            **self._key_attributes(fields), OUTCOME: "busy",
            OWNER_TASK_ID: str(fields["owner_task_id"])})

    def _on_replayed(self, sender: Any, fields: dict[str, Any]) -> None:
        state = str(fields["state"])
        trace.get_current_span().set_attributes({
            **self._key_attributes(fields), OUTCOME: "replayed", REPLAYED_STATE: state})
        self.replayed.add(1, {**_metric_attributes(sender, fields), REPLAYED_STATE: state})

    def _on_ownership_lost(self, sender: Any, fields: dict[str, Any]) -> None:
        write = str(fields["action"])
        span = trace.get_current_span()
        span.set_attributes({**self._key_attributes(fields), OUTCOME: "ownership_lost",
                             LOST_WRITE: write})
        span.add_event("idempotency.ownership_lost", {LOST_WRITE: write})
        self.ownership_lost.add(1, _metric_attributes(sender, fields))

    def _on_released(self, sender: Any, fields: dict[str, Any]) -> None:
        # In the task (retry, ignore, reject, shutdown) this is the run span; in the worker's
        # main process (a dead child, a revoke) there is none and it is a no-op.
        trace.get_current_span().set_attribute(RELEASE_REASON, str(fields["reason"]))

    _HANDLERS = {
        events.KEY_RESERVED: _on_reserved, events.DUPLICATE_PUBLISHED: _on_duplicate,
        events.KEY_CLAIMED: _on_claimed, events.LEASE_TAKEN_OVER: _on_taken_over,
        events.CLAIM_BUSY: _on_busy, events.OUTCOME_REPLAYED: _on_replayed,
        events.OWNERSHIP_LOST: _on_ownership_lost, events.CLAIM_RELEASED: _on_released,
    }

    # -- Celery's publish signals --------------------------------------------------------------

    def before_publish(self, headers: Mapping[str, Any] | None = None, **_: Any) -> None:
        # Connected after opentelemetry-instrumentation-celery's receiver, the current span is
        # its apply_async span; connected before it, the caller's: wait for after_publish.
        self._attach_held(headers, only_to_another_span=True)

    def after_publish(self, headers: Mapping[str, Any] | None = None, **_: Any) -> None:
        # Ours ran first here too (same connection order), so the instrumentation's span is
        # still current; without the instrumentation this is the caller's span.
        self._attach_held(headers, only_to_another_span=False)

    def _attach_held(self, headers: Mapping[str, Any] | None, *,
                     only_to_another_span: bool) -> None:
        held: _HeldPublish | None = getattr(self._held, "publish", None)
        if held is None or not headers or headers.get("id") != held.task_id:
            return
        current = trace.get_current_span()
        context = current.get_span_context()
        if only_to_another_span and (context.trace_id, context.span_id) == (
                held.caller.trace_id, held.caller.span_id):
            return
        current.set_attributes(held.attributes)
        self._held.publish = None


def _task_name(sender: Any) -> str:
    return str(getattr(sender, "name", None) or "unknown")


def _always_eager(sender: Any) -> bool:
    conf = getattr(getattr(sender, "app", None), "conf", None)
    return bool(conf is not None and conf.get("task_always_eager"))


def _metric_attributes(sender: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
    return {TASK_NAME: _task_name(sender), SCOPE: str(fields["scope"])}


_lock = threading.Lock()


def instrument(*, tracer_provider: trace.TracerProvider | None = None,
               meter_provider: metrics.MeterProvider | None = None,
               key_attribute: KeyAttribute = "digest") -> None:
    """Put idempotency attributes on spans and count deduplications, replays, takeovers and
    ownership losses, in this process. Providers default to the global ones; calling it again
    replaces the previous setup.

    ``key_attribute``: ``"digest"`` (default) records ``idempotency.key_digest``, ``"key"`` the
    key itself as ``idempotency.key``, ``"none"`` neither."""
    if key_attribute not in KEY_ATTRIBUTES:
        raise ConfigurationError(
            f"key_attribute must be one of {', '.join(map(repr, KEY_ATTRIBUTES))}, "
            f"not {key_attribute!r}")
    instrumentation = _Instrumentation(
        trace.get_tracer("celery_idempotency", __version__, tracer_provider),
        metrics.get_meter("celery_idempotency", __version__, meter_provider),
        key_attribute)
    with _lock:
        events.subscribe(_UID, instrumentation.on_event)
        # Replaced, not added: the dispatch_uid keeps one receiver of each per process.
        before_task_publish.disconnect(dispatch_uid=_UID)
        after_task_publish.disconnect(dispatch_uid=_UID)
        before_task_publish.connect(instrumentation.before_publish, weak=False,
                                    dispatch_uid=_UID)
        after_task_publish.connect(instrumentation.after_publish, weak=False,
                                   dispatch_uid=_UID)


def uninstrument() -> None:
    """Undo `instrument`: no more attributes or counts from this library."""
    with _lock:
        events.unsubscribe(_UID)
        before_task_publish.disconnect(dispatch_uid=_UID)
        after_task_publish.disconnect(dispatch_uid=_UID)
