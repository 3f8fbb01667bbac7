"""The store's operations, one method per question the control plane asks."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from sandboxd import ids
from sandboxd.store.db import make_engine, migrate, sessionmaker
from sandboxd.store.models import ApiKey, Sandbox, SandboxAccessToken, User, Worker

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
        async with self._session() as session:
            await session.merge(worker)
            await session.commit()

    async def list_workers(self) -> list[Worker]:
        async with self._session() as session:
            return list(await session.scalars(select(Worker).order_by(Worker.registered_at)))

    async def set_worker_state(self, worker_id: str, state: str) -> None:
        async with self._session() as session:
            await session.execute(update(Worker).where(Worker.id == worker_id).values(state=state))
            await session.commit()

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

    async def update_sandbox(self, sandbox_id: str, *, expect_state: tuple[str, ...] | None = None, **values) -> bool:
        """Update fields; with expect_state, only if the sandbox is in one of those states.

        The conditional form is how two actors (an API call and the reaper, or two control
        planes) agree on who performs a transition: the one whose update matched a row.
        """
        query = update(Sandbox).where(Sandbox.id == sandbox_id)
        if expect_state is not None:
            query = query.where(Sandbox.state.in_(expect_state))
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
