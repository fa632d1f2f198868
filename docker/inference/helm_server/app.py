"""FastAPI routes: HELM's `neurips/local` endpoints plus `/health`.

Model work runs in a worker thread. With `server.max_batch = 1` (the default) a
lock keeps the model to one request at a time, so concurrent clients are served
in turn; with more, a scheduler thread (`batching.py`) decodes up to max_batch
requests together, each joining and leaving the batch on its own. At most
`server.max_queue` requests wait; one more is answered 503 with `Retry-After`
at once, instead of piling up threads. Each request carries a ticket (`deadline.py`): its deadline
stops generation at the next token, and a watcher on the event loop cancels it
when the client disconnects. `/health` runs on the event loop and answers even
when every worker thread waits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager, contextmanager
from typing import Callable, Iterator, TypeVar

import anyio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .api import (
    DecodeRequest,
    DecodeResponse,
    ErrorResponse,
    HealthResponse,
    ProcessRequest,
    ProcessResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from .batching import Batcher, Busy
from .deadline import Cancelled, Ticket, WaitedTooLong
from .engine import Engine
from .service import CompletionService, RequestError
from .settings import ServeConfig

log = logging.getLogger("helm_server")

EngineFactory = Callable[[ServeConfig], Engine]


def _default_engine(config: ServeConfig) -> Engine:
    from .hf_engine import HFEngine, pick_device  # imported late: torch is slow to import

    name = engine_name(config.server.engine, pick_device(config.server.device).type)
    log.info("engine: %s (server.engine = %s)", name, config.server.engine)
    if name == "static":
        from .static_engine import StaticEngine

        return StaticEngine.from_config(config, fallback=config.server.engine == "auto")
    return HFEngine.from_config(config)


def engine_name(setting: str, device_type: str) -> str:
    """`auto` is the static engine on CUDA (CUDA graphs) and the HF engine on the CPU."""
    if setting != "auto":
        return setting
    return "static" if device_type == "cuda" else "hf"


def batcher_for(engine: Engine, config: ServeConfig) -> Batcher | None:
    """A batch scheduler when the spec asks for batching and the engine can run rows (both engines can)."""
    wanted = config.server.max_batch
    if wanted <= 1:
        return None
    if not all(hasattr(engine, name) for name in ("open", "feed", "close")):
        log.warning("server.max_batch = %d, but this engine decodes one request at a time", wanted)
        return None
    slots = getattr(engine, "slots", None)
    rows = min(wanted, len(slots.caches)) if slots is not None else wanted
    return Batcher(engine, rows, config.server.max_queue) if rows > 1 else None


def _readable(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


class ModelGate:
    """One request on the model at a time, at most `max_queue` waiting behind it."""

    def __init__(self, max_queue: int) -> None:
        self.limit = max_queue + 1
        self.inside = 0
        self.count_lock = threading.Lock()
        self.model_lock = threading.Lock()

    @contextmanager
    def admit(self, ticket: Ticket) -> Iterator[None]:
        """Wait for the model while the ticket allows: a cancelled or expired request never runs."""
        with self.count_lock:
            if self.inside >= self.limit:
                raise Busy(f"{self.inside - 1} requests are already waiting for the model (server.max_queue)")
            self.inside += 1
        try:
            while not self.model_lock.acquire(timeout=0.05):
                ticket.check()
            try:
                ticket.check()
                yield
            finally:
                self.model_lock.release()
        finally:
            with self.count_lock:
                self.inside -= 1


RETRY_AFTER_S = 2
CLIENT_CLOSED = 499
# What the OpenAPI schema promises besides 200 (fuzzed against it in tests/test_fuzz.py).
REFUSALS = {400: {"model": ErrorResponse, "description": "a body that is not JSON"},
            422: {"model": ErrorResponse, "description": "a field over a limit, or a request that cannot be served"},
            503: {"model": ErrorResponse, "description": "busy, or its deadline passed while waiting; see Retry-After"},
            CLIENT_CLOSED: {"model": ErrorResponse, "description": "the client disconnected; generation stopped"}}  # nginx's "client closed request": nobody reads it, the log does
T = TypeVar("T")


async def on_model(request: Request, gate: ModelGate | None, timeout_s: float, work: Callable[[Ticket], T]) -> T:
    """Run `work` in a worker thread, cancelling it if the client disconnects.

    `gate`: the model is held for the whole of `work` (batch 1). None: `work` queues for the
    model itself (the batch scheduler) or does not need it (/tokenize, /decode with batching on)."""
    ticket = Ticket(timeout_s)

    async def watch() -> None:
        while not ticket.cancelled.is_set():
            if await request.is_disconnected():
                ticket.cancelled.set()
                return
            await asyncio.sleep(0.05)

    def run() -> T:
        if gate is None:
            ticket.check()
            return work(ticket)
        with gate.admit(ticket):
            return work(ticket)

    watcher = asyncio.create_task(watch())
    try:
        return await anyio.to_thread.run_sync(run)
    finally:
        watcher.cancel()


def create_app(config: ServeConfig, engine_factory: EngineFactory = _default_engine) -> FastAPI:
    """Build the app; the model loads during startup, so /health is 200 only once it is ready."""
    state: dict[str, CompletionService] = {}
    gates: dict[str, ModelGate | None] = {"model": ModelGate(config.server.max_queue)}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine = engine_factory(config)
        batcher = batcher_for(engine, config)
        state["service"] = CompletionService(engine, config.generation, batcher.submit if batcher else None)
        if batcher is not None:
            gates["model"] = None  # the scheduler queues and bounds /process; /tokenize and /decode skip the model
        log.info("ready: submission %s, model %s, %s", config.submission, config.model.repo_id,
                 f"batching up to {batcher.rows} requests" if batcher else "one request at a time")
        try:
            yield
        finally:
            state.clear()
            if batcher is not None:
                batcher.close()

    app = FastAPI(title=f"{config.submission} (HELM neurips/local)", lifespan=lifespan)

    def service() -> CompletionService:
        if "service" not in state:
            raise RequestError("the model is still loading; retry when GET /health answers 200")
        return state["service"]

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    def retry_later(what: str, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                            content={"detail": f"{what}: {exc}; retry after {RETRY_AFTER_S} s"})

    @app.exception_handler(WaitedTooLong)
    async def _waited(_: Request, exc: WaitedTooLong) -> JSONResponse:
        return retry_later("timed out", exc)

    @app.exception_handler(Cancelled)
    async def _cancelled(_: Request, exc: Cancelled) -> JSONResponse:
        log.info("request cancelled: %s", exc)
        return JSONResponse(status_code=CLIENT_CLOSED, content={"detail": str(exc)})

    @app.exception_handler(Busy)
    async def _busy(_: Request, exc: Busy) -> JSONResponse:
        return retry_later("busy", exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": _readable(exc)})

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}: {exc}"})

    @app.get("/health", responses={503: {"model": HealthResponse, "description": "the model is still loading"}})
    async def health() -> JSONResponse:
        ready = "service" in state
        body = HealthResponse(
            status="ok" if ready else "loading",
            submission=config.submission,
            model=config.model.repo_id,
            adapter=config.adapter.repo_id if config.adapter else None,
        )
        return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())

    timeout_s = config.server.request_timeout_s

    @app.post("/process", responses=REFUSALS)
    async def process(req: ProcessRequest, request: Request) -> ProcessResponse:
        svc = service()
        outcome = await on_model(request, gates["model"], timeout_s, lambda ticket: svc.process(req, ticket))
        seconds = outcome.response.request_time
        log.info(
            "process: %d prompt tokens, %d new tokens (%s), %.3f s, %.1f tokens/s",
            outcome.prompt_tokens,
            outcome.new_tokens,
            outcome.finish_reason,
            seconds,
            outcome.new_tokens / seconds if seconds > 0 else 0.0,
        )
        return outcome.response

    @app.post("/tokenize", responses=REFUSALS)
    async def tokenize(req: TokenizeRequest, request: Request) -> TokenizeResponse:
        svc = service()
        return await on_model(request, gates["model"], timeout_s, lambda _: svc.tokenize(req))

    @app.post("/decode", responses=REFUSALS)
    async def decode(req: DecodeRequest, request: Request) -> DecodeResponse:
        svc = service()
        return await on_model(request, gates["model"], timeout_s, lambda _: svc.decode(req))

    return app
