"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM, within seconds, at any stage.

A signal sets one process-wide flag, then does what the handler it replaced did (Python's SIGINT
handler raises ``KeyboardInterrupt``; inside a Prefect flow run, Prefect's SIGTERM handler raises its
``TerminationSignal``; the CLI's raises ``StopRequested``). So the main thread stops at once, and the
loops that run in worker threads (generation shards, ingest reads), which a signal never reaches,
check the flag (``check``) at every training step, generation batch and denoising step, and every
file read, and leave by raising ``StopRequested``: a ``KeyboardInterrupt``, so no ``except Exception``
swallows it and no task retries it. Without the flag, Python and Prefect wait for those threads to
finish their whole shard (or the interpreter waits for them at exit): the hang seen after SIGTERM.

What a stage finished stays on storage: training resumes from its last checkpoint, generation from
the shards written; locks are released on the way out.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger("indusfactory.stopping")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """The run was asked to stop (a signal): what is finished is kept, rerun to resume."""

    def __init__(self, signum: int | None = None, where: str = ""):
        self.signum = signum
        name = signal.Signals(signum).name if signum else "a stop request"
        super().__init__(f"stopped by {name}" + (f" during {where}" if where else ""))


_stop = threading.Event()
_signum: int | None = None


def request_stop(signum: int | None = None) -> None:
    """Ask every loop of this process to stop at its next check."""
    global _signum
    if not _stop.is_set():
        _signum = signum
        _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_signal() -> int | None:
    """The signal that asked to stop (None: none, or a stop asked without one)."""
    return _signum if _stop.is_set() else None


def check(where: str = "") -> None:
    """Raise ``StopRequested`` if a stop was asked: call it once per step, batch or file."""
    if _stop.is_set():
        raise StopRequested(_signum, where)


def pause(seconds: float, where: str = "") -> None:
    """Wait ``seconds``, or raise ``StopRequested`` as soon as a stop is asked (a wait that a stop cuts short)."""
    if _stop.wait(seconds):
        raise StopRequested(_signum, where)


def reset() -> None:
    """Forget a stop request (a new run in the same process, e.g. a test)."""
    global _signum
    _stop.clear()
    _signum = None
    _deliveries.clear()


Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
_deliveries: dict[int, int] = {}
_on_repeat: Callable[[int], None] | None = None
_delegating = threading.local()


def _chained(previous: Handler) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        outermost = not getattr(_delegating, "active", False)  # handlers of nested runs see one delivery once
        if outermost:
            _deliveries[signum] = _deliveries.get(signum, 0) + 1
            if signum == signal.SIGINT and _deliveries[signum] > 1 and _on_repeat is not None:
                _on_repeat(signum)  # a second Ctrl-C: the user insists
            if not _stop.is_set():
                log.warning(
                    "%s received: stopping (what is finished is kept; run again to resume)",
                    signal.Signals(signum).name,
                )
            request_stop(signum)
        if callable(previous):
            _delegating.active = True
            try:
                previous(signum, frame)
            finally:
                if outermost:
                    _delegating.active = False
        raise StopRequested(signum)

    return handler


@contextmanager
def stopping_on_signals(on_repeat: Callable[[int], None] | None = None, take_ignored: bool = False) -> Iterator[bool]:
    """While inside: SIGINT and SIGTERM set the stop flag, then run the handler they replace (which may
    raise its own exception: ``KeyboardInterrupt``, Prefect's ``TerminationSignal``); if it returns (or
    there was none), ``StopRequested`` is raised in the main thread. A signal ignored before (``SIG_IGN``:
    SIGINT of a command started in the background of a script) stays ignored unless ``take_ignored``
    (the CLI's: ``kill -INT`` of an unattended run must stop it too).

    ``on_repeat(signum)`` is called on a second SIGINT (the CLI's: stop the temporary Prefect API and
    exit at once). A second SIGTERM is not a repeat: Prefect sends one to itself once a flow run has
    handled the first. Outside the main thread nothing is installed (signals only reach the main
    thread); yields whether the handlers are installed. The handlers before are restored on the way out.
    """
    global _on_repeat
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    saved: dict[int, Handler] = {}
    saved_repeat = _on_repeat
    try:
        if on_repeat is not None:
            _on_repeat = on_repeat
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN and not take_ignored:
                continue
            saved[signum] = previous
            signal.signal(signum, _chained(None if previous == signal.SIG_IGN else previous))
        yield True
    finally:
        _on_repeat = saved_repeat
        for restored, previous in saved.items():
            signal.signal(restored, previous if previous is not None else signal.SIG_DFL)


def exit_code(signum: int | None) -> int:
    """The shell's exit status of a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + (signum or signal.SIGINT)


def hard_exit(signum: int) -> None:  # pragma: no cover - ends the process
    os._exit(exit_code(signum))
