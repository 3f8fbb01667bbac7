"""File operations on a sandbox's own filesystem, as typed commands over SandboxService.

The guest agent does the work inside the sandbox (sandboxd/guest/_files.py), so paths can
only ever resolve inside the sandbox's root. Here: tenancy and state checks (404/409),
input checks that need no round trip, activity for the idle reaper, and streaming glue.
Bodies pass through as async iterators of chunks: nothing holds a whole file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from sandboxd.controlplane.service import Caller, SandboxService
from sandboxd.errors import BadRequest

MAX_PATH = 4096
MAX_DEPTH = 64
PIECE_BYTES = 256 * 1024  # relayed bodies move in pieces of up to this
PREFETCH_DEPTH = 8


def check_path(value: Any, field: str = "path") -> str:
    if value is None or value == "":
        raise BadRequest(f"{field}: required", code="missing_field", field=field)
    if not isinstance(value, str):
        raise BadRequest(f"{field}: must be a string", code="invalid_type", field=field)
    if len(value) > MAX_PATH:
        raise BadRequest(f"{field}: longer than {MAX_PATH} characters", code="invalid_path", field=field)
    if "\0" in value:
        raise BadRequest(f"{field}: must not contain NUL", code="invalid_path", field=field)
    return value


def check_bool(value: str | None, field: str) -> bool | None:
    if value is None or value == "":
        return None
    low = value.lower()
    if low in ("1", "true", "yes"):
        return True
    if low in ("0", "false", "no"):
        return False
    raise BadRequest(f"{field}: must be true or false", code="invalid_value", field=field)


def check_mode(value: Any, field: str = "mode") -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and 1 <= len(value) <= 5 and all(c in "01234567" for c in value):
        if int(value, 8) <= 0o7777:
            return value
    raise BadRequest(f"{field}: must be an octal string such as \"0644\" (at most 7777)", code="invalid_value",
                     field=field)


def check_depth(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        depth = int(value)
    except ValueError:
        depth = 0
    if not 1 <= depth <= MAX_DEPTH:
        raise BadRequest(f"depth: must be an integer from 1 to {MAX_DEPTH}", code="invalid_value", field="depth")
    return depth


async def prefetched(source: AsyncIterator[bytes], *, piece: int = PIECE_BYTES, depth: int = PREFETCH_DEPTH
                     ) -> AsyncIterator[bytes]:
    """Reads `source` in a task, ahead of the consumer, into pieces of up to `piece` bytes
    with at most `depth` pieces waiting: the two sides of a relay overlap instead of taking
    turns, and memory stays bounded (~ piece x (depth + 2)) whatever the size."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=depth)
    end = object()

    async def pump() -> None:
        try:
            parts: list[bytes] = []
            size = 0
            async for chunk in source:
                if not chunk:
                    continue
                parts.append(chunk)
                size += len(chunk)
                if size >= piece or queue.empty():
                    await queue.put(parts[0] if len(parts) == 1 else b"".join(parts))
                    parts, size = [], 0
            if parts:
                await queue.put(b"".join(parts))
            await queue.put(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class FileService:
    def __init__(self, service: SandboxService):
        self.service = service

    async def _worker(self, caller: Caller, vm_id: str):
        sandbox = await self.service.get_running(caller, vm_id)
        self.service.activity.touch(sandbox.id)
        return sandbox.id, self.service._worker(sandbox.worker_id)

    async def call(self, caller: Caller, vm_id: str, method: str, op: str, *, params: dict | None = None,
                   body: dict | None = None) -> dict:
        sandbox_id, worker = await self._worker(caller, vm_id)
        try:
            return await worker.files_call(sandbox_id, method, op, params, body)
        finally:
            self.service.activity.touch(sandbox_id)

    async def upload(self, caller: Caller, vm_id: str, op: str, params: dict, chunks: AsyncIterator[bytes]) -> dict:
        sandbox_id, worker = await self._worker(caller, vm_id)
        touch = self.service.activity.touch

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                if chunk:
                    touch(sandbox_id)  # a dict store: cheap; a slow transfer stays non-idle
                    yield chunk

        try:
            return await worker.files_upload(sandbox_id, op, params, prefetched(counted()))
        finally:
            touch(sandbox_id)

    async def open(self, caller: Caller, vm_id: str, op: str, params: dict) -> tuple[dict, AsyncIterator[bytes]]:
        """Opens a download; errors raise here, before any byte is sent to the client."""
        sandbox_id, worker = await self._worker(caller, vm_id)
        stream = await worker.files_open(sandbox_id, op, params)
        touch = self.service.activity.touch

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:  # (prefetching measured no gain here: serve is CPU-bound)
                    touch(sandbox_id)
                    yield chunk
            finally:
                await stream.aclose()
                touch(sandbox_id)

        return stream.headers, chunks()

    async def watch(self, caller: Caller, vm_id: str, params: dict) -> AsyncIterator[bytes]:
        """Server-sent events: `event: created|modified|removed` with JSON data; a comment
        line every second keeps the sandbox non-idle while (and only while) the client listens."""
        sandbox_id, worker = await self._worker(caller, vm_id)
        stream = await worker.files_open(sandbox_id, "/files/watch", params)
        touch = self.service.activity.touch

        async def events() -> AsyncIterator[bytes]:
            pending = b""
            try:
                async for chunk in stream:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    out = []
                    for line in lines:
                        if not line.strip():
                            continue
                        try:
                            event = json.loads(line)
                        except ValueError:
                            continue
                        kind = event.pop("type", None)
                        if kind == "ping":
                            out.append(b": ping\n\n")
                        elif isinstance(kind, str) and kind.isidentifier():
                            data = json.dumps(event, ensure_ascii=False).encode("utf-8", "surrogateescape")
                            out.append(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
                    touch(sandbox_id)
                    if out:
                        yield b"".join(out)
            finally:
                await stream.aclose()
                touch(sandbox_id)

        return events()
