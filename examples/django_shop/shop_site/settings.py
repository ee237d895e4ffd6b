"""Settings of the example shop: SQLite, one app (``orders``), Celery and celery-idempotency
settings under Celery's ``CELERY_`` namespace. Every location can be overridden from the
environment (the tests run it against private servers)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "celery_idempotency.django",  # python manage.py idempotency list|show|stats|release|purge
    "orders",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "shop_site.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SHOP_DB", str(BASE_DIR / "db.sqlite3")),
        # The web server and the worker's processes write to the same file.
        "OPTIONS": {"timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

# Receipts are e-mails; the file backend writes each one to a file in the outbox.
EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
EMAIL_FILE_PATH = os.environ.get("SHOP_OUTBOX", str(BASE_DIR / "outbox"))
DEFAULT_FROM_EMAIL = "shop@example.com"

# Celery reads these through app.config_from_object("django.conf:settings",
# namespace="CELERY"): CELERY_IDEMPOTENCY_STORE_URL is idempotency_store_url, and so on.
CELERY_BROKER_URL = os.environ.get("SHOP_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("SHOP_QUEUE", "django-shop")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_IDEMPOTENCY_STORE_URL = os.environ.get("SHOP_IDEMPOTENCY_STORE_URL",
                                              "redis://127.0.0.1:6379/1")
CELERY_IDEMPOTENCY_TTL = int(os.environ.get("SHOP_IDEMPOTENCY_TTL", 24 * 3600))
CELERY_IDEMPOTENCY_KEY_PREFIX = "shop:idem:"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"celery_idempotency": {"handlers": ["console"], "level": "INFO"}},
}
