"""The FastAPI application. Its lifespan owns the DB engine, Redis/ARQ pool, blob store
and httpx client (core.runtime), built when the server starts, never at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.deps import KeyCache
from api.files import router as files_router
from api.jobs import router as jobs_router
from api.limits import BodyLimit
from api.meta import router as meta_router
from core.runtime import open_runtime
from core.settings import Settings
from storage import build_store


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.runtime = await open_runtime(s, stack, build_store(s))
            app.state.key_cache = KeyCache(s.key_cache_seconds)
            yield

    app = FastAPI(
        title="genroute",
        version="0.1.0",
        summary="One door to many AI generation providers: durable jobs, progress, outputs in your storage.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(jobs_router)
    app.include_router(meta_router)
    app.include_router(files_router)
    app.add_middleware(BodyLimit, max_bytes=s.max_body_bytes)
    return app


def app_factory() -> FastAPI:
    """For `uvicorn --factory api.app:app_factory`."""
    return create_app()
