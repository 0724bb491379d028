"""`phivault serve --workers N`: N server processes on one listening socket, kept at N.

A worker that dies (killed, crashed, out of memory) is replaced at once; one that exits with an
error before it ever served stops the service, since its replacement would fail the same way.
SIGTERM (or Ctrl-C) makes every worker drain (`web/server.py`) and exits 0; a second Ctrl-C
stops them at once and exits 130. Workers drain by themselves if the supervisor is killed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn

from phivault.observability import configure_logging, get_logger
from phivault.ops import metrics
from phivault.web.server import DRAIN_TIMEOUT, INTERRUPTED, PhivaultServer

log = get_logger("phivault.server")

# Each worker is a fresh interpreter (no state forked from the supervisor), as in uvicorn.
_spawn = multiprocessing.get_context("spawn")
# What a stop waits for beyond the drain: the workers' application shutdown.
_STOP_MARGIN = 15.0
# How long a forced stop waits for the workers before it kills them.
_FORCED_GRACE = 2.0
STARTUP_FAILED = 1


@dataclass(frozen=True)
class WorkerOptions:
    """What each worker needs besides uvicorn's config."""

    tls_handshake_timeout: float
    log_level: str


def _worker_main(config: uvicorn.Config, sockets: list[socket.socket], options: WorkerOptions,
                 started: Connection, supervisor_pid: int) -> None:
    configure_logging(options.log_level)
    server = PhivaultServer(config, tls_handshake_timeout=options.tls_handshake_timeout,
                            on_started=lambda: started.send(True), parent_pid=supervisor_pid)
    # A Ctrl-C before the server took the signals over: the stop is under way anyway.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)


@dataclass
class _Worker:
    process: BaseProcess
    started_pipe: Connection
    has_started: bool = field(default=False)
    announced: bool = field(default=False)

    def started(self) -> bool:
        """True once the worker has told it listens (read without blocking)."""
        if not self.has_started:
            with contextlib.suppress(EOFError, OSError):
                self.has_started = bool(self.started_pipe.poll() and self.started_pipe.recv())
        return self.has_started


class Supervisor:
    """Runs `workers` server processes on `sockets` until SIGTERM or Ctrl-C (see the module
    docstring). `run` returns the exit status."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], workers: int,
                 options: WorkerOptions) -> None:
        self.config = config
        self.sockets = sockets
        self.count = workers
        self.options = options
        self.workers: list[_Worker] = []
        self._signals: list[int] = []
        self._wake = threading.Event()

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        # One metrics directory for this server's workers (`ops/metrics.py`): each keeps its
        # values in files there, and a scrape of any worker adds them up. Set before the
        # workers start (they read it when they import prometheus-client); removed at the end.
        metrics_dir = tempfile.mkdtemp(prefix="phivault-metrics-")
        os.environ[metrics.MULTIPROC_ENV] = metrics_dir
        try:
            log.info("supervisor_started", pid=os.getpid(), workers=self.count)
            self.workers = [self._start() for _ in range(self.count)]
            failed = self._supervise()
            status = self._stop()
            return STARTUP_FAILED if failed else status
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.environ.pop(metrics.MULTIPROC_ENV, None)
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _on_signal(self, sig: int, _frame: FrameType | None) -> None:
        self._signals.append(sig)
        self._wake.set()

    def _start(self) -> _Worker:
        receiving, sending = _spawn.Pipe(duplex=False)
        process = _spawn.Process(
            target=_worker_main, name="phivault-worker",
            args=(self.config, self.sockets, self.options, sending, os.getpid()))
        process.start()
        sending.close()  # the worker holds its own end now
        log.info("worker_spawned", pid=process.pid)
        return _Worker(process, receiving)

    def _supervise(self) -> bool:
        """Keeps the workers at their number until a signal; True when one failed to start."""
        while not self._signals:
            self._wake.wait(0.5)
            self._wake.clear()
            if self._signals:
                break
            for index, worker in enumerate(self.workers):
                if worker.process.is_alive():
                    if not worker.announced and worker.started():
                        worker.announced = True
                        log.info("worker_serving", pid=worker.process.pid)
                    continue
                worker.process.join()
                # An exit status (not a signal) before the worker served is a failure its
                # replacement would repeat: configuration, import, bind.
                exit_code = worker.process.exitcode
                if not worker.started() and exit_code is not None and exit_code > 0:
                    log.error("worker_failed_to_start", pid=worker.process.pid,
                              exit_code=exit_code)
                    return True
                log.warning("worker_died", pid=worker.process.pid, exit_code=exit_code)
                if worker.process.pid is not None:
                    metrics.worker_died(worker.process.pid)
                worker.started_pipe.close()
                self.workers[index] = self._start()
        return False

    def _stop(self) -> int:
        """Drains every worker; a second Ctrl-C meanwhile stops them at once."""
        self._send(signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_TIMEOUT + _STOP_MARGIN
        forced = False
        while any(w.process.is_alive() for w in self.workers) and time.monotonic() < deadline:
            if not forced and signal.SIGINT in self._signals[1:]:
                forced = True
                log.warning("forced_exit")
                self._send(signal.SIGINT)  # a draining worker takes it as its second Ctrl-C
                deadline = min(deadline, time.monotonic() + _FORCED_GRACE)
            self._wake.wait(0.1)
            self._wake.clear()
        for worker in self.workers:
            if worker.process.is_alive():
                log.error("worker_killed", pid=worker.process.pid)
                worker.process.kill()
            worker.process.join()
            worker.started_pipe.close()
        log.info("supervisor_stopped", pid=os.getpid())
        return INTERRUPTED if forced else 0

    def _send(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, sig)
