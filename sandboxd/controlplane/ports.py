"""Reaching a sandbox's ports through the control plane: who may, and where to connect.

Two credentials open a sandbox's ports:
  * the owner's API key (`Authorization: Bearer`), stripped before the request goes on;
  * a sandbox access token (preview link): scoped to one sandbox, stored only as a SHA-256
    hash, expiring (default 1 h, never past the sandbox's lifetime), revocable, and dead
    with its sandbox. It opens the proxy and nothing else: the API's key lookup never sees it.

The HTTP side lives in sandboxd/api/proxy.py; this module never sees HTTP objects.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sandboxd import ids
from sandboxd.controlplane.service import Caller, SandboxService
from sandboxd.errors import BadRequest, Conflict, NotFound, Unauthorized
from sandboxd.store.models import Sandbox, SandboxAccessToken
from sandboxd.store.repo import utcnow
from sandboxd.worker.interface import PortTarget

TOKEN_PREFIX = "sbt_"
TOKEN_QUERY = "sandbox_token"
TOKEN_HEADER = "x-sandbox-token"
TOKEN_COOKIE = "sandboxd_token"
DEFAULT_TOKEN_TTL_SECONDS = 3600
MAX_TOKEN_TTL_SECONDS = 7200  # = the longest sandbox lifetime; capped at the sandbox's own expiry


def parse_port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise BadRequest(f"port: must be an integer 1-65535, got {value!r}", code="invalid_port", field="port")
    return int(value)


def proxy_prefix(vm_id: str) -> str:
    """The path under which all of a sandbox's ports are proxied (the token cookie's Path)."""
    return f"/v1/sandboxes/{vm_id}/ports/"


def sandbox_expires_at(sandbox: Sandbox) -> datetime:
    return sandbox.created_at + timedelta(seconds=sandbox.max_lifetime_seconds)


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once, never stored
    expires_at: datetime


@dataclass(frozen=True)
class Access:
    sandbox: Sandbox
    via_token: bool  # True: the caller showed an access token; False: the owner's API key
    token_expires_at: datetime | None = None


class PortAccess:
    def __init__(self, service: SandboxService):
        self.service = service
        self.store = service.store

    # --- tokens -----------------------------------------------------------------------

    async def issue_token(self, caller: Caller, vm_id: str, expires_in_seconds: int | None) -> IssuedToken:
        sandbox = await self.service.get_running(caller, vm_id)
        now = utcnow()
        ttl = timedelta(seconds=expires_in_seconds or DEFAULT_TOKEN_TTL_SECONDS)
        expires_at = min(now + ttl, sandbox_expires_at(sandbox))
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        await self.store.insert_access_token(
            SandboxAccessToken(
                id="sat_" + secrets.token_hex(8),
                sandbox_id=sandbox.id,
                token_hash=ids.hash_secret(token),
                created_at=now,
                expires_at=expires_at,
            )
        )
        return IssuedToken(token=token, expires_at=expires_at)

    async def revoke_tokens(self, caller: Caller, vm_id: str) -> int:
        sandbox = await self.service.get(caller, vm_id)
        return await self.store.revoke_access_tokens(sandbox.id)

    # --- who may reach the ports -------------------------------------------------------

    async def authorize(self, vm_id: str, *, api_key: str | None, tokens: list[str]) -> Access:
        """A token valid for this sandbox wins; else the API key; else 401.

        Errors: 401 (no or bad credential), 404 (not the key owner's sandbox, or no such
        sandbox), 409 (the sandbox is not running).
        """
        token_row = None
        for candidate in tokens:
            if candidate and candidate.startswith(TOKEN_PREFIX):
                row = await self.store.find_access_token(ids.hash_secret(candidate))
                if row is not None and row.sandbox_id == vm_id:
                    token_row = row
                    break
        if token_row is not None:
            sandbox = await self.store.get_sandbox(vm_id)
            if sandbox is None:
                raise NotFound(f"no sandbox {vm_id!r}", code="sandbox_not_found", field="id")
            if sandbox.state != "running":
                raise Conflict(f"sandbox {vm_id} is {sandbox.state}", code="sandbox_not_running", field="id")
            return Access(sandbox=sandbox, via_token=True, token_expires_at=token_row.expires_at)
        if api_key:
            user = await self.store.authenticate(api_key)
            if user is None:
                raise Unauthorized("invalid or revoked API key", field="authorization")
            sandbox = await self.service.get_running(Caller(user_id=user.id, user_name=user.name), vm_id)
            return Access(sandbox=sandbox, via_token=False)
        if any(tokens):
            raise Unauthorized(
                "invalid, expired or revoked sandbox access token (or one for another sandbox)",
                code="invalid_sandbox_token",
                field=TOKEN_QUERY,
            )
        raise Unauthorized(
            "send 'Authorization: Bearer <API key>', or a sandbox access token as ?sandbox_token=, "
            "the X-Sandbox-Token header or the sandboxd_token cookie",
            field="authorization",
        )

    async def target(self, sandbox: Sandbox, port: int) -> PortTarget:
        self.service.activity.touch(sandbox.id)
        return await self.service._worker(sandbox.worker_id).port_target(sandbox.id, port)

    def touch(self, sandbox_id: str) -> None:
        self.service.activity.touch(sandbox_id)
