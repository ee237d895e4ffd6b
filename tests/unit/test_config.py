from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_idempotency import ConfigurationError, IdempotentTask
from celery_idempotency.config import SEVEN_DAYS, resolve


def test_defaults() -> None:
    config = resolve({"idempotency_store_url": "memory://"}, {})
    assert config.ttl == SEVEN_DAYS and config.on_store_error == "fail_closed"
    assert config.result_serializer == "json" and config.enabled is True


def test_store_url_is_required_with_no_fallback_to_the_broker() -> None:
    with pytest.raises(ConfigurationError, match="idempotency_store_url"):
        resolve({"broker_url": "redis://127.0.0.1:6379/0"}, {}, task_name="t")


def test_task_option_overrides_app_setting() -> None:
    config = resolve({"idempotency_store_url": "memory://", "idempotency_ttl": 3600},
                     {"idempotency_ttl": 7200})
    assert config.ttl == 7200


@pytest.mark.parametrize(("name", "value", "message"), [
    ("idempotency_ttl", 0, "positive number"),
    ("idempotency_ttl", "1d", "positive number"),
    ("idempotency_lease", -1, "positive number"),
    ("idempotency_on_store_error", "ignore", "fail_closed"),
    ("idempotency_enabled", "yes", "True or False"),
    ("idempotency_key_fields", "order_id", "sequence of parameter names"),
    ("idempotency_key_func", 42, "callable"),
    ("idempotency_cache_errors", (42,), "exception classes"),
    ("idempotency_key_prefix", "a{b}", "without braces"),
    ("idempotency_store_url", "localhost:6379", "must be a URL"),
    ("idempotency_max_result_bytes", 1.5, "positive integer"),
])
def test_invalid_values_are_named(name: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        resolve({"idempotency_store_url": "memory://", name: value}, {})
    assert name in str(info.value)


def test_unknown_app_setting_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="idempotency_tll"):
        resolve({"idempotency_store_url": "memory://", "idempotency_tll": 5}, {})


def test_unknown_task_option_is_an_error_when_the_task_is_registered() -> None:
    app = Celery("cfg")
    app.conf.idempotency_store_url = "memory://"

    @app.task(shared=False, base=IdempotentTask, idempotency_tll=5)  # not on other apps
    def misspelt() -> None: ...

    # Celery creates task classes lazily, when the app is finalized (worker start, first use).
    with pytest.raises(ConfigurationError, match="idempotency_tll"):
        app.finalize()


def test_cache_errors_accept_dotted_names() -> None:
    config = resolve({"idempotency_store_url": "memory://",
                      "idempotency_cache_errors": ["builtins.ValueError", KeyError]}, {})
    assert config.cache_errors == (ValueError, KeyError)


def test_per_message_options_are_limited() -> None:
    config = resolve({"idempotency_store_url": "memory://"}, {})
    assert config.with_message_options({"idempotency_ttl": 900}).ttl == 900
    assert config.with_message_options({"idempotency_scope": "s"}).scope == "s"
    with pytest.raises(ConfigurationError, match="per message"):
        config.with_message_options({"idempotency_lease": 5})


def test_a_misspelt_name_under_the_apps_config_namespace_is_refused() -> None:
    # Django projects: config_from_object("django.conf:settings", namespace="CELERY") makes
    # Celery read CELERY_IDEMPOTENCY_TTL as idempotency_ttl; a typo there must not be ignored.
    app = Celery("namespaced", set_as_current=False)
    app.config_from_object({"CELERY_IDEMPOTENCY_STORE_URL": "memory://",
                            "CELERY_IDEMPOTENCY_TTL": 3600,
                            "STRIPE_IDEMPOTENCY_HEADER": "not ours"}, namespace="CELERY")
    config = resolve(app.conf, {}, task_name="t", namespace=app.namespace)
    assert (config.store_url, config.ttl) == ("memory://", 3600)

    app.conf["CELERY_IDEMPOTENCY_TTLL"] = 60
    with pytest.raises(ConfigurationError, match="idempotency_ttll"):
        resolve(app.conf, {}, task_name="t", namespace=app.namespace)
