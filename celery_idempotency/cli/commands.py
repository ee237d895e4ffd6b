"""The commands, shared by `celery -A proj idempotency` and `celery-idempotency`.

Human-readable output by default; ``--json`` for scripts: one JSON document on stdout, except
`list`, which writes JSON Lines (one object per record) so that any number of keys streams in
constant memory. Errors go to stderr, with the exit codes of `session`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..records import KeyState
from ..store import Entry
from ..store.eviction import MemoryPolicy
from . import query, render
from .durations import duration_option, format_duration
from .progress import Progress
from .session import NotFound, Refused, Session, UsageProblem
from .terminal import safe_text, shown

F = TypeVar("F", bound=Callable[..., Any])

STATE_NAMES = [state.value for state in KeyState]


def _json_option(help_text: str) -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, help=help_text)


def _scope_filter(command: F) -> F:
    return click.option("--scope", "scopes", multiple=True, metavar="SCOPE",
                        help="Only this scope (by default the task name); repeatable.")(command)


def _state_filter(required: bool) -> Callable[[F], F]:
    return click.option("--state", "states", multiple=True, required=required,
                        type=click.Choice(STATE_NAMES), help="Only this state; repeatable.")


def _match_filter(command: F) -> F:
    return click.option(
        "--match", metavar="PATTERN",
        help="Only keys matching this shell pattern (*, ?, [seq]), case-sensitive, on the key "
             "as the client gave it. Applied while scanning: store key names are digests.",
    )(command)


def _progress_option(command: F) -> F:
    return click.option(
        "--progress/--no-progress", default=None,
        help="Report scan progress on stderr. Default: only when stderr is a terminal.",
    )(command)


def _scope_option(command: F) -> F:
    return click.option(
        "--scope", metavar="SCOPE",
        help="The key's scope. Optional when exactly one scope has the key (found by scanning "
             "the store; give it on big stores).")(command)


def _filter(states: tuple[str, ...] = (), scopes: tuple[str, ...] = (),
            match: str | None = None, stale: bool = False) -> query.Filter:
    return query.Filter(frozenset(KeyState(s) for s in states), frozenset(scopes), match, stale)


def _warn_undecodable(counter: query.ScanCounter) -> None:
    if counter.undecodable:
        skipped = render.plural(counter.undecodable, "undecodable record")
        click.echo(safe_text(f"warning: skipped {skipped}; first: {counter.first_error}"),
                   err=True)
    if counter.foreign:
        skipped = render.plural(counter.foreign, "key")
        click.echo(safe_text(f"warning: skipped {skipped} under the prefix that are not records "
                             f"of celery-idempotency; first: {counter.first_foreign}"), err=True)


def _locate(session: Session, key: str, scope: str | None) -> Entry:
    try:
        return query.locate(session.store(), key, scope)
    except query.KeyNotFound as exc:
        raise NotFound(f"{exc} (store {session.shown_url}, prefix {session.prefix!r})") from exc
    except query.AmbiguousKey as exc:
        raise UsageProblem(str(exc)) from exc


@click.command("list")
@_state_filter(required=False)
@_scope_filter
@_match_filter
@click.option("--stale", is_flag=True,
              help="Only stale claims: started, lease expired (the worker is gone).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Stop after N records.")
@_json_option("JSON Lines: one JSON object per record.")
@click.pass_context
def list_keys(ctx: click.Context, states: tuple[str, ...], scopes: tuple[str, ...],
              match: str | None, stale: bool, limit: int | None, as_json: bool) -> None:
    """List keys with state, scope, task id, age, lease and TTL.

    Streams the store with SCAN (never KEYS), in store order, in constant memory. LEASE reads
    "STALE ... ago" for a claim whose lease expired: no live worker owns it.
    """
    session = Session.of(ctx)
    store = session.store()
    now = store.now_ms()
    counter = query.ScanCounter()
    table = None if as_json else render.Table(render.TABLE_COLUMNS)
    shown = 0
    for entry in query.records(store, _filter(states, scopes, match, stale), now, counter):
        if table is None:
            click.echo(render.json_line(render.summary(entry, now)))
        else:
            table.add(render.row(entry, now))
        shown += 1
        if shown == limit:
            break
    if table is not None:
        table.close()
        if not shown:
            click.echo("no matching records", err=True)
    _warn_undecodable(counter)


@click.command("show")
@click.argument("key")
@_scope_option
@_json_option("One JSON object: the whole record, the result decoded.")
@click.pass_context
def show(ctx: click.Context, key: str, scope: str | None, as_json: bool) -> None:
    """Show the whole record of KEY: state, lease, owner, times, TTL, result or error.

    Only JSON results are decoded (other serializers could run code).
    """
    session = Session.of(ctx)
    entry = _locate(session, key, scope)
    now = session.store().now_ms()
    click.echo(render.json_document(render.details(entry, now)) if as_json
               else render.show_text(entry, now))


@click.command("stats")
@_scope_filter
@_progress_option
@_json_option("One JSON object.")
@click.pass_context
def stats(ctx: click.Context, scopes: tuple[str, ...], progress: bool | None,
          as_json: bool) -> None:
    """Count records per state, stale leases, the oldest record, and estimate memory.

    Memory: Redis MEMORY USAGE of a random sample of records, times the count.
    """
    session = Session.of(ctx)
    store = session.store()
    started = time.monotonic()
    now = store.now_ms()
    reporter = Progress("stats", progress)
    try:
        result = query.collect_stats(store, _filter(scopes=scopes), now, on_scanned=reporter)
    finally:
        reporter.done()
    elapsed = time.monotonic() - started
    oldest = result.oldest
    policies, policy_problem = query.memory_policies(store)
    if as_json:
        click.echo(render.json_document({
            "store": session.shown_url,
            "prefix": session.prefix,
            "records": result.total,
            "states": {state.value: count for state, count in result.states.items()},
            "stale_leases": result.stale,
            "undecodable": result.counter.undecodable,
            "foreign": result.counter.foreign,
            "scanned": result.counter.scanned,
            "eviction": None if policies is None else [{
                "server": policy.server, "maxmemory": policy.maxmemory,
                "maxmemory_policy": policy.policy, "evicted_keys": policy.evicted_keys,
                "may_evict_records": policy.evicts, "source": policy.source}
                for policy in policies],
            "eviction_unknown": policy_problem,
            "oldest": None if oldest is None else {
                "key": oldest.key, "scope": oldest.scope, "state": oldest.state.value,
                "created": render.iso(oldest.created_ms),
                "since": render.iso(oldest.since_ms),
                "age_s": render.seconds(now - oldest.since_ms)},
            "memory_bytes": result.memory_bytes,
            "memory_sampled": len(result.sample),
            "elapsed_s": round(elapsed, 3),
        }))
        return
    lines = [f"store:       {session.shown_url} (prefix {session.prefix!r})",
             f"records:     {result.total}"]
    for state, count in result.states.items():
        stale = render.plural(result.stale, "stale lease")
        extra = f"  ({stale})" if state is KeyState.STARTED else ""
        lines.append(f"  {state.value:<10} {count}{extra}")
    if result.counter.undecodable:
        lines.append(f"undecodable: {result.counter.undecodable}")
    if result.counter.foreign:
        lines.append(f"foreign:     {result.counter.foreign} (keys under the prefix that are "
                     "not records of celery-idempotency)")
    lines.extend(_eviction_lines(policies, policy_problem))
    if oldest is not None:
        lines.append(f"oldest:      '{shown(oldest.key)}' "
                     f"(scope '{shown(oldest.scope)}', {oldest.state.value}), "
                     f"{render.since_text(oldest, now)}")
    if result.memory_bytes is not None:
        lines.append(f"memory:      ~{render.size_text(result.memory_bytes)} (MEMORY USAGE of "
                     f"{render.plural(len(result.sample), 'sampled record')} x {result.total})")
    lines.append(f"scanned:     {render.plural(result.counter.scanned, 'record')} in "
                 f"{elapsed:.1f}s")
    click.echo(safe_text("\n".join(lines)))
    _warn_undecodable(result.counter)


def _eviction_lines(policies: list[MemoryPolicy] | None, problem: str | None) -> list[str]:
    """What each server does when full, and how many keys it has evicted (since its start)."""
    if problem is not None:
        return [f"eviction:    unknown: {shown(problem)}"]
    lines = []
    for policy in policies or ():
        limit = render.size_text(policy.maxmemory) if policy.maxmemory else "0 (no limit)"
        evicted = "?" if policy.evicted_keys is None else str(policy.evicted_keys)
        warning = "  MAY EVICT RECORDS" if policy.evicts else ""
        lines.append(f"eviction:    {shown(policy.server)}: maxmemory-policy {policy.policy}, "
                     f"maxmemory {limit}, evicted_keys {evicted}{warning}")
    return lines


@click.command("release")
@click.argument("key")
@_scope_option
@click.option("--force", is_flag=True,
              help="Also release a live claim or a cached result (still only if unchanged "
                   "since read).")
@_json_option("One JSON object describing what was released.")
@click.pass_context
def release(ctx: click.Context, key: str, scope: str | None, force: bool, as_json: bool) -> None:
    """Delete the record of KEY, so that the next publish runs the task again.

    Releases pending and failed records and stale claims. Refuses a live claim (a worker owns
    it) and a cached result unless --force. Compare-and-delete: a record that changed after it
    was read is left alone.
    """
    session = Session.of(ctx)
    store = session.store()
    record = _locate(session, key, scope).record
    assert record is not None  # located entries are decoded
    now = store.now_ms()
    outcome = query.release(store, record, now, force=force)
    name = f"key '{shown(record.key)}' (scope '{shown(record.scope)}')"
    status = query.ReleaseStatus
    if outcome.status is status.LIVE_CLAIM:
        left = format_duration((record.lease_expires_ms or 0) - now)
        raise Refused(f"refusing to release {name}: task {shown(record.task_id)} holds a live "
                       f"claim (owner {shown(record.owner or '-')}, lease expires in {left}); a "
                       "worker is running "
                       "it. Use --force to release it anyway (the task may then run twice).")
    if outcome.status is status.HAS_RESULT:
        raise Refused(f"refusing to release {name}: it holds the cached result of task "
                       f"{shown(record.task_id)}; releasing it lets the next publish run the task "
                       "again. Use --force to release it anyway.")
    if outcome.status is status.GONE:
        raise NotFound(f"{name} disappeared while being released (expired, or released by "
                       "someone else)")
    if outcome.status is status.CHANGED:
        current = outcome.now
        state = current.state.value if current else "?"
        raise Refused(f"{name} changed after it was read (it is now {state}, task "
                       f"{shown(current.task_id) if current else '?'}); nothing released. Look "
                       "again "
                       "with `show`.")
    stale = record.lease_expired(now)
    if as_json:
        click.echo(render.json_document({
            "released": True, "key": record.key, "scope": record.scope,
            "state": record.state.value, "stale": stale, "task_id": record.task_id,
            "forced": force}))
    else:
        what = "a stale claim" if stale else record.state.value
        click.echo(f"released {name}: it was {what} (task {shown(record.task_id)})")


@click.command("purge")
@_state_filter(required=True)
@click.option("--older-than", "older_than", callback=duration_option, required=True,
              metavar="DURATION",
              help="Only records last changed more than this long ago: 30s, 10m, 2h, 7d, "
                   "1h30m.")
@_scope_filter
@_match_filter
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@_progress_option
@_json_option("One JSON object with the counts.")
@click.pass_context
def purge(ctx: click.Context, states: tuple[str, ...], older_than: int, scopes: tuple[str, ...],
          match: str | None, yes: bool, dry_run: bool, progress: bool | None,
          as_json: bool) -> None:
    """Delete records in a state that last changed more than --older-than ago.

    Asks for confirmation (--yes skips it). Live claims are never purged; each record is
    deleted only if unchanged since it was read.
    """
    session = Session.of(ctx)
    store = session.store()
    wanted = _filter(states, scopes, match)
    if not (yes or dry_run):
        where = f" in scopes {', '.join(sorted(scopes))}" if scopes else ""
        keys = f" with keys matching {match!r}" if match else ""
        question = (f"Delete {'/'.join(sorted(states))} records{where}{keys} last changed more "
                    f"than {format_duration(older_than)} ago from {session.shown_url} (prefix "
                    f"{session.prefix!r})? Live claims are kept.")
        try:
            confirmed = click.confirm(question, default=False, err=True)
        except click.Abort:  # end of input: nobody to confirm
            confirmed = False
        if not confirmed:
            raise Refused("purge not confirmed; nothing deleted (--yes skips the question)")
    reporter = Progress("purge", progress)
    try:
        outcome = query.purge(store, wanted, older_than, store.now_ms(), dry_run=dry_run,
                              on_scanned=reporter)
    finally:
        reporter.done()
    if as_json:
        click.echo(render.json_document({
            "dry_run": dry_run, "matched": outcome.matched, "deleted": outcome.deleted,
            "changed": outcome.changed, "skipped_live": outcome.live,
            "undecodable": outcome.counter.undecodable, "foreign": outcome.counter.foreign,
            "scanned": outcome.counter.scanned}))
    else:
        if dry_run:
            message = f"would delete {render.plural(outcome.matched, 'record')} (dry run)"
        else:
            message = f"deleted {render.plural(outcome.deleted, 'record')}"
            if outcome.changed:
                message += f"; kept {outcome.changed} that changed meanwhile"
        if outcome.live:
            message += f"; skipped {render.plural(outcome.live, 'live claim')}"
        click.echo(message)
    _warn_undecodable(outcome.counter)


COMMANDS = (list_keys, show, stats, release, purge)
