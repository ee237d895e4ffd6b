"""`make bench`: throughput, duplicate handling, publish path, Redis round trips, memory per
record and worker-side latency of `IdempotentTask`, measured in one run against plain Celery,
celery-once and celery-singleton. Entry point: ``python -m benchmarks [--quick]``.
"""
