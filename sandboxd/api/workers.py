"""Where remote workers register and heartbeat (Bearer worker token; README: Many hosts).

    POST /v1/workers/register   {"worker_id", "url", "secret"} -> {"worker_id", "heartbeat_interval_seconds"}
    POST /v1/workers/heartbeat  {"worker_id", "secret_sha256"} -> 200, or 409 not_registered
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from sandboxd.api.bodies import read_model
from sandboxd.controlplane.workers import WorkerRegistry

router = APIRouter(prefix="/v1/workers", include_in_schema=False)


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    worker_id: str = Field(max_length=32)
    url: str = Field(max_length=255)
    secret: str = Field(max_length=256)


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    worker_id: str = Field(max_length=32)
    secret_sha256: str = Field(max_length=64)


def _registry(request: Request) -> WorkerRegistry:
    state = request.app.state
    registry = getattr(state, "worker_registry", None)
    if registry is None or registry.service is not state.service:
        registry = state.worker_registry = WorkerRegistry(state.service)
    return registry


def _token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


@router.post("/register")
async def register(request: Request):
    registry = _registry(request)
    token = await registry.authenticate(_token(request))
    body = await read_model(request, Registration)
    return await registry.register(token, body.worker_id, body.url, body.secret)


@router.post("/heartbeat")
async def heartbeat(request: Request):
    registry = _registry(request)
    token = await registry.authenticate(_token(request))
    body = await read_model(request, Heartbeat)
    return await registry.heartbeat(token, body.worker_id, body.secret_sha256)
