from __future__ import annotations

import threading
from typing import Any

import pytest

from celery_idempotency import (
    IdempotencyKeyMismatch,
    IdempotencyKeyRequired,
    IdempotentTask,
    InvalidIdempotencyKey,
)
from celery_idempotency.http import (
    parse_idempotency_key,
    status_for_error,
    status_for_submission,
)
from tests.support.apps import eager_app


@pytest.mark.parametrize(("header", "key"), [
    ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ('"with space and \\"quote\\" and \\\\"', 'with space and "quote" and \\'),
    ('  "padded"\t', "padded"),
    ("tok:en/x=1", "tok:en/x=1"),
])
def test_accepts_structured_field_strings_and_bare_tokens(header: str, key: str) -> None:
    assert parse_idempotency_key(header) == key


@pytest.mark.parametrize(("header", "reason"), [
    ('""', "empty"),
    ("", "quoted string or a token"),
    ('"' + "x" * 256 + '"', "255"),
    ('"bad \\n escape"', "invalid escape"),
    ('"inner " quote"', "unescaped quote"),
    ('"unbalanced', "unbalanced"),
    ("two words", "quoted string or a token"),
    ('"caf\u00e9"', "printable ASCII"),
    ("caf\u00e9", "quoted string or a token"),
])
def test_rejects_malformed_values_with_the_reason(header: str, reason: str) -> None:
    with pytest.raises(InvalidIdempotencyKey, match=reason) as info:
        parse_idempotency_key(header)
    assert status_for_error(info.value) == 400


def test_missing_header_when_required_is_400_and_optional_is_none() -> None:
    with pytest.raises(IdempotencyKeyRequired) as info:
        parse_idempotency_key(None)
    assert status_for_error(info.value) == 400
    assert parse_idempotency_key(None, required=False) is None


def test_mismatch_is_422() -> None:
    assert status_for_error(IdempotencyKeyMismatch("other payload", key="k")) == 422


def test_submission_statuses_new_done_and_in_flight() -> None:
    app = eager_app("http")
    started, finish = threading.Event(), threading.Event()

    @app.task(shared=False, base=IdempotentTask)
    def job(n: int) -> int:
        if n == 2:
            started.set()
            finish.wait(10)
        return n

    first = job.apply_async((1,), idempotency_key="a")
    assert status_for_submission(first) == 202
    assert status_for_submission(job.apply_async((1,), idempotency_key="a")) == 202  # done
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.append(
        job.apply_async((2,), idempotency_key="b")))
    runner.start()
    assert started.wait(10)
    in_flight = job.apply_async((2,), idempotency_key="b")
    assert in_flight.duplicate and status_for_submission(in_flight) == 409
    assert status_for_submission(in_flight, wait=0.1) == 409
    finish.set()
    runner.join(10)
    assert status_for_submission(in_flight, wait=5) == 202
