"""The store's operations, one method per question the control plane asks."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from sandboxd import ids
from sandboxd.store.db import make_engine, migrate, sessionmaker
from sandboxd.store.models import ApiKey, Sandbox, SandboxAccessToken, User, Worker, WorkerToken

LIVE_STATES = ("creating", "running", "stopping")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class CreatedKey:
    key: str  # shown once, never stored
    key_id: str
    user_id: str
    user_name: str
    prefix: str


@dataclass(frozen=True)
class CreatedWorkerToken:
    token: str  # shown once, never stored
    token_id: str
    name: str
    prefix: str


@dataclass(frozen=True)
class WorkerLoad:
    vcpu: float  # sum of vcpu × cpu_fraction of live sandboxes
    memory_mib: int
    sandboxes: int


class Store:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        self._session = sessionmaker(self.engine)

    async def open(self) -> None:
        await migrate(self.engine)

    async def close(self) -> None:
        await self.engine.dispose()

    # --- tenants and keys -------------------------------------------------------------

    async def ensure_user(self, name: str) -> User:
        async with self._session() as session:
            user = await session.scalar(select(User).where(User.name == name))
            if user is not None:
                return user
            user = User(id=ids.new_user_id(), name=name, created_at=utcnow())
            session.add(user)
            try:
                await session.commit()
            except IntegrityError:  # created concurrently by another control plane
                await session.rollback()
                return await session.scalar(select(User).where(User.name == name))
            return user

    async def create_key(self, user_name: str) -> CreatedKey:
        user = await self.ensure_user(user_name)
        key = ids.new_api_key()
        record = ApiKey(
            id=ids.new_key_id(),
            user_id=user.id,
            key_hash=ids.hash_secret(key),
            prefix=key[:12],
            created_at=utcnow(),
        )
        async with self._session() as session:
            session.add(record)
            await session.commit()
        return CreatedKey(key=key, key_id=record.id, user_id=user.id, user_name=user.name, prefix=record.prefix)

    async def list_keys(self) -> list[tuple[ApiKey, User]]:
        async with self._session() as session:
            rows = await session.execute(
                select(ApiKey, User).join(User, ApiKey.user_id == User.id).order_by(ApiKey.created_at)
            )
            return [(key, user) for key, user in rows.all()]

    async def revoke_key(self, key_id_or_prefix: str) -> int:
        async with self._session() as session:
            result = await session.execute(
                update(ApiKey)
                .where(
                    (ApiKey.id == key_id_or_prefix) | (ApiKey.prefix == key_id_or_prefix),
                    ApiKey.revoked_at.is_(None),
                )
                .values(revoked_at=utcnow())
            )
            await session.commit()
            return result.rowcount

    async def authenticate(self, key: str) -> User | None:
        async with self._session() as session:
            row = await session.execute(
                select(User)
                .join(ApiKey, ApiKey.user_id == User.id)
                .where(ApiKey.key_hash == ids.hash_secret(key), ApiKey.revoked_at.is_(None))
            )
            return row.scalar_one_or_none()

    # --- workers ----------------------------------------------------------------------

    async def upsert_worker(self, worker: Worker) -> None:
        """Insert or refresh a worker's row; the operator's `draining` flag survives re-registration."""
        fields = ("address", "url", "vcpus", "memory_mib", "runtimes", "templates", "state", "registered_at",
                  "last_heartbeat_at", "token_id")  # fmt: skip
        for _attempt in range(2):
            async with self._session() as session:
                row = await session.get(Worker, worker.id)
                if row is None:
                    session.add(worker)
                else:
                    for name in fields:
                        setattr(row, name, getattr(worker, name))
                try:
                    await session.commit()
                    return
                except IntegrityError:  # registered at the same moment through another control plane
                    await session.rollback()
        raise RuntimeError(f"could not record worker {worker.id}")

    async def get_worker(self, worker_id: str) -> Worker | None:
        async with self._session() as session:
            return await session.get(Worker, worker_id)

    async def list_workers(self) -> list[Worker]:
        async with self._session() as session:
            return list(await session.scalars(select(Worker).order_by(Worker.registered_at)))

    async def set_worker_state(self, worker_id: str, state: str) -> None:
        async with self._session() as session:
            await session.execute(update(Worker).where(Worker.id == worker_id).values(state=state))
            await session.commit()

    async def set_worker_draining(self, worker_id: str, draining: bool) -> int:
        async with self._session() as session:
            result = await session.execute(update(Worker).where(Worker.id == worker_id).values(draining=draining))
            await session.commit()
            return result.rowcount

    async def heartbeat_worker(self, worker_id: str, at: datetime | None = None) -> bool:
        """Record a heartbeat of an `active` worker; False if it is down or unknown (it must
        register again, which reconciles its sandboxes)."""
        async with self._session() as session:
            result = await session.execute(
                update(Worker)
                .where(Worker.id == worker_id, Worker.state == "active")
                .values(last_heartbeat_at=at or utcnow())
            )
            await session.commit()
            return result.rowcount == 1

    async def mark_silent_workers_down(self, silent_since: datetime) -> list[str]:
        """active -> down for remote workers without a heartbeat since `silent_since` (conditional:
        with several control planes, each transition happens once). An in-process worker
        (no url) lives and dies with its control plane."""
        async with self._session() as session:
            candidates = list(await session.scalars(select(Worker.id).where(
                Worker.state == "active", Worker.url.is_not(None), Worker.last_heartbeat_at < silent_since
            )))  # fmt: skip
            down = []
            for worker_id in candidates:
                result = await session.execute(
                    update(Worker)
                    .where(Worker.id == worker_id, Worker.state == "active", Worker.last_heartbeat_at < silent_since)
                    .values(state="down")
                )
                if result.rowcount == 1:
                    down.append(worker_id)
            await session.commit()
            return down

    async def claim_capacity(
        self, sandbox_id: str, worker_id: str, *, cpu: float, memory_mib: int, cpu_capacity: float,
        memory_capacity: float,
    ) -> bool:
        """Place a `creating` sandbox on a worker if the worker is active, not draining and has
        room. Atomic across control planes: the first statement locks the worker's row
        (PostgreSQL) or takes SQLite's write lock, so the load read next cannot change before
        the placement commits."""
        async with self._session() as session:
            locked = await session.execute(
                update(Worker)
                .where(Worker.id == worker_id, Worker.state == "active", Worker.draining.is_(False))
                .values(last_heartbeat_at=Worker.last_heartbeat_at)
            )
            if locked.rowcount != 1:
                await session.rollback()
                return False
            used = (await session.execute(
                select(func.sum(Sandbox.vcpu * Sandbox.cpu_fraction), func.sum(Sandbox.memory_mib)).where(
                    Sandbox.worker_id == worker_id, Sandbox.state.in_(LIVE_STATES), Sandbox.id != sandbox_id
                )
            )).one()  # fmt: skip
            used_cpu, used_memory = float(used[0] or 0), int(used[1] or 0)
            if used_cpu + cpu > cpu_capacity + 1e-9 or used_memory + memory_mib > memory_capacity:
                await session.rollback()
                return False
            placed = await session.execute(
                update(Sandbox).where(Sandbox.id == sandbox_id, Sandbox.state == "creating").values(worker_id=worker_id)
            )
            await session.commit()
            return placed.rowcount == 1

    # --- worker tokens ------------------------------------------------------------------

    async def create_worker_token(self, name: str) -> CreatedWorkerToken:
        token = ids.new_worker_token()
        record = WorkerToken(
            id=ids.new_worker_token_id(), name=name, token_hash=ids.hash_secret(token), prefix=token[:12],
            created_at=utcnow(),
        )  # fmt: skip
        async with self._session() as session:
            session.add(record)
            await session.commit()
        return CreatedWorkerToken(token=token, token_id=record.id, name=name, prefix=record.prefix)

    async def list_worker_tokens(self) -> list[WorkerToken]:
        async with self._session() as session:
            return list(await session.scalars(select(WorkerToken).order_by(WorkerToken.created_at)))

    async def revoke_worker_token(self, token_id_or_prefix: str) -> int:
        async with self._session() as session:
            result = await session.execute(
                update(WorkerToken)
                .where(
                    (WorkerToken.id == token_id_or_prefix) | (WorkerToken.prefix == token_id_or_prefix),
                    WorkerToken.revoked_at.is_(None),
                )
                .values(revoked_at=utcnow())
            )
            await session.commit()
            return result.rowcount

    async def worker_token_active(self, token_id: str) -> bool:
        async with self._session() as session:
            row = await session.get(WorkerToken, token_id)
            return row is not None and row.revoked_at is None

    async def authenticate_worker(self, token: str) -> WorkerToken | None:
        async with self._session() as session:
            return await session.scalar(
                select(WorkerToken).where(
                    WorkerToken.token_hash == ids.hash_secret(token), WorkerToken.revoked_at.is_(None)
                )
            )

    async def worker_loads(self) -> dict[str, WorkerLoad]:
        async with self._session() as session:
            rows = await session.execute(
                select(
                    Sandbox.worker_id,
                    func.sum(Sandbox.vcpu * Sandbox.cpu_fraction),
                    func.sum(Sandbox.memory_mib),
                    func.count(),
                )
                .where(Sandbox.state.in_(LIVE_STATES), Sandbox.worker_id.is_not(None))
                .group_by(Sandbox.worker_id)
            )
            return {
                worker_id: WorkerLoad(vcpu=float(vcpu or 0), memory_mib=int(mem or 0), sandboxes=count)
                for worker_id, vcpu, mem, count in rows.all()
            }

    # --- sandboxes --------------------------------------------------------------------

    async def insert_sandbox(self, sandbox: Sandbox) -> None:
        async with self._session() as session:
            session.add(sandbox)
            await session.commit()

    async def get_sandbox(self, sandbox_id: str) -> Sandbox | None:
        async with self._session() as session:
            return await session.get(Sandbox, sandbox_id)

    async def list_sandboxes(
        self, *, user_id: str | None = None, worker_id: str | None = None, live: bool = True
    ) -> list[Sandbox]:
        query = select(Sandbox).order_by(Sandbox.created_at)
        if user_id is not None:
            query = query.where(Sandbox.user_id == user_id)
        if worker_id is not None:
            query = query.where(Sandbox.worker_id == worker_id)
        if live:
            query = query.where(Sandbox.state.in_(LIVE_STATES))
        async with self._session() as session:
            return list(await session.scalars(query))

    async def update_sandbox(
        self, sandbox_id: str, *, expect_state: tuple[str, ...] | None = None,
        teardown_started_before: datetime | None = None, **values,
    ) -> bool:
        """Update fields; with expect_state, only if the sandbox is in one of those states
        (and, with teardown_started_before, only if a teardown began before then, or never).

        The conditional form is how two actors (an API call and the reaper, or two control
        planes) agree on who performs a transition: the one whose update matched a row.
        """
        query = update(Sandbox).where(Sandbox.id == sandbox_id)
        if expect_state is not None:
            query = query.where(Sandbox.state.in_(expect_state))
        if teardown_started_before is not None:
            query = query.where(Sandbox.destroyed_at.is_(None) | (Sandbox.destroyed_at < teardown_started_before))
        async with self._session() as session:
            result = await session.execute(query.values(**values))
            await session.commit()
            return result.rowcount == 1

    async def touch_sandboxes(self, last_active: dict[str, datetime]) -> None:
        """Move last_active_at forward (never back) for each sandbox, in one transaction."""
        if not last_active:
            return
        async with self._session() as session:
            for sandbox_id, at in last_active.items():
                await session.execute(
                    update(Sandbox)
                    .where(Sandbox.id == sandbox_id, Sandbox.last_active_at < at)
                    .values(last_active_at=at)
                )
            await session.commit()

    async def purge_destroyed(self, older_than: timedelta) -> int:
        async with self._session() as session:
            result = await session.execute(
                delete(Sandbox).where(
                    Sandbox.state == "destroyed", Sandbox.destroyed_at < utcnow() - older_than
                )
            )
            await session.commit()
            return result.rowcount

    # --- sandbox access tokens (preview links) -------------------------------------------

    async def insert_access_token(self, token: SandboxAccessToken) -> None:
        async with self._session() as session:
            session.add(token)
            await session.commit()

    async def find_access_token(self, token_hash: str) -> SandboxAccessToken | None:
        """The live (unrevoked, unexpired) token with this hash, if any."""
        async with self._session() as session:
            return await session.scalar(
                select(SandboxAccessToken).where(
                    SandboxAccessToken.token_hash == token_hash,
                    SandboxAccessToken.revoked_at.is_(None),
                    SandboxAccessToken.expires_at > utcnow(),
                )
            )

    async def revoke_access_tokens(self, sandbox_id: str) -> int:
        async with self._session() as session:
            result = await session.execute(
                update(SandboxAccessToken)
                .where(SandboxAccessToken.sandbox_id == sandbox_id, SandboxAccessToken.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            await session.commit()
            return result.rowcount
