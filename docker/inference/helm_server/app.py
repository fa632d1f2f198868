"""FastAPI routes: HELM's `neurips/local` endpoints plus `/health`.

Model handlers are plain `def`, run in FastAPI's thread pool; a lock keeps
the model to one request at a time, so concurrent clients are served in turn.
At most `server.max_queue` requests wait; one more is answered 503 with
`Retry-After` at once, instead of piling up threads. `/health` is `async`: it
runs on the event loop and answers even when every worker thread waits.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager, contextmanager
from typing import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .api import (
    DecodeRequest,
    DecodeResponse,
    HealthResponse,
    ProcessRequest,
    ProcessResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from .engine import Engine
from .service import CompletionService, RequestError
from .settings import ServeConfig

log = logging.getLogger("helm_server")

EngineFactory = Callable[[ServeConfig], Engine]


def _default_engine(config: ServeConfig) -> Engine:
    from .hf_engine import HFEngine  # imported late: torch is slow to import

    return HFEngine.from_config(config)


def _readable(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


class Busy(Exception):
    """The wait queue is full (answered 503 with Retry-After)."""


class ModelGate:
    """One request on the model at a time, at most `max_queue` waiting behind it."""

    def __init__(self, max_queue: int) -> None:
        self.limit = max_queue + 1
        self.inside = 0
        self.count_lock = threading.Lock()
        self.model_lock = threading.Lock()

    @contextmanager
    def admit(self) -> Iterator[None]:
        with self.count_lock:
            if self.inside >= self.limit:
                raise Busy(f"{self.inside - 1} requests are already waiting for the model (server.max_queue)")
            self.inside += 1
        try:
            with self.model_lock:
                yield
        finally:
            with self.count_lock:
                self.inside -= 1


RETRY_AFTER_S = 2


def create_app(config: ServeConfig, engine_factory: EngineFactory = _default_engine) -> FastAPI:
    """Build the app; the model loads during startup, so /health is 200 only once it is ready."""
    state: dict[str, CompletionService] = {}
    gate = ModelGate(config.server.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine = engine_factory(config)
        state["service"] = CompletionService(engine, config.generation)
        log.info("ready: submission %s, model %s", config.submission, config.model.repo_id)
        yield
        state.clear()

    app = FastAPI(title=f"{config.submission} (HELM neurips/local)", lifespan=lifespan)

    def service() -> CompletionService:
        if "service" not in state:
            raise RequestError("the model is still loading; retry when GET /health answers 200")
        return state["service"]

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(Busy)
    async def _busy(_: Request, exc: Busy) -> JSONResponse:
        return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                            content={"detail": f"busy: {exc}; retry after {RETRY_AFTER_S} s"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": _readable(exc)})

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}: {exc}"})

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = "service" in state
        body = HealthResponse(
            status="ok" if ready else "loading",
            submission=config.submission,
            model=config.model.repo_id,
            adapter=config.adapter.repo_id if config.adapter else None,
        )
        return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())

    @app.post("/process")
    def process(req: ProcessRequest) -> ProcessResponse:
        svc = service()
        with gate.admit():
            outcome = svc.process(req)
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

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        svc = service()
        with gate.admit():
            return svc.tokenize(req)

    @app.post("/decode")
    def decode(req: DecodeRequest) -> DecodeResponse:
        svc = service()
        with gate.admit():
            return svc.decode(req)

    return app
