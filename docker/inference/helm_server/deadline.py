"""A request's deadline and its cancellation, checked by the decode loop after every token.

A request gets `server.request_timeout_s` from its arrival: waiting for the model counts. Past it,
generation stops at the next token and the request is answered with what was generated (HELM can
use a shorter completion; the log says why it ended). A client that disconnects sets `cancelled`:
the model is freed at the next token and nothing is answered.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


class Cancelled(Exception):
    """The client went away; its generation was stopped."""


class WaitedTooLong(Exception):
    """The request's deadline passed before the model was free (answered 503 with Retry-After)."""


@dataclass
class Ticket:
    timeout_s: float
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float:
        return self.arrived + self.timeout_s

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.expired()

    def check(self) -> None:
        """Raise when the request must not start (or go on) on the model."""
        if self.cancelled.is_set():
            raise Cancelled("the client disconnected")
        if self.expired():
            raise WaitedTooLong(f"waited {time.monotonic() - self.arrived:.1f} s for the model, past "
                                f"server.request_timeout_s = {self.timeout_s:g}")


def unlimited() -> Ticket:
    """For callers without HTTP (tests, benchmarks): no deadline, never cancelled."""
    return Ticket(timeout_s=float("inf"))
