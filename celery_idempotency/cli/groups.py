"""The two entry points: `celery -A proj idempotency` (a ``celery.commands`` plugin: Celery
passes its ``CLIContext`` with the ``-A`` app as ``ctx.obj``) and `celery-idempotency
--store-url URL`. Both carry the same commands."""

from __future__ import annotations

from typing import Any

import click
import redis

from ..exceptions import IdempotencyError
from ..store import KeyStore
from .commands import COMMANDS
from .session import SESSION_KEY, Session, translate


class IdempotencyGroup(click.Group):
    """Turns store and configuration errors into a message and an exit code, not a traceback,
    and closes the store it opened."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (IdempotencyError, redis.RedisError) as exc:
            raise translate(exc, ctx.meta.get(SESSION_KEY)) from exc
        finally:
            session = ctx.meta.pop(SESSION_KEY, None)
            if isinstance(session, Session):
                session.close()


@click.group("idempotency", cls=IdempotencyGroup)
@click.option("--store-url", metavar="URL", help="Instead of the app's idempotency_store_url.")
@click.option("--prefix", metavar="PREFIX", help="Instead of the app's idempotency_key_prefix.")
@click.pass_context
def idempotency(ctx: click.Context, /, store_url: str | None, prefix: str | None,
                **_preload_options: Any) -> None:
    """Inspect and manage idempotency keys (celery-idempotency).

    Uses the store of the app given with -A (idempotency_store_url, idempotency_key_prefix).
    """
    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError("no Celery app: run as `celery -A proj idempotency ...`")
    ctx.meta[SESSION_KEY] = Session.for_app(app, url=store_url, prefix=prefix)


@click.group("celery-idempotency", cls=IdempotencyGroup)
@click.option("--store-url", envvar="IDEMPOTENCY_STORE_URL", required=True, metavar="URL",
              help="redis://, rediss://, unix://, redis[s]+sentinel://, redis[s]+cluster:// "
                   "(env: IDEMPOTENCY_STORE_URL).")
@click.option("--prefix", envvar="IDEMPOTENCY_KEY_PREFIX", default="idem:", show_default=True,
              help="The idempotency_key_prefix of the app (env: IDEMPOTENCY_KEY_PREFIX).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=2.0,
              show_default=True, metavar="SECONDS", help="Store connect and read timeout.")
@click.version_option(package_name="celery-idempotency")
@click.pass_context
def main(ctx: click.Context, store_url: str, prefix: str, timeout: float) -> None:
    """Inspect and manage the idempotency keys of celery-idempotency.

    Exit codes: 0 ok, 1 not found, 2 usage, 3 store unreachable or unreadable record,
    4 refused (nothing changed).
    """
    given = ctx.obj if isinstance(ctx.obj, KeyStore) else None  # embedding, tests
    ctx.meta[SESSION_KEY] = Session.standalone(store_url, prefix=prefix, timeout=timeout,
                                               store=given)


for _command in COMMANDS:
    idempotency.add_command(_command)
    main.add_command(_command)
