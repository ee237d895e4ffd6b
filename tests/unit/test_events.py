"""The protocol's events (`celery_idempotency.events`): forwarded to the public signals, and a
listener that raises never changes what the protocol does."""

from __future__ import annotations

from typing import Any

from celery_idempotency import events, signals


def test_an_event_with_a_signal_of_its_name_is_sent_as_that_signal() -> None:
    received: list[dict[str, Any]] = []

    def receiver(sender: Any, **fields: Any) -> None:
        received.append({"sender": sender, **fields})

    signals.key_claimed.connect(receiver, weak=False)
    try:
        events.announce(events.KEY_CLAIMED, "the-task", key="k", scope="s", task_id="t",
                        fence=7, took_over=False)
    finally:
        signals.key_claimed.disconnect(receiver)
    assert [(r["sender"], r["key"], r["fence"]) for r in received] == [("the-task", "k", 7)]


def test_a_listener_that_raises_is_skipped_and_the_others_still_hear() -> None:
    heard: list[str] = []

    def broken(event: str, sender: Any, fields: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    events.subscribe("test.broken", broken)
    events.subscribe("test.good", lambda event, sender, fields: heard.append(event))
    try:
        events.announce(events.CLAIM_BUSY, None, key="k", scope="s", task_id="t",
                        owner_task_id="o", delay=1.0)
    finally:
        events.unsubscribe("test.broken")
        events.unsubscribe("test.good")
    assert heard == [events.CLAIM_BUSY]
