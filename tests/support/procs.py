"""Processes from /proc (no psutil): pool children of a worker, members of a process group,
whether a process is alive and who its parent is."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    state: str
    ppid: int
    pgid: int


def read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces or parentheses itself.
    fields = stat[stat.rindex(")") + 2:].split()
    return Proc(pid, fields[0], int(fields[1]), int(fields[2]))


def processes() -> list[Proc]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := read_proc(int(entry))) is not None:
            found.append(proc)
    return found


def alive(proc: Proc | None) -> bool:
    return proc is not None and proc.state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """Live children of ``pid`` (a prefork worker's pool processes)."""
    return sorted(p.pid for p in processes() if p.ppid == pid and alive(p))


def group_members(pgid: int) -> list[int]:
    return sorted(p.pid for p in processes() if p.pgid == pgid and alive(p))


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Until ``pid`` is dead (gone, or a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(read_proc(pid)):
            return True
        time.sleep(0.005)
    return False


def pid_alive(pid: int) -> bool:
    """``pid`` runs (it is neither gone nor a zombie)."""
    return alive(read_proc(pid))


def parent_of(pid: int) -> int:
    proc = read_proc(pid)
    if proc is None:
        raise ProcessLookupError(pid)
    return proc.ppid
