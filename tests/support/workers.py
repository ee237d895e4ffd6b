"""Real ``celery worker`` processes, each in its own process group so that a test (or a
benchmark) can kill the whole group (parent and prefork children) and nothing outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """``celery -A APP worker``. Ready when its log says `` ready.`` (needs ``loglevel`` INFO),
    or, given ``ready_file``, once the app's ``worker_ready`` handler has created that file."""

    def __init__(self, app: str, env: dict[str, str], *, pool: str = "prefork",
                 concurrency: int = 2, queues: str | None = None, name: str = "w1",
                 log: Path | None = None, loglevel: str = "INFO",
                 ready_file: Path | None = None) -> None:
        self.app = app
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.pool = pool
        self.concurrency = concurrency
        self.queues = queues
        self.name = name
        self.log = log
        self.loglevel = loglevel
        self.ready_file = ready_file
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None

    def start(self, *, wait_ready: float = 30.0) -> Worker:
        command = [sys.executable, "-m", "celery", "-A", self.app, "worker", "-P", self.pool,
                   "-c", str(self.concurrency), "-n", f"{self.name}@%h",
                   "--loglevel", self.loglevel,
                   "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if self.queues:
            command += ["-Q", self.queues]
        log_path = self.log or Path(f"/tmp/idem-worker-{self.name}-{os.getpid()}.log")
        self.log = log_path
        self._log_handle = log_path.open("ab")
        self.process = subprocess.Popen(command, env=self.env, cwd=ROOT,
                                        stdout=self._log_handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            if self.ready():
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"worker not ready after {wait_ready} s:\n{self.output()[-3000:]}")

    def ready(self) -> bool:
        if self.ready_file is not None:
            return self.ready_file.exists()
        return " ready." in self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker and its pool children."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a warm shutdown), SIGKILL after ``timeout`` seconds; closes the log."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log_handle:
            self._log_handle.close()
        self.process = None
