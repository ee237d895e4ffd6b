"""The Celery app of the OpenTelemetry integration tests (tests/integration/test_otel.py), run
by real workers and, as the publisher, by the test process.

Configured from the environment like ``tests.integration.app`` (BROKER_URL, STORE_URL, QUEUE),
plus SPANS_DIR: each pool process of a worker sets up tracing as the docs say (after the fork,
from ``worker_process_init``: opentelemetry-instrumentation-celery and
``celery_idempotency.otel``) and exports its finished spans as JSON lines to
``SPANS_DIR/<pid>.jsonl``; OTEL_KEY_ATTRIBUTE is ``celery_idempotency.otel``'s
``key_attribute`` (default: digest).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from celery_idempotency import IdempotentTask, otel
from tests.support.apps import worker_app

app = worker_app("otel_itest")


def span_record(span: ReadableSpan) -> dict[str, Any]:
    context, parent = span.get_span_context(), span.parent
    return {"name": span.name, "trace_id": f"{context.trace_id:032x}",
            "span_id": f"{context.span_id:016x}",
            "parent_id": f"{parent.span_id:016x}" if parent else None,
            "kind": span.kind.name, "attributes": dict(span.attributes or {}),
            "events": [event.name for event in span.events]}


class JsonLinesExporter(SpanExporter):
    """Appends each finished span to a file, one JSON object a line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(span), default=str) + "\n" for span in spans)
        with self.path.open("a") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS


@worker_process_init.connect(weak=False)
def start_tracing(**_: Any) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    spans_dir = os.environ.get("SPANS_DIR")
    if not spans_dir:
        return
    provider = TracerProvider()
    # Synchronous export: a span is in the file as soon as it ends.
    provider.add_span_processor(SimpleSpanProcessor(
        JsonLinesExporter(Path(spans_dir) / f"{os.getpid()}.jsonl")))
    CeleryInstrumentor().instrument(tracer_provider=provider)
    otel.instrument(tracer_provider=provider,
                    key_attribute=os.environ.get("OTEL_KEY_ATTRIBUTE", "digest"))  # type: ignore[arg-type]


@app.task(base=IdempotentTask, bind=True, name="otel.send_receipt")
def send_receipt(self: Any, order_id: int) -> dict[str, Any]:
    return {"order_id": order_id, "fence": self.request.idempotency_fence}
