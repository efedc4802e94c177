"""The FastAPI application: the guard middleware, the static files and one router per page and its API."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from retinafm.serve import jobs_api, models_api, pages, predict_api, runs_api
from retinafm.serve.config import ServeConfig
from retinafm.serve.security import guard


def create_app(config: ServeConfig) -> FastAPI:
    """The app for `config`. Its state: `config`, `models` (the checkpoint cache), `jobs` (the job queue,
    started and stopped with the app)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.jobs.start()
        try:
            yield
        finally:
            app.state.jobs.stop()

    # No /docs or /redoc: their pages load scripts from a CDN, and the app must work offline.
    app = FastAPI(title="retinafm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.config = config
    app.state.models = models_api.ModelCache(config)
    app.state.jobs = jobs_api.JobQueue(config)
    app.middleware("http")(guard(config))
    static = resources.files("retinafm.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    for module in (models_api, predict_api, runs_api, jobs_api, pages):
        app.include_router(module.router)
    return app
