"""Scan progress on stderr, for commands that read the whole store (`stats`, `purge`)."""

from __future__ import annotations

import sys
import time

import click

EVERY = 100_000  # records between two progress lines when stderr is not a terminal


class Progress:
    """On a terminal: one line redrawn a few times a second, erased at the end. Elsewhere:
    nothing, unless asked for (``--progress``): then one line every `EVERY` records."""

    def __init__(self, label: str, enabled: bool | None) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.enabled = self.tty if enabled is None else enabled
        self.started = time.monotonic()
        self._next_draw = 0.0
        self._drawn = False

    def __call__(self, scanned: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            if scanned % 1000:
                return
            now = time.monotonic()
            if now >= self._next_draw:
                self._next_draw = now + 0.2
                click.echo(f"\r{self.label}: {scanned:,} records scanned", err=True, nl=False)
                self._drawn = True
        elif scanned % EVERY == 0:
            elapsed = time.monotonic() - self.started
            click.echo(f"{self.label}: {scanned:,} records scanned ({elapsed:.1f}s)", err=True)

    def done(self) -> None:
        if self._drawn:
            click.echo("\r\x1b[K", err=True, nl=False)
            self._drawn = False
