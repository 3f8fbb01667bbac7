"""The reaper loop: idle and lifetime limits, retried teardowns, purge of old records."""

from __future__ import annotations

import asyncio
import logging

from sandboxd.controlplane.service import SandboxService

log = logging.getLogger(__name__)


async def run_reaper(service: SandboxService, interval_seconds: float) -> None:
    while True:
        try:
            for sandbox_id, reason in await service.reap_once():
                log.info("reaped %s (%s)", sandbox_id, reason)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reaper pass failed")
        await asyncio.sleep(interval_seconds)
