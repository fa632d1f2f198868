"""The stops a user or a machine asks for: SIGINT (Ctrl-C), SIGTERM (`kill`, a preempted machine), SIGHUP (a
closed terminal), and a deadline.

By default (`raised`) each signal is an `Interrupted` exception, a KeyboardInterrupt: staged folders are
removed, the previous output stays, and the stage ends with one line. A loop that can stop cleanly asks for
`requested` instead: the first signal becomes a request the loop reads at its next safe point (between
micro-batches for training), so it can save where it is; a second signal raises at once, so a save in
progress is abandoned (a staged folder: the previous checkpoint stays whole).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
now = time.time  # the clock deadlines read (tests move it)


class Interrupted(KeyboardInterrupt):
    """A signal that ends the stage now; `status` is the shell's exit status for it (128 + the signal)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def status(self) -> int:
        return 128 + self.signum


class Stopped(Interrupted):
    """A signal the stage acted on cleanly (it saved where it was); `line` says what it kept."""

    def __init__(self, signum: int, line: str):
        super().__init__(signum)
        self.line = line


def status_of(stop: KeyboardInterrupt) -> int:
    return stop.status if isinstance(stop, Interrupted) else 128 + signal.SIGINT


def silence_closed_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails: send what was going to it to /dev/null,
    so saving is not derailed by a progress bar. Output already redirected to a file (nohup, a log) is kept."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


def _install(handler: Callable[[int, object], None]) -> dict[int, object]:
    return {s: signal.signal(s, handler) for s in SIGNALS}


def _restore(previous: dict[int, object]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


@contextmanager
def raised() -> Iterator[None]:
    """Every stop signal raises `Interrupted` (the default Python gives only SIGINT; SIGTERM and SIGHUP
    would end the process without removing its staging folders)."""

    def handler(signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            silence_closed_terminal()
        raise Interrupted(signum)

    previous = _install(handler)
    try:
        yield
    finally:
        _restore(previous)


class Requests:
    """What a clean-stopping loop polls: the first signal received (by name), or a passed deadline."""

    def __init__(self, deadline: "Deadline | None" = None):
        self.signum: int | None = None
        self.deadline = deadline

    @property
    def signalled(self) -> bool:
        return self.signum is not None

    def reason(self, next_seconds: float = 0.0) -> str | None:
        """Why to stop now, or None; `next_seconds` is how long the next piece of work should take
        (a deadline stops before work that would end past it)."""
        if self.signum is not None:
            return signal.Signals(self.signum).name
        if self.deadline is not None and self.deadline.passed(next_seconds):
            return f"the deadline ({self.deadline})"
        return None


@contextmanager
def requested(on_request: Callable[[str], None], deadline: "Deadline | None" = None) -> Iterator[Requests]:
    """The first stop signal is recorded (and `on_request` told its name) for the loop to act on; the next raises."""
    requests = Requests(deadline)

    def handler(signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            silence_closed_terminal()
        if requests.signum is not None:
            raise Interrupted(signum)
        requests.signum = signum
        on_request(signal.Signals(signum).name)

    previous = _install(handler)
    try:
        yield requests
    finally:
        _restore(previous)


def say(line: str) -> None:
    """A line on stderr that never fails (the terminal may be gone)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


class Deadline:
    """A wall-clock time to stop by: an ISO date-time (local time unless it names a zone) or a duration from
    now (`90m`, `6h`, `1h30m`, `45s`)."""

    def __init__(self, at: float, text: str):
        self.at, self.text = at, text

    @classmethod
    def parse(cls, text: str) -> "Deadline":
        text = text.strip()
        m = DURATION.match(text)
        if text and m and any(m.groups()):
            h, mi, s = (float(g) if g else 0.0 for g in m.groups())
            return cls(now() + h * 3600 + mi * 60 + s, text)
        try:
            return cls(datetime.fromisoformat(text).timestamp(), text)
        except ValueError:
            raise ValueError(f"deadline {text!r}: give a date-time (2026-12-02T18:00, local time unless it "
                             f"names a zone) or a duration from now (90m, 6h, 1h30m)") from None

    def passed(self, next_seconds: float = 0.0) -> bool:
        return now() + next_seconds >= self.at

    def __str__(self) -> str:
        return f"{self.text}, {datetime.fromtimestamp(self.at).isoformat(timespec='seconds')}"
