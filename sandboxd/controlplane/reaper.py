"""The reaper loop (idle and lifetime limits, retried teardowns, purge of old records) and,
beside it, the worker monitor (heartbeat grace periods): separate loops, so a pass that
waits on a worker which just went silent never delays noticing that it went silent."""

from __future__ import annotations

import asyncio
import logging

from sandboxd.controlplane.service import SandboxService

log = logging.getLogger(__name__)


async def run_reaper(service: SandboxService, interval_seconds: float) -> None:
    monitor = asyncio.create_task(_every(interval_seconds, "worker check", service.check_workers))
    try:
        await _every(interval_seconds, "reaper pass", _reap, service)
    finally:
        monitor.cancel()


async def _reap(service: SandboxService) -> None:
    for sandbox_id, reason in await service.reap_once():
        log.info("reaped %s (%s)", sandbox_id, reason)


async def _every(interval_seconds: float, what: str, action, *args) -> None:
    while True:
        try:
            await action(*args)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(interval_seconds)
