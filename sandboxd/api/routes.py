"""The Sandboxes API: the spec's seven endpoints under /v1/sandboxes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from sandboxd.api.auth import require_caller
from sandboxd.api.bodies import read_model
from sandboxd.api.processes import EXEC_RESPONSES, exec_blocking, exec_special
from sandboxd.api.schemas import (
    CancelResponse,
    CreateSandboxRequest,
    CreateSandboxResponse,
    DestroyResponse,
    ErrorBody,
    ExecRequest,
    ExecResponse,
    LogsResponse,
    PartialList,
    SandboxDetail,
    SandboxSummary,
)
from sandboxd.controlplane.service import Caller, SandboxService
from sandboxd.errors import BadRequest
from sandboxd.store.models import Sandbox

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])
CallerDep = Annotated[Caller, Depends(require_caller)]
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 501, 502, 503)}


def _service(request: Request) -> SandboxService:
    return request.app.state.service


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if value else None


def _summary(sandbox: Sandbox) -> dict:
    return {
        "vm_id": sandbox.id,
        "state": sandbox.state,
        "vcpu": sandbox.vcpu,
        "cpu_fraction": sandbox.cpu_fraction,
        "memory_mib": sandbox.memory_mib,
        "runtime": sandbox.runtime,
        "metadata": {**sandbox.metadata_, "user_id": sandbox.user_id},
    }


def _detail(sandbox: Sandbox) -> dict:
    detail = _summary(sandbox)
    detail["metadata"] = dict(sandbox.metadata_)
    detail.update(
        template=sandbox.template,
        runtime=sandbox.runtime,
        rootfs=sandbox.rootfs,
        host_port=sandbox.host_port,
        endpoint=sandbox.endpoint,
        created_at=_iso(sandbox.created_at),
        idle_timeout_seconds=sandbox.idle_timeout_seconds,
        max_lifetime_seconds=sandbox.max_lifetime_seconds,
        expires_at=_iso(sandbox.created_at + timedelta(seconds=sandbox.max_lifetime_seconds)),
    )
    if sandbox.agent is not None:
        detail.update(agent=sandbox.agent, agent_status=sandbox.agent_status)
        if sandbox.agent_exit_code is not None:
            detail["agent_exit_code"] = sandbox.agent_exit_code
    if sandbox.state == "destroyed":
        detail.update(destroyed_at=_iso(sandbox.destroyed_at), reason=sandbox.destroy_reason)
    return detail


@router.post(
    "",
    status_code=201,
    response_model=CreateSandboxResponse,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": CreateSandboxRequest.model_json_schema()}},
        }
    },
)
async def create_sandbox(request: Request, caller: CallerDep):
    """Create a sandbox; answers once it is running and its guest agent answers."""
    body = await read_model(request, CreateSandboxRequest)
    sandbox = await _service(request).create(caller, body)
    return JSONResponse(
        {"vm_id": sandbox.id, "state": sandbox.state, "host_port": sandbox.host_port, "endpoint": sandbox.endpoint},
        status_code=201,
    )


@router.get("", response_model=list[SandboxSummary] | PartialList, responses=ERRORS)
async def list_sandboxes(request: Request, caller: CallerDep):
    """The caller's live sandboxes; `{sandboxes, partial: true}` when a worker cannot answer."""
    sandboxes, partial = await _service(request).list(caller)
    summaries = [_summary(s) for s in sandboxes]
    if partial:
        return {"sandboxes": summaries, "partial": True}
    return summaries


@router.get("/{vm_id}", response_model=SandboxDetail, response_model_exclude_none=True, responses=ERRORS)
async def get_sandbox(vm_id: str, request: Request, caller: CallerDep):
    return _detail(await _service(request).get(caller, vm_id))


@router.post(
    "/{vm_id}/exec",
    response_model=ExecResponse,
    responses={**ERRORS, **EXEC_RESPONSES},
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": ExecRequest.model_json_schema()}}}
    },
)
async def exec_command(vm_id: str, request: Request, caller: CallerDep):
    """Run `/bin/sh -c command` in /workspace and wait for it (default timeout 60 s).

    With `Accept: text/event-stream` the output streams as Server-Sent Events (`stdout`,
    `stderr`, then `exit`); a client that disconnects kills the command. With
    `background: true` it answers 202 with the process at once (see /processes)."""
    body = await read_model(request, ExecRequest)
    if body.background or "text/event-stream" in request.headers.get("accept", "").lower():
        return await exec_special(request, caller, vm_id, body)
    return await exec_blocking(request, caller, vm_id, body)


@router.delete("/{vm_id}", response_model=DestroyResponse, responses=ERRORS)
async def destroy_sandbox(vm_id: str, request: Request, caller: CallerDep):
    """Synchronous: every process, mount, cgroup and network resource is gone when it answers."""
    sandbox = await _service(request).destroy(caller, vm_id)
    return {"vm_id": sandbox.id, "state": sandbox.state}


@router.get("/{vm_id}/logs", response_model=LogsResponse, responses=ERRORS)
async def get_logs(
    vm_id: str,
    request: Request,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    since: str | None = None,
):
    """The most recent `limit` log lines after `since`, oldest first."""
    since_at = _parse_since(since)
    result = await _service(request).logs(caller, vm_id, since_at, limit)
    return {"vm_id": vm_id, "entries": result["entries"], "truncated": result["truncated"]}


def _parse_since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadRequest(
            f"since: {value!r} is not an ISO 8601 timestamp (e.g. 2026-01-31T12:00:00Z)",
            code="invalid_value",
            field="since",
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@router.post("/{vm_id}/cancel", response_model=CancelResponse, responses=ERRORS)
async def cancel_sandbox(vm_id: str, request: Request, caller: CallerDep):
    """Ask the sandbox's agent to stop; it decides how. DELETE destroys the sandbox instead."""
    return await _service(request).cancel(caller, vm_id)
