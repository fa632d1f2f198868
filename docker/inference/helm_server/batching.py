"""Continuous batching: concurrent requests decoded together, each joining and leaving on its own.

One scheduler thread owns the model. Each turn of its loop (`Batcher._turn`):

1. `admit`: waiting requests take free rows, up to `server.max_batch`; those admitted together are
   prefilled together (`engine.open_all`: prefix reuse and side-by-side prefill in the static engine)
   between two decode steps. A request whose deadline passed or whose client left while waiting never
   runs (503 / 499, as at batch 1). With no row running, the scheduler first gives the clients it just
   answered up to `gather_s` to send their next requests (`_gather`): HELM's clients answered together
   come back together, and their prompts then share one prefill pass instead of one pass each.
2. `pick`: every running row samples and scores its next token with its own generator, then checks
   eos, its stop sequences, its max_tokens and its ticket (deadline, disconnect).
3. `retire`: a finished row is answered and its row freed at once.
4. `feed`: the remaining rows' tokens go through the model in one step (`engine.feed`).

Request threads only wait: `submit` enqueues (503 when `max_queue` requests already wait behind the
full batch) and blocks until the scheduler answers. A failure inside a step fails the rows in it,
never the server.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .deadline import Ticket
from .engine import Generation, SamplingParams, StopCheck

log = logging.getLogger("helm_server.batching")

GATHER_S = 0.005  # how long an idle scheduler waits for the clients it just answered (a few ms; a prefill is tens)


class Busy(Exception):
    """The wait queue is full (answered 503 with Retry-After)."""


class BatchingEngine(Protocol):
    """What the scheduler needs besides `Engine`: rows opened, fed a token per step, closed."""

    def open_all(self, requests: list[tuple[list[int], SamplingParams, StopCheck]]) -> list:
        """A row per request, or the exception that is that request's own."""
        ...

    def feed(self, rows: list, tokens: list[torch.Tensor]) -> None: ...

    def close(self, row) -> None: ...


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    should_stop: StopCheck
    ticket: Ticket
    done: threading.Event = field(default_factory=threading.Event)
    row: object = None
    result: Generation | None = None
    error: BaseException | None = None


class Batcher:
    """The scheduler: at most `rows` requests decoding, at most `max_queue` more waiting."""

    def __init__(self, engine: BatchingEngine, rows: int, max_queue: int, gather_s: float = GATHER_S) -> None:
        self.engine, self.rows, self.max_queue, self.gather_s = engine, rows, max_queue, gather_s
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.inside = 0  # submitted and not yet answered: running + waiting
        self.closed = False
        self.returning = 0  # clients answered that have not sent another request yet (likely to)
        self.steps = 0  # decode steps run, and the most rows one of them fed (for tests and logs)
        self.widest = 0
        self.thread = threading.Thread(target=self._loop, name="helm-batcher", daemon=True)
        self.thread.start()

    # --- request threads --------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, should_stop: StopCheck,
               ticket: Ticket) -> Generation:
        """Decode one request in the running batch; raises Busy, WaitedTooLong, Cancelled or the engine's error."""
        job = Job(prompt_ids, params, should_stop, ticket)
        with self.cond:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            if self.inside >= self.rows + self.max_queue:
                raise Busy(f"{self.inside - self.rows} requests are already waiting for the model (server.max_queue)")
            self.inside += 1
            self.returning = max(0, self.returning - 1)
            self.waiting.append(job)
            self.cond.notify()
        try:
            job.done.wait()
        finally:
            with self.cond:
                self.inside -= 1
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # --- the scheduler thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.waiting and not self.running:
                    self.cond.wait()
                if self.closed:
                    for job in list(self.waiting) + self.running:
                        self._answer(job, error=RuntimeError("the server is shutting down"))
                    self.waiting.clear()
                    return
                self._gather()
                if self.closed:  # closed while gathering: the next turn of the loop answers everyone
                    continue
                admitted = self._admit()
            try:
                with torch.inference_mode():  # as the batch-1 path: picks and steps never track gradients
                    self._turn(admitted)
            except BaseException as e:  # noqa: BLE001 - a bug here must fail requests, never kill the scheduler
                log.exception("batch step failed")
                for job in self.running + admitted:  # an admitted job may be running: answered once
                    if not job.done.is_set():
                        self._answer(job, error=e)
                self.running = []

    def _gather(self) -> None:
        """Under the lock, with requests waiting: while no row runs (nothing to hold up), wait up to `gather_s`
        for the clients answered to send their next requests, or for a full batch. A lone client never waits;
        clients that do not come back in time are not waited for again."""
        if self.running:
            return
        if not self.cond.wait_for(lambda: self.closed or not self.returning or len(self.waiting) >= self.rows,
                                  timeout=self.gather_s):
            self.returning = 0

    def _admit(self) -> list[Job]:
        """Under the lock: drop waiting requests that may no longer run, take the next ones in order."""
        for job in list(self.waiting):
            try:
                job.ticket.check()
            except Exception as e:  # noqa: BLE001 - WaitedTooLong or Cancelled, answered as at batch 1
                self.waiting.remove(job)
                self._answer(job, error=e)
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.rows:
            admitted.append(self.waiting.popleft())
        return admitted

    def _turn(self, admitted: list[Job]) -> None:
        if admitted:  # prefilled together, between two decode steps
            try:
                opened = self.engine.open_all([(job.prompt_ids, job.params, job.should_stop) for job in admitted])
            except Exception as e:  # noqa: BLE001 - an engine that failed them all: each is answered, never lost
                opened = [e] * len(admitted)
            for job, row in zip(admitted, opened):
                if isinstance(row, BaseException):  # the request's own failure (422/500), not the batch's
                    self._answer(job, error=row)
                else:
                    job.row = row
                    self.running.append(job)
        feeding, tokens = [], []
        for job in self.running:
            try:
                token = job.row.decoding.pick()
            except Exception as e:  # noqa: BLE001 - a stop check or sampler failing is that request's
                self._answer(job, error=e)
                continue
            if token is None:
                self._answer(job)
            else:
                feeding.append(job)
                tokens.append(token)
        self.running = feeding
        if feeding:
            self.steps += 1
            self.widest = max(self.widest, len(feeding))
            self.engine.feed([job.row for job in feeding], tokens)

    def _answer(self, job: Job, error: BaseException | None = None) -> None:
        """Free the request's row and wake its thread: with its result, or its error."""
        try:
            if error is None:
                job.result = job.row.result()
        except Exception as e:  # noqa: BLE001
            error = e
        finally:
            if job.row is not None:
                self.engine.close(job.row)
            job.error = error
            if error is None:  # a client answered with an error (cancelled, timed out) may not come back
                with self.cond:
                    self.returning += 1
            job.done.set()
