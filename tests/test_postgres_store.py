"""The store under two control planes at once (two engines on one database): capacity claims
never overfill a worker and each conditional transition happens once, on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from sandboxd.store.models import Sandbox, User, Worker
from sandboxd.store.repo import Store, utcnow
from tests.multihost_helpers import Postgres

# Workers run the default runtime: the placement and failure logic does not depend on it.
pytestmark = pytest.mark.runtime_independent


@pytest.fixture(scope="module")
def postgres():
    cluster = Postgres().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/store.db"
    cluster = request.getfixturevalue("postgres")
    return cluster.url.replace("postgresql://", "postgresql+asyncpg://")


async def _two_stores(url: str) -> tuple[Store, Store]:
    first, second = Store(url), Store(url)
    if url.startswith("postgresql"):
        await asyncio.gather(first.open(), second.open())  # two control planes starting together
    else:  # SQLite serves one control plane: no migration lock there
        await first.open()
        await second.open()
    return first, second


async def _seed(store: Store, sandboxes: int) -> list[str]:
    now = utcnow()
    async with store._session() as session:
        suffix = now.strftime("%H%M%S%f")[-8:]
        session.add(User(id=f"usr_{suffix}", name=f"u{suffix}", created_at=now))
        session.add(Worker(id=f"wrk_{suffix}", address="198.19.9.2", url="http://198.19.9.2:8081", vcpus=2,
                           memory_mib=2048, runtimes=["oci"], templates=[], state="active", registered_at=now,
                           last_heartbeat_at=now, draining=False))  # fmt: skip
        await session.flush()  # the rows the sandboxes refer to go first
        ids = [f"sbx_{suffix[:4]}{i:04d}" for i in range(sandboxes)]
        for vm_id in ids:
            session.add(Sandbox(id=vm_id, user_id=f"usr_{suffix}", template="standard", runtime="oci", state="creating",
                                vcpu=1, cpu_fraction=0.5, memory_mib=512, metadata_={}, idle_timeout_seconds=60,
                                max_lifetime_seconds=7200, created_at=now, last_active_at=now))  # fmt: skip
        await session.commit()
    return [f"wrk_{suffix}", *ids]


def test_concurrent_claims_from_two_control_planes_never_overfill(url):
    async def run():
        first, second = await _two_stores(url)
        try:
            worker_id, *ids = await _seed(first, 12)
            claims = [
                (first if i % 2 else second).claim_capacity(
                    vm_id, worker_id, cpu=0.5, memory_mib=512, cpu_capacity=16.0, memory_capacity=2048.0
                )
                for i, vm_id in enumerate(ids)
            ]
            won = await asyncio.gather(*claims)
            assert sum(won) == 4  # 2048 MiB / 512
            loads = await second.worker_loads()
            assert loads[worker_id].memory_mib == 2048 and loads[worker_id].sandboxes == 4
            # a drained or down worker takes nothing
            await first.set_worker_draining(worker_id, True)
            assert not await second.claim_capacity(ids[0], worker_id, cpu=0, memory_mib=0, cpu_capacity=16.0,
                                                   memory_capacity=1e9)  # fmt: skip
        finally:
            await asyncio.gather(first.close(), second.close())

    asyncio.run(run())


def test_each_transition_happens_once(url):
    async def run():
        first, second = await _two_stores(url)
        try:
            worker_id, vm_id = await _seed(first, 1)
            for store in (first, second):
                await store.update_sandbox(vm_id, state="running")
            claims = [
                store.update_sandbox(vm_id, expect_state=("creating", "running"), state="stopping",
                                     destroyed_at=utcnow())
                for store in (first, second, first, second)
            ]  # fmt: skip
            assert sorted(await asyncio.gather(*claims)) == [False, False, False, True]
            # a retried teardown takes over only an old one
            retry = dict(expect_state=("stopping",), state="stopping", destroyed_at=utcnow())
            assert not await first.update_sandbox(vm_id, teardown_started_before=utcnow() - timedelta(seconds=30),
                                                  **retry)  # fmt: skip
            assert await second.update_sandbox(vm_id, teardown_started_before=utcnow() + timedelta(seconds=1), **retry)
            # silent workers go down once, whoever looks
            later = utcnow() + timedelta(seconds=5)
            down = await asyncio.gather(first.mark_silent_workers_down(later), second.mark_silent_workers_down(later))
            assert [w for found in down for w in found].count(worker_id) == 1
            assert not await first.heartbeat_worker(worker_id)  # down: it must register again
        finally:
            await asyncio.gather(first.close(), second.close())

    asyncio.run(run())
