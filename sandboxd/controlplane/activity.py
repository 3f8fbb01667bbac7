"""API activity per sandbox, batched so the hot path (exec) does not write the store each call.

The reaper flushes before it judges idleness, so a sandbox is never reaped on stale data
from this control plane.
"""

from __future__ import annotations

from datetime import datetime

from sandboxd.store.repo import Store, utcnow


class ActivityTracker:
    def __init__(self, store: Store):
        self._store = store
        self._pending: dict[str, datetime] = {}

    def touch(self, sandbox_id: str) -> None:
        self._pending[sandbox_id] = utcnow()

    def last_seen(self, sandbox_id: str) -> datetime | None:
        return self._pending.get(sandbox_id)

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        await self._store.touch_sandboxes(pending)
