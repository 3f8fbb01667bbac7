"""The Files API: a sandbox's own filesystem under /v1/sandboxes/{id}/files.

Single files move as raw byte streams (PUT/GET), directories as tar streams; metadata
operations are JSON. Paths are relative to /workspace unless absolute, and always resolve
inside the sandbox (the guest agent opens them from within). Errors are the usual
`{"error": {"code", "message", "field"}}`.
"""

from __future__ import annotations

import posixpath
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from sandboxd.api.auth import require_caller
from sandboxd.api.bodies import read_model
from sandboxd.api.schemas import ErrorBody, StrictModel
from sandboxd.controlplane.files import FileService, check_bool, check_depth, check_mode, check_path
from sandboxd.controlplane.service import Caller

router = APIRouter(prefix="/v1/sandboxes", tags=["files"])
CallerDep = Annotated[Caller, Depends(require_caller)]
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 502, 503)}
PathQ = Annotated[str | None, Query(description="File path; relative paths are relative to /workspace")]


class FileInfo(StrictModel):
    name: str
    path: str
    type: str = Field(description="file, dir, symlink or other")
    size: int
    mode: str = Field(description="permission bits in octal, e.g. 0644")
    mtime: str
    target: str | None = Field(default=None, description="a symlink's target")


class FileList(StrictModel):
    path: str
    entries: list[FileInfo]
    truncated: bool


class MkdirRequest(StrictModel):
    path: str
    parents: bool = False
    mode: str | None = Field(default=None, description="octal, default 0755")
    exist_ok: bool | None = Field(default=None, description="default: same as parents")


class RemoveRequest(StrictModel):
    path: str
    recursive: bool = False


class RenameRequest(StrictModel):
    model_config = {**StrictModel.model_config, "populate_by_name": False}
    from_: str = Field(alias="from")
    to: str
    overwrite: bool = False


class RemoveResponse(StrictModel):
    path: str
    removed: bool


class TarUploadResponse(StrictModel):
    path: str
    files: int
    dirs: int
    links: int
    bytes: int


def _files(request: Request) -> FileService:
    service = request.app.state.service
    files = getattr(service, "files", None)
    if files is None:
        files = service.files = FileService(service)
    return files


def _json_body(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _raw_body(media: str, description: str) -> dict:
    return {"requestBody": {"required": True, "description": description,
                            "content": {media: {"schema": {"type": "string", "format": "binary"}}}}}


def _raw_answer(media: str, description: str) -> dict:
    return {200: {"description": description, "content": {media: {"schema": {"type": "string", "format": "binary"}}}},
            **ERRORS}


@router.get("/{vm_id}/files", responses=_raw_answer("application/octet-stream", "The file's bytes, streamed"),
            response_class=StreamingResponse)
async def download_file(vm_id: str, request: Request, caller: CallerDep, path: PathQ = None):
    """Download one regular file as a raw byte stream (`X-File-Size`, `X-File-Mode`, `X-File-Mtime`)."""
    path = check_path(path)
    headers, chunks = await _files(request).open(caller, vm_id, "/files", {"path": path})
    out = {k: v for k, v in headers.items() if k.lower().startswith("x-file-")}
    name = posixpath.basename(path) or "file"
    out["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(name, safe='')}"
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=out)


@router.put("/{vm_id}/files", response_model=FileInfo, response_model_exclude_none=True, responses=ERRORS,
            status_code=201, openapi_extra=_raw_body("application/octet-stream", "The file's bytes (any size, streamed)"))
async def upload_file(
    vm_id: str,
    request: Request,
    caller: CallerDep,
    path: PathQ = None,
    mode: Annotated[str | None, Query(description="octal permission bits; default 0644, or the replaced file's")] = None,
    parents: Annotated[str | None, Query(description="create missing parent directories (true/false)")] = None,
    overwrite: Annotated[str | None, Query(description="replace an existing file (default true; false → 409)")] = None,
):
    """Upload one file as a raw byte stream; written to a temporary file and renamed into place.
    Answers 201 with the file's metadata."""
    params = {"path": check_path(path)}
    if check_mode(mode) is not None:
        params["mode"] = mode
    if check_bool(parents, "parents"):
        params["parents"] = "true"
    if check_bool(overwrite, "overwrite") is False:
        params["overwrite"] = "false"
    info = await _files(request).upload(caller, vm_id, "/files", params, request.stream())
    return JSONResponse(info, status_code=201)


@router.get("/{vm_id}/files/list", response_model=FileList, response_model_exclude_none=True, responses=ERRORS)
async def list_files(
    vm_id: str,
    request: Request,
    caller: CallerDep,
    path: PathQ = None,
    depth: Annotated[str | None, Query(description="1 (default) lists the directory; up to 64 levels")] = None,
):
    """List a directory (name, type, size, mode, mtime); `depth` > 1 recurses (names are relative)."""
    params = {"path": check_path(path or ".")}
    if check_depth(depth) is not None:
        params["depth"] = depth
    return await _files(request).call(caller, vm_id, "GET", "/files/list", params=params)


@router.get("/{vm_id}/files/stat", response_model=FileInfo, response_model_exclude_none=True, responses=ERRORS)
async def stat_file(vm_id: str, request: Request, caller: CallerDep, path: PathQ = None):
    """Metadata of one path (symlinks are not followed)."""
    return await _files(request).call(caller, vm_id, "GET", "/files/stat", params={"path": check_path(path)})


@router.post("/{vm_id}/files/mkdir", response_model=FileInfo, response_model_exclude_none=True, status_code=201,
             responses=ERRORS, openapi_extra=_json_body(MkdirRequest))
async def make_directory(vm_id: str, request: Request, caller: CallerDep):
    """Create a directory (`parents` creates missing ones; 409 `file_exists` unless `exist_ok`)."""
    body = await read_model(request, MkdirRequest)
    check_path(body.path)
    check_mode(body.mode)
    data = await _files(request).call(caller, vm_id, "POST", "/files/mkdir",
                                      body=body.model_dump(exclude_none=True))
    return JSONResponse(data, status_code=201)


@router.post("/{vm_id}/files/remove", response_model=RemoveResponse, responses=ERRORS,
             openapi_extra=_json_body(RemoveRequest))
async def remove_file(vm_id: str, request: Request, caller: CallerDep):
    """Remove a file, link or empty directory; `recursive` removes a whole tree (symlinks are not followed)."""
    body = await read_model(request, RemoveRequest)
    check_path(body.path)
    return await _files(request).call(caller, vm_id, "POST", "/files/remove", body=body.model_dump())


@router.post("/{vm_id}/files/rename", response_model=FileInfo, response_model_exclude_none=True, responses=ERRORS,
             openapi_extra=_json_body(RenameRequest))
async def rename_file(vm_id: str, request: Request, caller: CallerDep):
    """Rename or move `from` to `to` (409 `file_exists` unless `overwrite`)."""
    body = await read_model(request, RenameRequest)
    check_path(body.from_, "from")
    check_path(body.to, "to")
    return await _files(request).call(caller, vm_id, "POST", "/files/rename", body=body.model_dump(by_alias=True))


@router.post("/{vm_id}/files/upload-tar", response_model=TarUploadResponse, status_code=201, responses=ERRORS,
             openapi_extra=_raw_body("application/x-tar", "A tar stream (optionally gzip/bz2/xz compressed)"))
async def upload_tar(
    vm_id: str,
    request: Request,
    caller: CallerDep,
    path: PathQ = None,
    parents: Annotated[str | None, Query(description="create the target directory if missing")] = None,
):
    """Upload several files at once: a tar stream extracted into directory `path`. Members that
    would land outside it (absolute names, `..`, links pointing out, devices) fail with 400
    `unsafe_tar_member`."""
    params = {"path": check_path(path)}
    if check_bool(parents, "parents"):
        params["parents"] = "true"
    info = await _files(request).upload(caller, vm_id, "/files/upload-tar", params, request.stream())
    return JSONResponse(info, status_code=201)


@router.get("/{vm_id}/files/download-tar", responses=_raw_answer("application/x-tar", "A tar stream of the directory"),
            response_class=StreamingResponse)
async def download_tar(vm_id: str, request: Request, caller: CallerDep, path: PathQ = None):
    """Download a directory as a tar stream (member names relative to it; symlinks kept as links)."""
    path = check_path(path)
    _headers, chunks = await _files(request).open(caller, vm_id, "/files/download-tar", {"path": path})
    name = (posixpath.basename(path.rstrip("/")) or "root") + ".tar"
    return StreamingResponse(chunks, media_type="application/x-tar",
                             headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}"})


@router.get("/{vm_id}/files/watch", responses=_raw_answer("text/event-stream", "Server-sent events"),
            response_class=StreamingResponse)
async def watch_files(
    vm_id: str,
    request: Request,
    caller: CallerDep,
    path: PathQ = None,
    recursive: Annotated[str | None, Query(description="watch subdirectories too")] = None,
):
    """Watch a directory: SSE `event: ready`, then `event: created|modified|removed` with
    `data: {"path", "is_dir"}`; a `: ping` comment every second."""
    params = {"path": check_path(path)}
    if check_bool(recursive, "recursive"):
        params["recursive"] = "true"
    events = await _files(request).watch(caller, vm_id, params)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
