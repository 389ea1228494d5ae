"""SIGTERM while a run or a population trains from Python.

``ntrl``'s CLI turns SIGTERM into an interrupt itself (records kept, one line, exit 143). A
Python program that calls :func:`ntrl.train.train` or :func:`ntrl.population.train_population`
and leaves SIGTERM at its default action (a batch scheduler's time limit, ``kill PID``) would
die at once, with no summary written for any run still training. :func:`sigterm_as_interrupt`
keeps that ending and only delays it: during the call, SIGTERM is raised as :class:`Terminated`
where the training loop is, which the loop takes as it takes Ctrl-C (the records so far flushed,
each run's summary written, "interrupted"); then one line goes to stderr and the process ends by
SIGTERM after all, as it would have (sys.stdout and sys.stderr flushed first; the program's
``finally`` blocks and ``atexit`` functions do not run, as they would not have). A second SIGTERM meanwhile ends it
at once. A SIGTERM that lands where Python can only print an exception (a finalizer, a weakref
callback) is sent again a moment later rather than lost. A program that handles SIGTERM itself,
or a call from a thread other than the main one, is left as it is.

For the CLI, whose handlers raise the interrupt themselves: :func:`raise_if_swallowed` raises
again, where ntrl's code runs on, an interrupt that a library caught and dropped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (or, in the CLI, SIGHUP), raised where the work is, to be handled as Ctrl-C is: the
    records kept, one line, and the process ends by the signal (exit 128 + its number in a shell)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the body: SIGTERM at its default action becomes :class:`Terminated`, and once the body
    has ended (it wrote what it keeps) the process ends by SIGTERM; see the module docstring."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    arrived: list[int] = []
    hooking: list[bool] = []  # inside the unraisable hook below
    closing: list[bool] = []  # the body has ended
    previous_hook = sys.unraisablehook

    def on_sigterm(signum: int, frame: object) -> None:
        if hooking:  # raised here it would be lost as well
            send_again(signum)
            return
        if arrived and not closing:  # the second: at once
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        arrived.append(signum)
        if not closing:  # else the clean-up below acts on it, once the handlers are put back
            raise Terminated()

    def on_unraisable(unraisable: object) -> None:
        hooking.append(True)
        try:
            if isinstance(getattr(unraisable, "exc_value", None), Terminated) and arrived:
                arrived.clear()  # lost where Python could only print it: once more, as the first
                send_again(signal.SIGTERM)
            else:
                previous_hook(unraisable)
        finally:
            hooking.clear()

    signal.signal(signal.SIGTERM, on_sigterm)
    sys.unraisablehook = on_unraisable
    error: BaseException | None = None
    try:
        yield
    except BaseException as e:
        error = e
        raise
    finally:
        # a SIGTERM now is noted, not raised, and held back while the handlers are put back: raised
        # here it would leave them installed
        closing.append(True)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if sys.unraisablehook is on_unraisable:
                sys.unraisablehook = previous_hook
            if arrived:
                end_by_sigterm(getattr(error, "message", None) if isinstance(error, KeyboardInterrupt) else None)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGTERM held back ends the process here


_RAISED: list[int] = []  # the signals whose interrupt ntrl's CLI handlers raised, not yet taken
_WATCHING: list[bool] = []  # a command runs (:func:`noting_raised`)


@contextlib.contextmanager
def noting_raised() -> Iterator[None]:
    """For the body, a CLI command: the interrupts that ntrl's handlers raise are noted
    (:func:`note_raised`), so that :func:`raise_if_swallowed` raises one again that no handler of
    ntrl's took. Outside a command nothing is noted: a notebook whose Ctrl-C its own code took
    (the CLI's handlers stay installed after ``cli.main``) does not stop a later study."""
    _RAISED.clear()
    _WATCHING.append(True)
    try:
        yield
    finally:
        _WATCHING.pop()
        _RAISED.clear()


def note_raised(signum: int) -> None:
    """A handler is about to raise ``signum``'s interrupt (:class:`Terminated`, or KeyboardInterrupt
    for SIGINT): inside :func:`noting_raised`, :func:`raise_if_swallowed` raises it again if no
    handler of ntrl's takes it."""
    if _WATCHING:
        _RAISED.append(signum)


def forget_raised() -> None:
    """The interrupts raised so far are taken: handled, or to be sent again (an interrupt that the
    unraisable hook sends again is noted when it arrives)."""
    _RAISED.clear()


def raise_if_swallowed() -> None:
    """Raise again an interrupt that a signal handler raised and that code then swallowed, so that
    the command stops after all rather than run on to its end. torch's C module imports numpy as
    it loads and, when that import fails, goes on without it: a SIGTERM that lands there, 1 s into
    ``ntrl rarity``, was lost so (a CI run: exit 0 and no line, the study run to its end; found
    again by sending it at 600 seeded points of the start-up). Called where ntrl's own code runs
    on normally (before a command's work starts, between a study's waits and after its last unit):
    an interrupt raised earlier would have left that code by an exception, so one still noted
    there was swallowed on the way."""
    if _RAISED:  # still noted: swallowed once more, it is raised again at the next such place
        raise KeyboardInterrupt if _RAISED[-1] == signal.SIGINT else Terminated()


def end_by_sigterm(said: str | None) -> None:
    """Flush sys.stdout and sys.stderr, print ntrl's one line (with ``said``, what the run kept)
    and end the process by SIGTERM, as its default action would have; whatever fails on the way
    (a closed stderr, a broken pipe), the process still ends so."""
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream: nothing of it to keep
                pass
        print(f"ntrl: terminated by SIGTERM{': ' + said if said else ''}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - the line is lost, not the ending
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        signal.raise_signal(signal.SIGTERM)


def send_again(signum: int) -> None:
    """Send ``signum`` to this process again 10 ms from now, from another thread (a signal raised
    where Python can only print the exception would be lost)."""
    timer = threading.Timer(0.01, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()
