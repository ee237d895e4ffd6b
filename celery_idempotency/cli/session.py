"""Which store a command works on, exit codes, and store errors turned into plain messages.

Exit codes: 0 ok; 1 not found (no record for the key); 2 usage (bad option or store URL, missing
configuration, a key found in several scopes without ``--scope``); 3 store error (unreachable,
or a record that cannot be read); 4 refused (a live claim or a cached result without
``--force``, a record that changed meanwhile, a confirmation declined): nothing was changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import click
import redis

from ..config import resolve
from ..exceptions import (
    ConfigurationError,
    CorruptRecord,
    IdempotencyError,
    StoreMisconfigured,
    StoreUnavailable,
)
from ..redact import redact, redact_url
from ..store import KeyStore, open_store, store_for_app
from .terminal import safe_text

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_REFUSED = 4

SESSION_KEY = "celery_idempotency.session"


class CliError(click.ClickException):
    """An error message for stderr, with its exit code (never a traceback)."""

    exit_code = EXIT_STORE

    def show(self, file: IO[Any] | None = None) -> None:
        # Messages quote store-originated text (keys, scopes, server replies): escaped.
        click.echo(safe_text(f"Error: {self.format_message()}"), err=True)


class NotFound(CliError):
    exit_code = EXIT_NOT_FOUND


class UsageProblem(CliError):
    exit_code = EXIT_USAGE


class StoreProblem(CliError):
    exit_code = EXIT_STORE


class Refused(CliError):
    exit_code = EXIT_REFUSED


@dataclass
class Session:
    """The store of one command line: opened on first use, closed at exit if we opened it."""

    url: str
    prefix: str
    opener: Callable[[], KeyStore]
    owns_store: bool = True
    _store: KeyStore | None = field(default=None, repr=False)

    @property
    def shown_url(self) -> str:
        return redact_url(self.url)

    def store(self) -> KeyStore:
        if self._store is None:
            self._store = self.opener()
        return self._store

    def close(self) -> None:
        if self._store is not None and self.owns_store:
            self._store.close()
        self._store = None

    @classmethod
    def of(cls, ctx: click.Context) -> Session:
        session = ctx.meta.get(SESSION_KEY)
        if not isinstance(session, Session):  # pragma: no cover - commands run under a group
            raise click.UsageError("run this command under `celery-idempotency` or "
                                   "`celery -A proj idempotency`")
        return session

    @classmethod
    def standalone(cls, url: str, *, prefix: str, timeout: float,
                   store: KeyStore | None = None) -> Session:
        """``celery-idempotency --store-url``: settings validated as the library does."""
        config = resolve({"idempotency_store_url": url, "idempotency_key_prefix": prefix,
                          "idempotency_store_timeout": timeout}, {})
        if store is not None:  # given by the caller (tests, embedding): not ours to close
            return cls(config.store_url, config.key_prefix, lambda: store, owns_store=False)
        return cls(config.store_url, config.key_prefix, lambda: open_store(
            config.store_url, prefix=config.key_prefix, timeout=config.store_timeout))

    @classmethod
    def for_app(cls, app: Any, *, url: str | None, prefix: str | None) -> Session:
        """``celery -A proj idempotency``: the app's settings, ``--store-url``/``--prefix`` win.

        The store is the app's own (`store_for_app`), the one its tasks use in this process.
        """
        if url is None and app.conf.get("idempotency_store_url") is None:
            raise UsageProblem(f"the Celery app {app.main or '(default)'!r} has no "
                           "idempotency_store_url; set it in the app's configuration (is -A "
                           "right?), or pass --store-url")
        overrides = {name: value for name, value in (("idempotency_store_url", url),
                                                     ("idempotency_key_prefix", prefix))
                     if value is not None}
        config = resolve(app.conf, overrides, task_name="(command line)",
                         namespace=getattr(app, "namespace", None))
        return cls(config.store_url, config.key_prefix, lambda: store_for_app(
            app, config.store_url, prefix=config.key_prefix, timeout=config.store_timeout),
                   owns_store=False)


def translate(exc: Exception, session: Session | None) -> CliError:
    """A store or configuration error as a message naming the store, and its exit code."""
    error = _translate(exc, session)
    # Every message may quote the URL (or a library's error that does): one redaction.
    return type(error)(redact(error.message, session.url if session is not None else None))


def _translate(exc: Exception, session: Session | None) -> CliError:
    where = f" at {session.shown_url}" if session is not None else ""
    if isinstance(exc, StoreUnavailable):
        cause = exc.__cause__
        if cause is None or isinstance(cause, (redis.ConnectionError, redis.TimeoutError)):
            return StoreProblem(f"cannot reach the idempotency store{where}: "
                                f"{cause or exc.message}")
        # An error reply that means "not now" (READONLY, OOM, BUSY...): say which.
        reply = exc.message.partition(": ")[2] or exc.message
        return StoreProblem(f"the idempotency store{where} is unavailable: {reply}")
    if isinstance(exc, StoreMisconfigured):
        return StoreProblem(f"the idempotency store{where} refuses for good: {exc.message}")
    if isinstance(exc, ConfigurationError):
        return UsageProblem(exc.message)
    if isinstance(exc, CorruptRecord):
        return StoreProblem(f"unreadable record in the idempotency store{where}: {exc.message}")
    if isinstance(exc, redis.RedisError):
        return StoreProblem(f"the idempotency store{where} failed: {exc}")
    if isinstance(exc, IdempotencyError):
        return StoreProblem(str(exc))
    raise exc  # pragma: no cover - only the types above are translated
