"""Listed in ``INSTALLED_APPS`` as ``"celery_idempotency.django"``, it adds the management
command ``python manage.py idempotency`` (nothing else: no models, no migrations)."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped,unused-ignore]


class CeleryIdempotencyConfig(AppConfig):  # type: ignore[misc]  # AppConfig is untyped: Any
    name = "celery_idempotency.django"
    # Not "django" (the last part of the name), which would read as Django's own.
    label = "celery_idempotency"
    verbose_name = "celery-idempotency"
