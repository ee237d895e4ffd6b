"""The shop's Celery app, configured from Django's settings (``CELERY_*`` names, including
``CELERY_IDEMPOTENCY_*``). Worker: ``celery -A shop_site worker`` from this directory."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_site.settings")

app = Celery("shop_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
