"""Shared infrastructure of the test suite, the chaos suite and the benchmarks. Plain Python:
nothing here imports pytest except `skipping` (the suite's skip-or-fail policy), so that the
benchmarks run without it.

- `services`: private redis-servers (single, Sentinel, Cluster), RabbitMQ probe and cleanup,
  `ServiceMissing` for a binary or service that is not there.
- `workers`: a real ``celery worker`` in its own process group (`Worker`), ready by its log or
  by a file its app writes.
- `apps`: point a publishing app at a new stack (`point_app_at`); the effects db's client;
  the unit tests' eager app (`eager_app`) and a store that is down (`store_down`).
- `integration`: the integration tests' stacks, publish log, waits and worker-log parsing.
- `runs`: what a task did (its record, the runs of its body, the claim given up).
- `records`: the suite's sample record (`REF`, `RESULT`, `DAY_MS`, `PENDING_MS`) and raw
  record fields written past the store's scripts (`write_raw`).
- `procs`: processes from /proc (pool children, process groups, parents).
- `tls`: TLS-only Redis services and their certificates (tests only: needs trustme).
- `skipping`: pytest only: skip locally, fail under CI=true.
"""
