"""Bearer API keys. Keys are looked up by hash; the key itself is never stored or logged."""

from __future__ import annotations

from fastapi import Request

from sandboxd.controlplane.service import Caller
from sandboxd.errors import Unauthorized


async def require_caller(request: Request) -> Caller:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", field="authorization")
    user = await request.app.state.service.store.authenticate(key.strip())
    if user is None:
        raise Unauthorized("invalid or revoked API key", field="authorization")
    return Caller(user_id=user.id, user_name=user.name)
