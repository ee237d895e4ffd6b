"""Settings under which a record would be forgotten while its work is in flight are refused
when the configuration is resolved, with an error naming both settings."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_idempotency import ConfigurationError, IdempotentTask
from celery_idempotency.config import resolve

STORE = {"idempotency_store_url": "memory://"}


@pytest.mark.parametrize(("settings", "message"), [
    ({"idempotency_ttl": 30}, r"idempotency_ttl \(30 s, task 't'\) is shorter than the default "
                              r"lease \(60 s; idempotency_lease sets it\)"),
    ({"idempotency_ttl": 300, "idempotency_lease": 600},
     r"idempotency_ttl \(300 s, task 't'\) is shorter than idempotency_lease \(600 s\)"),
    ({"idempotency_ttl": 300},
     r"idempotency_ttl \(300 s, task 't'\) is shorter than idempotency_pending_timeout "
     r"\(600 s\)"),
    ({"idempotency_ttl": 3, "idempotency_lease": 1.5, "idempotency_pending_timeout": 5},
     r"shorter than idempotency_pending_timeout \(5 s\)"),
])
def test_ttl_shorter_than_lease_or_pending_timeout_is_refused(settings: dict[str, float],
                                                              message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        resolve({**STORE, **settings}, {}, task_name="t")


def test_ttl_equal_to_the_lease_and_pending_timeout_is_accepted() -> None:
    """The store keeps a record at least as long as its lease and its pending deadline, so
    equal is enough."""
    config = resolve({**STORE, "idempotency_ttl": 3, "idempotency_lease": 3,
                      "idempotency_pending_timeout": 3}, {}, task_name="t")
    assert config.ttl == config.lease == config.pending_timeout == 3


def test_task_option_makes_the_app_setting_contradictory() -> None:
    with pytest.raises(ConfigurationError, match="idempotency_lease"):
        resolve({**STORE, "idempotency_ttl": 100}, {"idempotency_lease": 120}, task_name="t")


def test_per_message_ttl_is_checked_too() -> None:
    config = resolve({**STORE, "idempotency_lease": 2, "idempotency_pending_timeout": 10}, {})
    assert config.with_message_options({"idempotency_ttl": 10}).ttl == 10
    with pytest.raises(ConfigurationError, match=r"\(5 s, per-message idempotency_ttl\)"):
        config.with_message_options({"idempotency_ttl": 5})


def test_publish_with_a_contradictory_per_message_ttl_raises_before_anything_is_sent() -> None:
    app = Celery("consistency", broker="memory://")
    app.conf.update(STORE, task_always_eager=False)

    @app.task(base=IdempotentTask, shared=False)
    def noop() -> None:
        return None

    with pytest.raises(ConfigurationError, match="per-message idempotency_ttl"):
        noop.apply_async(idempotency_key="k1", idempotency_ttl=5)
    store = noop.idem_store()
    assert list(store.entries()) == []
