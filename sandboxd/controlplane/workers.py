"""Remote workers joining and staying: registration and heartbeats (README: Many hosts).

A worker proves itself with a worker token (created by the operator, stored as a SHA-256
hash) and hands over the secret this control plane must call it with; the secret lives only
in the RemoteWorker handle, in memory. A heartbeat names the secret by its SHA-256, so a
control plane that restarted (and forgot it) answers 409 and the worker registers again.
"""

from __future__ import annotations

import logging
import re

from sandboxd.controlplane.service import SandboxService
from sandboxd.errors import BadRequest, Conflict, SandboxdError, Unauthorized, WorkerFailure
from sandboxd.store.models import WorkerToken
from sandboxd.worker.remote import RemoteWorker

log = logging.getLogger(__name__)

WORKER_ID_RE = re.compile(r"^wrk_[a-z0-9]{8}$")


class WorkerRegistry:
    def __init__(self, service: SandboxService):
        self.service = service
        self.store = service.store

    async def authenticate(self, token: str | None) -> WorkerToken:
        row = await self.store.authenticate_worker(token) if token else None
        if row is None:
            raise Unauthorized("invalid or revoked worker token", field="authorization")
        return row

    async def register(self, token: WorkerToken, worker_id: str, url: str, secret: str) -> dict:
        if not WORKER_ID_RE.match(worker_id):
            raise BadRequest("worker_id: must look like wrk_xxxxxxxx", code="invalid_value", field="worker_id")
        if not re.match(r"^https?://[^/?#\s]+$", url) or len(url) > 255:
            raise BadRequest("url: must be http(s)://HOST:PORT", code="invalid_value", field="url")
        if not 32 <= len(secret) <= 256:
            raise BadRequest("secret: 32 to 256 characters", code="invalid_value", field="secret")
        known = await self.store.get_worker(worker_id)
        if known is not None and known.token_id not in (None, token.id) and await self.store.worker_token_active(
            known.token_id
        ):
            # one token cannot take over a worker registered with another (unless that one was revoked)
            raise Conflict(f"worker_id: {worker_id} belongs to another worker token", code="worker_token_mismatch",
                           field="worker_id")  # fmt: skip
        handle = RemoteWorker(worker_id, url, secret)
        try:
            info = await handle.info()  # the worker answers at its URL with the secret it offered
            if info.worker_id != worker_id:
                raise BadRequest(f"worker_id: the worker at {url} is {info.worker_id}", code="invalid_value",
                                 field="worker_id")  # fmt: skip
            await self.service.register_worker(handle, url=url, token_id=token.id)
        except SandboxdError as exc:
            await handle.aclose()
            if isinstance(exc, BadRequest):
                raise
            raise WorkerFailure(f"url: the control plane could not reach the worker: {exc.message}",
                                code="worker_unreachable", field="url") from None  # fmt: skip
        log.info("worker %s registered from %s (%s CPUs, %d MiB)", worker_id, url, info.vcpus, info.memory_mib)
        return {"worker_id": worker_id, "heartbeat_interval_seconds": self.service.settings.heartbeat_interval_seconds}

    async def heartbeat(self, token: WorkerToken, worker_id: str, secret_sha256: str) -> dict:
        handle = self.service._workers.get(worker_id)
        known = await self.store.get_worker(worker_id)
        current = (
            isinstance(handle, RemoteWorker) and handle.holds(secret_sha256)
            and known is not None and known.token_id == token.id
        )  # fmt: skip
        if not current or not await self.store.heartbeat_worker(worker_id):
            # unknown here (restart), or marked down meanwhile: registering again reconciles
            raise Conflict("worker_id: not registered with this control plane; register again",
                           code="not_registered", field="worker_id")  # fmt: skip
        return {"worker_id": worker_id}
