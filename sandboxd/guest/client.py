"""Worker-side client of the guest agent (HTTP/1.1 over a unix socket, or TCP).

Runs in the worker (not in the sandbox): it may use httpx. One pooled keep-alive
connection per concurrent call, so an exec round trip costs a few milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx

from sandboxd.guest.protocol import PROTOCOL_VERSION

__all__ = ["GuestClient", "GuestClientError", "GuestError", "GuestUnavailable"]

DEFAULT_TIMEOUT = 10.0  # seconds, for everything but exec
EXEC_MARGIN = 10.0  # exec HTTP timeout = timeout_seconds + this
READY_POLL_SECONDS = 0.003  # wait_ready's polling interval (a failed unix connect costs ~0.1 ms)


class GuestClientError(Exception):
    """Base class of the client's errors."""


class GuestError(GuestClientError):
    """The agent answered with an error (``status`` is the HTTP status; 0 = client-side)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class GuestUnavailable(GuestClientError):
    """The agent could not be reached (no socket yet, refused, reset, timed out)."""


class GuestClient:
    """Talks to one sandbox's guest agent.

    ``target`` is the path of the agent's unix socket, or a base URL
    (``http://10.0.0.2:7000``) for a TCP transport.
    """

    def __init__(self, target: str, token: str, *, timeout: float = DEFAULT_TIMEOUT):
        self.target = str(target)
        self._timeout = timeout
        headers = {"Authorization": f"Bearer {token}"}
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=4, keepalive_expiry=60.0)
        if self.target.startswith(("http://", "https://")):
            transport = httpx.AsyncHTTPTransport(limits=limits, retries=0)
            base_url = self.target.rstrip("/")
        else:
            transport = httpx.AsyncHTTPTransport(uds=self.target, limits=limits, retries=0)
            base_url = "http://sandbox-agent"
        self._http = httpx.AsyncClient(
            transport=transport, base_url=base_url, headers=headers, timeout=timeout, trust_env=False
        )

    async def __aenter__(self) -> "GuestClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> dict:
        try:
            resp = await self._http.request(
                method, path, timeout=self._timeout if timeout is None else timeout, **kw
            )
        except httpx.TransportError as e:  # connect/read/write errors, timeouts, protocol errors
            raise GuestUnavailable(f"guest agent at {self.target} unreachable: {type(e).__name__}: {e}") from e
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                raise GuestError(resp.status_code, str(err.get("code", "error")), str(err.get("message", "")))
            raise GuestError(resp.status_code, "http_error", resp.text[:500])
        if not isinstance(data, dict):
            raise GuestError(resp.status_code, "invalid_response", "agent answered with non-JSON-object body")
        return data

    async def health(self) -> dict:
        return await self._request("GET", "/health")

    async def wait_ready(self, timeout: float) -> dict:
        """Poll /health until the agent answers; returns the health document.

        Raises GuestUnavailable on timeout, GuestError at once on an error answer (e.g. a
        wrong token) or a protocol version mismatch (code ``protocol_mismatch``).
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        uds = None if self.target.startswith(("http://", "https://")) else self.target
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestUnavailable(f"guest agent not ready after {timeout:g}s: {last}")
            if uds is not None and not os.path.exists(uds):
                # The agent creates its socket only once it listens: no request before that.
                last = GuestUnavailable(f"no socket at {uds}")
            else:
                try:
                    h = await self._request("GET", "/health", timeout=min(self._timeout, max(remaining, 0.05)))
                except GuestUnavailable as e:
                    last = e
                else:
                    if h.get("protocol") != PROTOCOL_VERSION:
                        raise GuestError(
                            0, "protocol_mismatch",
                            f"guest agent speaks protocol {h.get('protocol')!r}, worker speaks {PROTOCOL_VERSION}",
                        )
                    return h
            await asyncio.sleep(min(READY_POLL_SECONDS, max(deadline - time.monotonic(), 0)))

    async def exec(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_seconds: float = 60,
        max_output_bytes: int | None = None,
    ) -> dict:
        """Run ``/bin/sh -c command``; returns output, stdout, stderr, exit_code, timed_out,
        truncated, duration_ms."""
        body: dict[str, Any] = {"command": command, "timeout_seconds": timeout_seconds}
        if cwd is not None:
            body["cwd"] = cwd
        if env is not None:
            body["env"] = env
        if max_output_bytes is not None:
            body["max_output_bytes"] = max_output_bytes
        try:
            http_timeout = float(timeout_seconds) + EXEC_MARGIN
        except (TypeError, ValueError):
            http_timeout = self._timeout  # the agent will reject the value with a 400
        return await self._request("POST", "/exec", json=body, timeout=http_timeout)

    async def logs(self, since: str | float | None = None, limit: int = 100) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if since is not None:
            params["since"] = since
        return await self._request("GET", "/logs", params=params)

    async def status(self) -> dict:
        return await self._request("GET", "/status")
