"""Worker processes for `fmsearch study --jobs N` and `fmsearch confirm --jobs N`: spawned, tied to
their parent, stopped by Ctrl-C or SIGTERM.

Each worker runs its command's work loop on its own; the storage's gate (storage.Gate) keeps them,
and any other command's workers, from starting more than the study's trials, or from claiming the
same confirmation seed, between them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable

from fmsearch import storage
from fmsearch.errors import FmsearchError, StudyError


def _die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this worker when its parent dies: a kill -9 leaves no orphan."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc Linux: workers are daemons, which covers every exit but kill -9
        return
    libc.prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, systemd, a batch scheduler's time limit): stops the run as Ctrl-C does, so
    Optuna marks the running trials FAIL at once, and the command exits 143 (128 + 15)."""


def _terminate_once(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def catch_termination() -> None:
    """Have SIGTERM stop this process's trials the way Ctrl-C does (call from the main thread)."""
    signal.signal(signal.SIGTERM, _terminate_once)


def _interrupt_once(signum, frame) -> None:
    """The first Ctrl-C stops the trial (Optuna marks it FAIL); later ones must not cut that short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _catch_interrupts() -> None:
    """Have Ctrl-C stop a worker's trial, unless the command started with SIGINT ignored.

    A shell without job control starts `fmsearch study ... &` with SIGINT ignored, and Python then
    leaves the parent deaf to it. A worker that caught it anyway would stop while its parent carried
    on, and the parent would report its workers' exit status 130 as a failure (exit 1, not 130).
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupt_once)


def _worker(target: Callable[..., None], worker: int, storage_url: str, errors) -> None:
    """A worker process: its error goes back to the parent as one line (a bug: its traceback)."""
    _die_with_parent()
    _catch_interrupts()
    catch_termination()
    try:
        target(worker=worker)
    except KeyboardInterrupt as stop:
        raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None
    except FmsearchError as error:
        errors.put((worker, str(error), None))
        raise SystemExit(1) from None
    except Exception as error:
        if storage.is_fault(error):
            errors.put((worker, storage.fault_message(error, storage_url), None))
        else:
            errors.put((worker, f"{type(error).__name__}: {error}", traceback.format_exc()[-20000:]))
        raise SystemExit(1) from None


def run(target: Callable[..., None], jobs: int, storage_url: str) -> None:
    """Run `target(worker=i)` in `jobs` spawned processes until each returns; Ctrl-C stops them all.

    `target` must pickle (a module-level function, or a functools.partial of one). The first error a
    worker reports is raised here as a StudyError; a bug's traceback comes back as a RuntimeError.
    """
    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    workers = [
        context.Process(target=_worker, args=(target, i, storage_url, errors), daemon=True)
        for i in range(jobs)
    ]
    for process in workers:
        process.start()
    try:
        for process in workers:
            process.join()
    except KeyboardInterrupt as stop:
        # A terminal's Ctrl-C reached them too; a `kill` of this process alone did not: pass it on.
        passed_on = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
        for process in workers:
            if process.is_alive():
                os.kill(process.pid, passed_on)
        for process in workers:
            process.join(timeout=60)  # each marks its running trial FAIL, then exits
            if process.is_alive():
                process.kill()
                process.join()
        raise
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    if reported:
        worker, message, trace = reported[0]
        if trace is not None:
            raise RuntimeError(f"worker {worker} raised:\n{trace}")
        raise StudyError(message)
    failed = [p.exitcode for p in workers if p.exitcode != 0]
    if failed:
        raise StudyError(f"{len(failed)} of {jobs} workers exited with {failed}: rerun to resume")
