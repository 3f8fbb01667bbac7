"""The blocking client (see _async.py for the same API with await)."""

from __future__ import annotations

from collections.abc import Iterable
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


class Sandboxd:
    """A connection to a sandboxd server: `Sandboxd(base_url, api_key)` or SANDBOXD_URL / SANDBOXD_API_KEY."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout=DEFAULT_TIMEOUT):
        base_url, api_key = settings(base_url, api_key)
        self._http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)

    def __enter__(self) -> "Sandboxd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        raise_for_error(response)
        return response

    def create(self, template: str = "standard", **options: Any) -> "Sandbox":
        """Create a sandbox (options as in the API: env_vars, metadata, idle_timeout_seconds, ...)."""
        data = self._call("POST", "/v1/sandboxes", json=create_body(template, **options)).json()
        return Sandbox(self, data["vm_id"], data)

    def get(self, vm_id: str) -> SandboxInfo:
        return SandboxInfo.from_json(self._call("GET", f"/v1/sandboxes/{vm_id}").json())

    def list(self) -> list[SandboxInfo]:
        return list_items(self._call("GET", "/v1/sandboxes").json())[0]

    def sandbox(self, vm_id: str) -> "Sandbox":
        """A handle on an existing sandbox."""
        return Sandbox(self, vm_id, {})


class Sandbox:
    """One sandbox. As a context manager it is destroyed on exit."""

    def __init__(self, client: Sandboxd, vm_id: str, created: dict):
        self.client = client
        self.vm_id = vm_id
        self.endpoint: str | None = created.get("endpoint")
        self.host_port: int | None = created.get("host_port")

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"Sandbox({self.vm_id!r})"

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sandboxes/{self.vm_id}{suffix}"

    def info(self) -> SandboxInfo:
        return self.client.get(self.vm_id)

    def exec(self, command: str, **options: Any) -> ExecResult:
        """Run `/bin/sh -c command` (options: timeout_seconds, cwd, env, stdin, user)."""
        response = self.client._call("POST", self._path("/exec"), json=exec_body(command, **options))
        return ExecResult.from_json(response.json())

    def logs(self, *, limit: int = 100, since: str | None = None) -> list[dict]:
        params = {"limit": limit, **({"since": since} if since else {})}
        return self.client._call("GET", self._path("/logs"), params=params).json()["entries"]

    def write_file(self, path: str, data: bytes | Iterable[bytes], *, mode: str | None = None,
                   parents: bool = True) -> dict:  # fmt: skip
        """Upload bytes (or an iterable of chunks, streamed) to path inside the sandbox."""
        params = {"path": path, "parents": str(parents).lower(), **({"mode": mode} if mode else {})}
        return self.client._call("PUT", self._path("/files"), params=params, content=data).json()

    def read_file(self, path: str) -> bytes:
        return self.client._call("GET", self._path("/files"), params={"path": path}).content

    def list_files(self, path: str = ".", *, depth: int = 1) -> list[dict]:
        params = {"path": path, "depth": depth}
        return self.client._call("GET", self._path("/files/list"), params=params).json()["entries"]

    def screenshot(self, format: str = "png", **params: Any) -> bytes:
        """The desktop (template cua) as PNG or JPEG bytes; params: quality, x, y, width, height, scale."""
        params = {"format": format, **params}
        return (self.client._call("GET", self._path("/desktop/screenshot"), params=params)).content

    def desktop(self, action: str, **body: Any) -> dict:
        """A desktop call (template cua): desktop("mouse/click", x=10, y=20), desktop("keyboard/type", text="hi"),
        desktop("keyboard/press", keys="ctrl+l"), desktop("parse"), desktop("stream", view_only=True),
        desktop("mouse/drag", **{"from": [0, 0], "to": [9, 9]}); "screen", "cursor", "windows" are GETs."""
        method = "GET" if action in ("screen", "cursor", "windows") else "POST"
        kwargs = {"json": body} if method == "POST" else {}
        response = self.client._call(method, self._path(f"/desktop/{action}"), **kwargs)
        return response.json()

    def cancel(self) -> dict:
        return self.client._call("POST", self._path("/cancel")).json()

    def destroy(self) -> None:
        self.client._call("DELETE", self._path())
