"""The ASGI application: control plane, optional in-process local worker, reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from sandboxd import __version__
from sandboxd.api.canvas import router as canvas_router
from sandboxd.api.desktop import router as desktop_router
from sandboxd.api.errors import install_error_handlers
from sandboxd.api.files import router as files_router
from sandboxd.api.processes import router as processes_router
from sandboxd.api.proxy import router as proxy_router
from sandboxd.api.routes import router
from sandboxd.api.workers import router as workers_router
from sandboxd.config import Settings
from sandboxd.controlplane.reaper import run_reaper
from sandboxd.controlplane.service import SandboxService
from sandboxd.store.repo import Store

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = Store(settings.effective_database_url)
        await store.open()
        service = SandboxService(settings, store)
        app.state.service = service
        worker = None
        if settings.local_worker:
            from sandboxd.worker.manager import LocalWorker

            worker = LocalWorker(settings)
            await worker.start()
            await service.register_worker(worker)
        reaper = asyncio.create_task(run_reaper(service, settings.reaper_interval_seconds))
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await service.activity.flush()
            if worker is not None:
                await worker.stop()
            await store.close()

    app = FastAPI(
        title="sandboxd",
        version=__version__,
        description="Self-hostable sandboxes for AI agents: the Sandboxes API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(proxy_router)  # ports and preview links
    app.include_router(files_router)
    app.include_router(processes_router)  # streaming exec, processes, PTY
    app.include_router(desktop_router)  # the cua template's desktop
    app.include_router(canvas_router)  # the canvas template's renderer
    app.include_router(workers_router)  # remote workers register and heartbeat

    @app.get("/healthz", tags=["service"])
    async def healthz():
        return {"status": "ok", "version": __version__}

    return app
