"""celery-idempotency: make Celery tasks safe to retry.

``@app.task(base=IdempotentTask)`` claims an idempotency key atomically in Redis before the
task runs and caches its outcome, so duplicate publishes and redeliveries replay the result
instead of repeating the side effect.
"""

from .canvas import IdempotentChord, IdempotentGroup
from .config import IdempotencyConfig
from .exceptions import (
    ArgumentsNotCanonical,
    BulkPublishError,
    ConfigurationError,
    CorruptRecord,
    IdempotencyError,
    IdempotencyKeyMismatch,
    IdempotencyKeyRequired,
    InvalidIdempotencyKey,
    InvalidStep,
    LeaseExpired,
    OwnershipLost,
    ReplayedTaskError,
    ResultNotStored,
    StepValueNotStored,
    StoreMisconfigured,
    StoreUnavailable,
)
from .keys import RecordRef
from .records import KeyState, Record
from .result import IdempotentResult, result_for_key
from .signals import idempotency_key
from .store import KeyStore, MemoryKeyStore, RedisKeyStore, open_store
from .task import IdempotentTask

__version__ = "0.1.0"

__all__ = [
    "ArgumentsNotCanonical",
    "BulkPublishError",
    "ConfigurationError",
    "CorruptRecord",
    "IdempotencyConfig",
    "IdempotencyError",
    "IdempotencyKeyMismatch",
    "IdempotencyKeyRequired",
    "IdempotentChord",
    "IdempotentGroup",
    "IdempotentResult",
    "IdempotentTask",
    "InvalidIdempotencyKey",
    "InvalidStep",
    "KeyState",
    "KeyStore",
    "LeaseExpired",
    "MemoryKeyStore",
    "OwnershipLost",
    "Record",
    "RecordRef",
    "RedisKeyStore",
    "ReplayedTaskError",
    "ResultNotStored",
    "StepValueNotStored",
    "StoreMisconfigured",
    "StoreUnavailable",
    "idempotency_key",
    "open_store",
    "result_for_key",
]
