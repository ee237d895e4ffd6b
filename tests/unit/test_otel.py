"""OpenTelemetry (`celery_idempotency.otel`) in one process: the SDK's in-memory span exporter
and metric reader, a TracerProvider/MeterProvider per test (nothing global), Celery's own
instrumentation (opentelemetry-instrumentation-celery) where the spans it makes matter.

Publishes go to kombu's in-process ``memory://`` broker (Celery's publish signals fire, nothing
consumes them); executions run with ``.apply()`` (Celery's tracer, with ``task_prerun`` and
``task_postrun``, in this thread). The key store is the memory store."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery, current_app
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from celery_idempotency import ConfigurationError, IdempotentTask, RecordRef, otel
from celery_idempotency.store import MemoryKeyStore
from tests.support.records import take_claim_away
from tests.support.workers import ROOT

KEY = "customer-jane.doe@example.com"  # a key that is personal data


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.finished() if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, [span.name for span in self.finished()]
        return found[0]

    def caller(self) -> Any:
        return self.tracer_provider.get_tracer("test").start_as_current_span("caller")

    def counter(self, name: str) -> dict[frozenset[tuple[str, Any]], int]:
        """The counter's value per attribute set (nothing recorded: empty)."""
        values: dict[frozenset[tuple[str, Any]], int] = {}
        data = self.metrics.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            attributes = frozenset((point.attributes or {}).items())
                            values[attributes] = int(point.value)  # type: ignore[union-attr]
        return values


def _providers() -> tuple[TracerProvider, InMemorySpanExporter, MeterProvider,
                          InMemoryMetricReader]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    return tracer_provider, spans, MeterProvider(metric_readers=[reader]), reader


@pytest.fixture
def bare() -> Iterator[Telemetry]:
    """Our instrumentation only (no Celery instrumentation), digest mode."""
    tracer_provider, spans, meter_provider, reader = _providers()
    otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    yield Telemetry(tracer_provider, spans, reader)
    otel.uninstrument()
    tracer_provider.shutdown()
    meter_provider.shutdown()


@pytest.fixture(params=["ours-last", "ours-first"])
def telemetry(request: pytest.FixtureRequest) -> Iterator[Telemetry]:
    """Celery's instrumentation and ours, connected in either order (digest mode)."""
    tracer_provider, spans, meter_provider, reader = _providers()
    ours = {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
    if request.param == "ours-first":
        otel.instrument(**ours)
    CeleryInstrumentor().instrument(**ours)
    if request.param == "ours-last":
        otel.instrument(**ours)
    yield Telemetry(tracer_provider, spans, reader)
    otel.uninstrument()
    CeleryInstrumentor().uninstrument()
    tracer_provider.shutdown()
    meter_provider.shutdown()


@pytest.fixture
def app() -> Iterator[Celery]:
    """The current app while the test runs: opentelemetry-instrumentation-celery finds a
    published task in the current app's registry (``celery.registry.tasks``)."""
    previous = current_app._get_current_object()
    app = Celery("otel", set_as_current=True)
    app.conf.update(broker_url="memory://", idempotency_store_url="memory://",
                    task_default_queue="otel-unit")
    yield app
    previous.set_current()


def make_task(app: Celery, name: str = "tests.otel.charge", **options: Any) -> Any:
    @app.task(shared=False, base=IdempotentTask, bind=True, name=name, **options)
    def charge(self: Any, order_id: int) -> dict[str, Any]:
        return {"order_id": order_id, "fence": self.request.idempotency_fence}

    return charge


def store_of(task: Any) -> MemoryKeyStore:
    store = task.idem_store()
    assert isinstance(store, MemoryKeyStore)
    return store


def digest_of(task: Any, key: str = KEY) -> str:
    return otel.key_digest(task.name, key)


def idempotency_attributes(span: ReadableSpan) -> dict[str, Any]:
    return {name: value for name, value in (span.attributes or {}).items()
            if name.startswith("idempotency.")}


def run(task: Any, order_id: int, key: str = KEY) -> Any:
    """What a worker does with a message of ``key``: Celery's tracer runs the task."""
    return task.apply((order_id,), headers={"idempotency_key": key})


# -- publish ------------------------------------------------------------------------------------


def test_a_published_message_carries_its_key_on_the_apply_async_span(
        app: Celery, telemetry: Telemetry) -> None:
    task = make_task(app)
    with telemetry.caller():
        handle = task.apply_async((42,), idempotency_key=KEY)

    caller, publish = telemetry.one("caller"), telemetry.one(f"apply_async/{task.name}")
    assert publish.parent is not None and publish.parent.span_id == caller.context.span_id
    assert idempotency_attributes(publish) == {
        "idempotency.scope": task.name, "idempotency.key_digest": digest_of(task),
        "idempotency.outcome": "reserved"}
    # The message's id, under the name of the instrumentation's semantic-conventions release.
    message_id = {publish.attributes.get(name)  # type: ignore[union-attr]
                  for name in ("messaging.message.id", "messaging.message_id")} - {None}
    assert message_id == {handle.id}
    assert idempotency_attributes(caller) == {}


def test_a_deduplicated_publish_gets_a_span_of_its_own_under_the_caller(
        app: Celery, telemetry: Telemetry) -> None:
    task = make_task(app)
    first = task.apply_async((42,), idempotency_key=KEY)
    telemetry.spans.clear()
    with telemetry.caller():
        second = task.apply_async((42,), idempotency_key=KEY)

    assert second.duplicate and second.id == first.id
    caller, dedup = telemetry.one("caller"), telemetry.one(f"deduplicate/{task.name}")
    assert telemetry.named(f"apply_async/{task.name}") == []  # nothing was sent
    assert dedup.parent is not None and dedup.parent.span_id == caller.context.span_id
    assert idempotency_attributes(dedup) == {
        "idempotency.scope": task.name, "idempotency.key_digest": digest_of(task),
        "idempotency.outcome": "duplicate", "idempotency.original_task_id": first.id}
    assert telemetry.counter("idempotency.publish.deduplicated") == {
        frozenset({("celery.task_name", task.name), ("idempotency.scope", task.name)}): 1}


def test_a_known_key_sent_anyway_is_a_duplicate_on_its_apply_async_span(
        app: Celery, telemetry: Telemetry) -> None:
    task = make_task(app)
    task.apply_async((42,), idempotency_key=KEY)
    telemetry.spans.clear()
    # A canvas member is always sent; its duplicate short-circuits when it runs.
    task.apply_async((42,), idempotency_key=KEY, link=task.si(7))

    publish = telemetry.one(f"apply_async/{task.name}")
    assert publish.attributes["idempotency.outcome"] == "duplicate"  # type: ignore[index]
    assert telemetry.named(f"deduplicate/{task.name}") == []
    assert telemetry.counter("idempotency.publish.deduplicated") == {}


def test_without_celerys_instrumentation_a_publish_marks_the_callers_span(
        app: Celery, bare: Telemetry) -> None:
    task = make_task(app)
    with bare.caller():
        task.apply_async((42,), idempotency_key=KEY)

    assert [span.name for span in bare.finished()] == ["caller"]
    assert idempotency_attributes(bare.one("caller"))["idempotency.outcome"] == "reserved"


def test_a_task_of_an_app_that_is_not_current_marks_the_callers_span(telemetry: Telemetry
                                                                     ) -> None:
    """opentelemetry-instrumentation-celery looks a published task up in the current app's
    registry; without it, its publish span ends at once, before the attributes can land."""
    other = Celery("not-current", set_as_current=False)
    other.conf.update(broker_url="memory://", idempotency_store_url="memory://")
    task = make_task(other)
    with telemetry.caller():
        task.apply_async((42,), idempotency_key=KEY)

    publish = telemetry.one(f"apply_async/{task.name}")
    assert idempotency_attributes(publish) == {}
    caller_attributes = idempotency_attributes(telemetry.one("caller"))
    assert caller_attributes["idempotency.outcome"] == "reserved"


def test_in_eager_mode_the_publish_marks_the_callers_span_and_the_run_its_own(
        app: Celery, telemetry: Telemetry) -> None:
    app.conf.task_always_eager = True
    task = make_task(app)
    with telemetry.caller():
        task.apply_async((42,), idempotency_key=KEY)

    caller, run_span = telemetry.one("caller"), telemetry.one(f"run/{task.name}")
    assert caller.attributes["idempotency.outcome"] == "reserved"  # type: ignore[index]
    assert run_span.parent is not None and run_span.parent.span_id == caller.context.span_id
    assert run_span.attributes["idempotency.outcome"] == "claimed"  # type: ignore[index]


# -- execution ----------------------------------------------------------------------------------


def test_a_claimed_execution_carries_key_outcome_and_fence_on_the_run_span(
        app: Celery, telemetry: Telemetry) -> None:
    task = make_task(app)
    result = run(task, 42).get()

    run_span = telemetry.one(f"run/{task.name}")
    assert idempotency_attributes(run_span) == {
        "idempotency.scope": task.name, "idempotency.key_digest": digest_of(task),
        "idempotency.outcome": "claimed", "idempotency.fence": result["fence"]}


def test_a_replayed_execution_is_marked_and_counted(app: Celery, telemetry: Telemetry) -> None:
    task = make_task(app)
    run(task, 42).get()
    telemetry.spans.clear()
    run(task, 42).get()

    run_span = telemetry.one(f"run/{task.name}")
    assert run_span.attributes["idempotency.outcome"] == "replayed"  # type: ignore[index]
    assert run_span.attributes["idempotency.replayed_state"] == "succeeded"  # type: ignore[index]
    assert telemetry.counter("idempotency.execution.replayed") == {frozenset({
        ("celery.task_name", task.name), ("idempotency.scope", task.name),
        ("idempotency.replayed_state", "succeeded")}): 1}


def test_a_busy_key_then_an_expired_lease_taken_over(app: Celery, telemetry: Telemetry) -> None:
    task = make_task(app, idempotency_busy_retry_delay=0.05)
    target = task.key_target((42,), {}, key=KEY, message_options={})
    ghost = store_of(task).claim(target.ref, task_id="ghost", owner="ghost-owner",
                                 fingerprint=target.fingerprint, task_name=task.name,
                                 lease_ms=300, ttl_ms=60_000)
    result = run(task, 42).get()  # busy while the ghost's lease runs, then takes it over

    runs = telemetry.named(f"run/{task.name}")
    outcomes = [span.attributes["idempotency.outcome"] for span in runs]  # type: ignore[index]
    assert set(outcomes[:-1]) == {"busy"} and outcomes[-1] == "taken_over", outcomes
    assert runs[0].attributes["idempotency.owner_task_id"] == "ghost"  # type: ignore[index]
    last = runs[-1].attributes or {}
    assert last["idempotency.previous_task_id"] == "ghost"
    assert last["idempotency.fence"] == result["fence"] > ghost.fence
    assert telemetry.counter("idempotency.lease.taken_over") == {
        frozenset({("celery.task_name", task.name), ("idempotency.scope", task.name)}): 1}


def test_ownership_lost_before_the_outcome_write_is_marked_and_counted(
        app: Celery, telemetry: Telemetry) -> None:
    @app.task(shared=False, base=IdempotentTask, bind=True, name="tests.otel.loses_its_claim")
    def loses_its_claim(self: Any, order_id: int) -> int:
        # An operator releases the key mid-run and another task claims it.
        take_claim_away(store_of(self), RecordRef(self.name, KEY))
        return order_id

    run(loses_its_claim, 42).get()

    run_span = telemetry.one(f"run/{loses_its_claim.name}")
    assert run_span.attributes["idempotency.outcome"] == "ownership_lost"  # type: ignore[index]
    assert run_span.attributes["idempotency.lost_write"] == "record success"  # type: ignore[index]
    assert [event.name for event in run_span.events] == ["idempotency.ownership_lost"]
    assert telemetry.counter("idempotency.ownership.lost") == {frozenset({
        ("celery.task_name", loses_its_claim.name),
        ("idempotency.scope", loses_its_claim.name)}): 1}


def test_a_retry_names_its_release_reason(app: Celery, telemetry: Telemetry) -> None:
    app.conf.task_always_eager = True

    @app.task(shared=False, base=IdempotentTask, bind=True, name="tests.otel.retries_once",
              max_retries=1)
    def retries_once(self: Any, order_id: int) -> int:
        if not self.request.retries:
            raise self.retry(countdown=0)
        return order_id

    retries_once.apply_async((42,), idempotency_key=KEY).get()

    first, second = telemetry.named(f"run/{retries_once.name}")
    assert first.attributes["idempotency.release_reason"] == "retry"  # type: ignore[index]
    assert "idempotency.release_reason" not in (second.attributes or {})


# -- the key on spans ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [
    ("digest", {"idempotency.key_digest"}), ("key", {"idempotency.key"}), ("none", set())])
def test_key_attribute_mode_decides_what_spans_carry(app: Celery, mode: str,
                                                     expected: set[str]) -> None:
    tracer_provider, spans, meter_provider, _ = _providers()
    CeleryInstrumentor().instrument(tracer_provider=tracer_provider)
    otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider,
                    key_attribute=mode)  # type: ignore[arg-type]
    try:
        task = make_task(app)
        task.apply_async((42,), idempotency_key=KEY)
        task.apply_async((42,), idempotency_key=KEY)
        run(task, 42).get()
    finally:
        otel.uninstrument()
        CeleryInstrumentor().uninstrument()
    finished = spans.get_finished_spans()
    assert len(finished) == 3  # publish, deduplicated publish, run
    for span in finished:
        carried = {"idempotency.key", "idempotency.key_digest"} & set(span.attributes or {})
        assert carried == expected, span.name
        shown = repr(dict(span.attributes or {})) + repr(span.events)
        assert (KEY in shown) == (mode == "key"), span.name


def test_the_digest_is_the_hash_tag_of_the_records_redis_key() -> None:
    name = RecordRef("shop.send_receipt", KEY).store_key("idem:")
    assert name == "idem:{" + otel.key_digest("shop.send_receipt", KEY) + "}"


def test_an_unknown_key_attribute_mode_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigurationError, match=r"'digest', 'key', 'none'.*'hash'"):
        otel.instrument(key_attribute="hash")  # type: ignore[arg-type]


def test_after_uninstrument_nothing_is_marked(app: Celery, bare: Telemetry) -> None:
    otel.uninstrument()
    task = make_task(app)
    with bare.caller():
        task.apply_async((42,), idempotency_key=KEY)
        task.apply_async((42,), idempotency_key=KEY)
    assert [span.name for span in bare.finished()] == ["caller"]
    assert idempotency_attributes(bare.one("caller")) == {}
    assert bare.counter("idempotency.publish.deduplicated") == {}


def test_without_opentelemetry_the_import_error_names_the_extra() -> None:
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "try:\n    import celery_idempotency.otel\n"
            "except ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=60)
    assert "pip install 'celery-idempotency[otel]'" in out.stdout, out.stdout + out.stderr


def test_the_package_imports_without_opentelemetry() -> None:
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "import celery_idempotency, celery_idempotency.task\n"
            "print('ok', 'celery_idempotency.otel' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=60)
    assert out.stdout.split() == ["ok", "False"], out.stdout + out.stderr

