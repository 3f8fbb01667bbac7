"""The asyncio client: the same API as _sync.py, with await."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any

import httpx

from sandboxd.client._core import (
    DEFAULT_TIMEOUT,
    ExecResult,
    SandboxInfo,
    create_body,
    exec_body,
    list_items,
    raise_for_error,
    settings,
)  # fmt: skip


class AsyncSandboxd:
    """`async with AsyncSandboxd(base_url, api_key) as client: sbx = await client.create()`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout=DEFAULT_TIMEOUT):
        base_url, api_key = settings(base_url, api_key)
        self._http = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    async def __aenter__(self) -> "AsyncSandboxd":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self._http.request(method, path, **kwargs)
        raise_for_error(response)
        return response

    async def create(self, template: str = "standard", **options: Any) -> "AsyncSandbox":
        data = (await self._call("POST", "/v1/sandboxes", json=create_body(template, **options))).json()
        return AsyncSandbox(self, data["vm_id"], data)

    async def get(self, vm_id: str) -> SandboxInfo:
        return SandboxInfo.from_json((await self._call("GET", f"/v1/sandboxes/{vm_id}")).json())

    async def list(self) -> list[SandboxInfo]:
        return list_items((await self._call("GET", "/v1/sandboxes")).json())[0]

    def sandbox(self, vm_id: str) -> "AsyncSandbox":
        return AsyncSandbox(self, vm_id, {})


class AsyncSandbox:
    """One sandbox; `async with` destroys it on exit."""

    def __init__(self, client: AsyncSandboxd, vm_id: str, created: dict):
        self.client = client
        self.vm_id = vm_id
        self.endpoint: str | None = created.get("endpoint")
        self.host_port: int | None = created.get("host_port")

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.destroy()

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.vm_id!r})"

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sandboxes/{self.vm_id}{suffix}"

    async def info(self) -> SandboxInfo:
        return await self.client.get(self.vm_id)

    async def exec(self, command: str, **options: Any) -> ExecResult:
        response = await self.client._call("POST", self._path("/exec"), json=exec_body(command, **options))
        return ExecResult.from_json(response.json())

    async def logs(self, *, limit: int = 100, since: str | None = None) -> list[dict]:
        params = {"limit": limit, **({"since": since} if since else {})}
        return (await self.client._call("GET", self._path("/logs"), params=params)).json()["entries"]

    async def write_file(self, path: str, data: bytes | AsyncIterable[bytes], *, mode: str | None = None,
                         parents: bool = True) -> dict:  # fmt: skip
        params = {"path": path, "parents": str(parents).lower(), **({"mode": mode} if mode else {})}
        return (await self.client._call("PUT", self._path("/files"), params=params, content=data)).json()

    async def read_file(self, path: str) -> bytes:
        return (await self.client._call("GET", self._path("/files"), params={"path": path})).content

    async def list_files(self, path: str = ".", *, depth: int = 1) -> list[dict]:
        params = {"path": path, "depth": depth}
        return (await self.client._call("GET", self._path("/files/list"), params=params)).json()["entries"]

    async def screenshot(self, format: str = "png", **params: Any) -> bytes:
        """The desktop (template cua) as PNG or JPEG bytes; params: quality, x, y, width, height, scale."""
        params = {"format": format, **params}
        return (await self.client._call("GET", self._path("/desktop/screenshot"), params=params)).content

    async def desktop(self, action: str, **body: Any) -> dict:
        """A desktop call (template cua): desktop("mouse/click", x=10, y=20), desktop("keyboard/type", text="hi"),
        desktop("keyboard/press", keys="ctrl+l"), desktop("parse"), desktop("stream", view_only=True),
        desktop("mouse/drag", **{"from": [0, 0], "to": [9, 9]}); "screen", "cursor", "windows" are GETs."""
        method = "GET" if action in ("screen", "cursor", "windows") else "POST"
        kwargs = {"json": body} if method == "POST" else {}
        response = await self.client._call(method, self._path(f"/desktop/{action}"), **kwargs)
        return response.json()

    async def cancel(self) -> dict:
        return (await self.client._call("POST", self._path("/cancel"))).json()

    async def destroy(self) -> None:
        await self.client._call("DELETE", self._path())
