"""OpenTelemetry with a real worker: opentelemetry-instrumentation-celery and
``celery_idempotency.otel`` set up in this process (the publisher, in-memory exporter) and in
each pool process of a real ``celery worker`` (from ``worker_process_init``, exporting JSON
lines to a file this test reads; tests/integration/otel_app.py).

What a user should see: one trace from the caller's span through Celery's
``apply_async/<task>`` span (``idempotency.outcome=reserved``) to the worker's ``run/<task>``
span (``claimed`` and the fence); a deduplicated publish as ``deduplicate/<task>`` under the
caller's span, with nothing sent; a duplicate message that reaches the worker anyway as a
``run/<task>`` span that replayed; and, in digest mode, the key nowhere in any span."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, current_app
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from celery_idempotency import otel
from tests.integration import otel_app
from tests.support.integration import TIMEOUT, Stack, redis_stack, unique, use_stack, wait_for
from tests.support.services import RedisServer
from tests.support.workers import Worker

TASK = otel_app.send_receipt
RUN = f"run/{TASK.name}"


@pytest.fixture(scope="module")
def tested_app() -> tuple[Celery, str]:
    return otel_app.app, otel_app.__name__


def start_traced_worker(stack: Stack, spans_dir: Path, log_dir: Path, *,
                        key_attribute: str = "digest") -> Worker:
    name = unique("w-otel")
    spans_dir.mkdir(parents=True, exist_ok=True)
    env = {**stack.worker_env(), "SPANS_DIR": str(spans_dir),
           "OTEL_KEY_ATTRIBUTE": key_attribute}
    return Worker(otel_app.__name__, env, concurrency=2, name=name, queues=stack.queue,
                  log=log_dir / f"{name}.log").start()


@dataclass
class WorkerSpans:
    directory: Path

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(line) for path in sorted(self.directory.glob("*.jsonl"))
                for line in path.read_text().splitlines() if line.strip()]

    def raw(self) -> str:
        return "".join(path.read_text() for path in self.directory.glob("*.jsonl"))

    def runs_in(self, trace_id: int, worker: Worker) -> list[dict[str, Any]]:
        """The worker's run spans of ``trace_id``, once there is one."""
        def found() -> list[dict[str, Any]]:
            return [span for span in self.all()
                    if span["name"] == RUN and span["trace_id"] == f"{trace_id:032x}"]
        return wait_for(found, what=f"a {RUN} span in trace {trace_id:032x}", worker=worker)


@pytest.fixture(scope="module")
def traced_worker(stack: Stack, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[Worker, WorkerSpans]]:
    base = tmp_path_factory.mktemp("otel")
    worker = start_traced_worker(stack, base / "spans", base)
    yield worker, WorkerSpans(base / "spans")
    worker.stop()


@dataclass
class Publisher:
    provider: TracerProvider
    spans: InMemorySpanExporter

    def caller(self, name: str = "POST /receipts") -> Any:
        return self.provider.get_tracer("test").start_as_current_span(name)

    def in_trace(self, trace_id: int) -> list[ReadableSpan]:
        return [span for span in self.spans.get_finished_spans()
                if span.context.trace_id == trace_id]


@pytest.fixture
def publisher(stack: Stack) -> Iterator[Publisher]:
    """This process traced as a user's publisher would be (digest mode), the test app as the
    current app (where the Celery instrumentation finds a task by name), pointed at the
    module's stack."""
    use_stack(otel_app.app, stack)
    previous = current_app._get_current_object()
    otel_app.app.set_current()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    CeleryInstrumentor().instrument(tracer_provider=provider)
    otel.instrument(tracer_provider=provider)
    yield Publisher(provider, spans)
    otel.uninstrument()
    CeleryInstrumentor().uninstrument()
    provider.shutdown()
    previous.set_current()


def new_key() -> str:
    return unique("customer-jane.doe@example.com")  # personal data


def test_one_trace_from_the_caller_to_the_workers_run_span(
        traced_worker: tuple[Worker, WorkerSpans], publisher: Publisher) -> None:
    worker, worker_spans = traced_worker
    key = new_key()
    with publisher.caller() as caller:
        handle = TASK.apply_async((42,), idempotency_key=key)
    result = handle.get(timeout=TIMEOUT)

    trace_id = caller.get_span_context().trace_id
    published = [span for span in publisher.in_trace(trace_id)
                 if span.name == f"apply_async/{TASK.name}"]
    assert len(published) == 1
    publish = published[0]
    assert publish.parent is not None
    assert publish.parent.span_id == caller.get_span_context().span_id
    assert (publish.attributes or {})["idempotency.outcome"] == "reserved"

    [run] = worker_spans.runs_in(trace_id, worker)
    assert run["parent_id"] == f"{publish.context.span_id:016x}"
    assert run["kind"] == "CONSUMER"
    digest = otel.key_digest(TASK.name, key)
    assert {name: value for name, value in run["attributes"].items()
            if name.startswith("idempotency.")} == {
        "idempotency.scope": TASK.name, "idempotency.key_digest": digest,
        "idempotency.outcome": "claimed", "idempotency.fence": result["fence"]}
    # Digest mode: the key is in no span, here or in the worker.
    assert key not in worker_spans.raw()
    assert all(key not in repr(dict(span.attributes or {}))
               for span in publisher.spans.get_finished_spans())


def test_a_deduplicated_publish_is_a_span_under_the_caller_and_sends_nothing(
        traced_worker: tuple[Worker, WorkerSpans], publisher: Publisher) -> None:
    key = new_key()
    first = TASK.apply_async((43,), idempotency_key=key)
    first.get(timeout=TIMEOUT)
    with publisher.caller("retried POST /receipts") as caller:
        again = TASK.apply_async((43,), idempotency_key=key)
    assert again.duplicate and again.id == first.id

    spans = publisher.in_trace(caller.get_span_context().trace_id)
    assert sorted(span.name for span in spans) == sorted(
        ["retried POST /receipts", f"deduplicate/{TASK.name}"])
    [dedup] = [span for span in spans if span.name.startswith("deduplicate/")]
    assert dedup.parent is not None
    assert dedup.parent.span_id == caller.get_span_context().span_id
    assert dict(dedup.attributes or {}) == {
        "idempotency.scope": TASK.name,
        "idempotency.key_digest": otel.key_digest(TASK.name, key),
        "idempotency.outcome": "duplicate", "idempotency.original_task_id": first.id,
        "celery.task_name": TASK.name}
    assert key not in repr([dict(span.attributes or {}) for span in spans])


def test_a_duplicate_message_that_reaches_the_worker_replays_on_its_run_span(
        traced_worker: tuple[Worker, WorkerSpans], publisher: Publisher) -> None:
    worker, worker_spans = traced_worker
    key = new_key()
    TASK.apply_async((44,), idempotency_key=key).get(timeout=TIMEOUT)
    # By name, from a service that does not import the task: sent, deduplicated by the worker.
    with publisher.caller("another service") as caller:
        otel_app.app.send_task(TASK.name, (44,), headers={"idempotency_key": key})

    [run] = worker_spans.runs_in(caller.get_span_context().trace_id, worker)
    assert run["attributes"]["idempotency.outcome"] == "replayed"
    assert run["attributes"]["idempotency.replayed_state"] == "succeeded"
    assert "idempotency.fence" not in run["attributes"]  # it never held the key
    assert key not in worker_spans.raw()


def test_with_key_attribute_key_the_worker_shows_the_key(
        redis_server: RedisServer, publisher: Publisher, tmp_path: Path) -> None:
    """The other side of the digest assertions above: the same check sees a key when it is
    there."""
    stack = redis_stack(redis_server)
    use_stack(otel_app.app, stack)
    worker = start_traced_worker(stack, tmp_path / "spans", tmp_path, key_attribute="key")
    try:
        key = new_key()
        with publisher.caller() as caller:
            TASK.apply_async((45,), idempotency_key=key).get(timeout=TIMEOUT)
        spans = WorkerSpans(tmp_path / "spans")
        [run] = spans.runs_in(caller.get_span_context().trace_id, worker)
    finally:
        worker.stop()
    assert run["attributes"]["idempotency.key"] == key
    assert "idempotency.key_digest" not in run["attributes"]
    assert key in spans.raw()
