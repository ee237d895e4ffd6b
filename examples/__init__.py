"""Runnable examples: ``shop.py`` (a Celery app) and ``demo.py`` (what ``make demo`` runs)."""
