"""The control plane's core: sandbox operations as typed commands over the store and workers.

It never sees HTTP: the API layer hands it validated requests and the caller's identity,
and maps the SandboxdError it raises to status codes in one place.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sandboxd import ids
from sandboxd.agents import registry as agent_registry
from sandboxd.api.schemas import CreateSandboxRequest, ExecRequest
from sandboxd.config import Settings
from sandboxd.controlplane.activity import ActivityTracker
from sandboxd.errors import BadRequest, Conflict, NoCapacity, NotFound, NotImplementedYet, SandboxdError, WorkerFailure
from sandboxd.scheduler.placement import Candidate, Demand, rank_workers
from sandboxd.store.models import Sandbox, Worker
from sandboxd.store.repo import Store, utcnow
from sandboxd.templates.spec import TemplateSpecError, load_template
from sandboxd.worker.interface import AgentSpec, CreateSandbox, ExecCommand, WorkerAPI

log = logging.getLogger(__name__)

SPEC_TEMPLATES = ("standard", "browser", "cua", "canvas")  # browser ships; cua, canvas: 501 until they land
SERVICE_ERRORS = ("service_not_ready", "service_failed")


@dataclass(frozen=True)
class Caller:
    user_id: str
    user_name: str


class SandboxService:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.activity = ActivityTracker(store)
        self._workers: dict[str, WorkerAPI] = {}
        self._destroying: set[str] = set()  # teardowns in progress in this control plane

    # --- workers ----------------------------------------------------------------------

    async def register_worker(self, handle: WorkerAPI) -> None:
        """Record a worker and its capacity, then reconcile what the store says it runs."""
        info = await handle.info()
        now = utcnow()
        await self.store.upsert_worker(
            Worker(
                id=info.worker_id,
                address=info.address,
                vcpus=info.vcpus,
                memory_mib=info.memory_mib,
                runtimes=info.runtimes,
                templates=info.templates,
                state="active",
                registered_at=now,
                last_heartbeat_at=now,
            )
        )
        self._workers[info.worker_id] = handle
        await self._reconcile_worker(handle)

    async def unregister_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        await self.store.set_worker_state(worker_id, "down")

    async def _reconcile_worker(self, handle: WorkerAPI) -> None:
        """After a restart: adopt what still runs, finish interrupted teardowns, mark the
        rest lost, and destroy strays the store does not know."""
        running = {status.vm_id for status in await handle.list_sandboxes() if status.alive}
        records = await self.store.list_sandboxes(worker_id=handle.worker_id)
        for sandbox in records:
            if sandbox.state == "stopping":
                if sandbox.id in running:
                    await handle.destroy_sandbox(sandbox.id)
                await self._mark_destroyed(sandbox.id, sandbox.destroy_reason or "user_request")
            elif sandbox.id not in running:
                await self._mark_destroyed(sandbox.id, "lost")
                log.warning("sandbox %s was lost while the worker was away", sandbox.id)
            else:
                await self.store.update_sandbox(sandbox.id, state="running", last_active_at=utcnow())
        for stray in running - {sandbox.id for sandbox in records}:
            log.warning("destroying stray sandbox %s the store does not know", stray)
            await handle.destroy_sandbox(stray)

    async def sweep_dead(self) -> list[str]:
        """Destroy (reason `lost`) sandboxes whose init died under a running worker."""
        lost = []
        for handle in list(self._workers.values()):
            for status in await handle.list_sandboxes():
                if not status.alive and await self.destroy_by_id(status.vm_id, "lost"):
                    lost.append(status.vm_id)
        return lost

    def _worker(self, worker_id: str | None) -> WorkerAPI:
        handle = self._workers.get(worker_id or "")
        if handle is None:
            raise WorkerFailure("the sandbox's worker is not connected", code="worker_unavailable")
        return handle

    # --- sandboxes --------------------------------------------------------------------

    async def create(self, caller: Caller, request: CreateSandboxRequest) -> Sandbox:
        agent = self._check_agent_fields(request)
        try:
            spec = load_template(request.template, self.settings.templates_dir)
        except TemplateSpecError:
            if request.template in SPEC_TEMPLATES:
                raise NotImplementedYet(
                    f"template: {request.template!r} is not yet available on this server",
                    code="template_not_available",
                    field="template",
                ) from None
            raise NotImplementedYet(
                f"template: unknown template {request.template!r}", code="unknown_template", field="template"
            ) from None

        resources = spec.resources
        workers = [w for w in await self.store.list_workers() if w.state == "active" and w.id in self._workers]
        offered = sorted({runtime for w in workers for runtime in w.runtimes})
        if request.runtime is not None and workers and request.runtime not in offered:
            raise BadRequest(
                f"runtime: unknown runtime {request.runtime!r}; this server offers {', '.join(offered)}",
                code="unknown_runtime",
                field="runtime",
            )
        loads = await self.store.worker_loads()
        candidates = [
            Candidate(
                worker_id=w.id,
                vcpus=w.vcpus,
                memory_mib=w.memory_mib,
                used_vcpu=loads[w.id].vcpu if w.id in loads else 0.0,
                used_memory_mib=loads[w.id].memory_mib if w.id in loads else 0,
                runtimes=tuple(w.runtimes),
            )
            for w in workers
        ]
        ranked = rank_workers(
            candidates,
            Demand(
                cpu=resources.vcpu * resources.cpu_fraction, memory_mib=resources.memory_mib, runtime=request.runtime
            ),
            cpu_overcommit=self.settings.cpu_overcommit,
            memory_overcommit=self.settings.memory_overcommit,
        )
        addresses = {w.id: w.address for w in workers}

        now = utcnow()
        sandbox = Sandbox(
            id=ids.new_sandbox_id(),
            user_id=caller.user_id,
            worker_id=ranked[0],
            template=request.template,
            runtime=request.runtime or "oci",  # the worker's answer replaces it
            state="creating",
            vcpu=resources.vcpu,
            cpu_fraction=resources.cpu_fraction,
            memory_mib=resources.memory_mib,
            metadata_=request.metadata,
            idle_timeout_seconds=request.idle_timeout_seconds,
            max_lifetime_seconds=request.max_lifetime_seconds,
            created_at=now,
            last_active_at=now,
            agent=request.agent,  # never the llm_key, nor the task
        )
        # The record exists before the worker acts, so a crash at any point leaves something
        # the reconciler can settle (adopt or mark lost) instead of an orphan.
        await self.store.insert_sandbox(sandbox)
        last_error: SandboxdError | None = None
        for worker_id in ranked:
            handle = self._workers[worker_id]
            await self.store.update_sandbox(sandbox.id, worker_id=worker_id)
            try:
                status = await handle.create_sandbox(
                    CreateSandbox(
                        vm_id=sandbox.id,
                        template=request.template,
                        vcpu=resources.vcpu,
                        cpu_fraction=resources.cpu_fraction,
                        memory_mib=resources.memory_mib,
                        env=dict(request.env_vars),
                        runtime=request.runtime,
                        agent=agent,
                    )
                )
            except (SandboxdError, OSError) as exc:
                log.warning("worker %s could not create %s: %s", worker_id, sandbox.id, exc)
                last_error = exc if isinstance(exc, SandboxdError) else WorkerFailure(str(exc))
                continue
            except BaseException:
                # cancelled (client went away, shutdown): do not leave a half-made sandbox
                await asyncio.shield(self._abandon_create(handle, sandbox.id))
                raise
            endpoint = f"http://{addresses[worker_id]}:{status.host_port}" if status.host_port else None
            values = dict(
                state="running",
                worker_id=worker_id,
                host_port=status.host_port,
                endpoint=endpoint,
                rootfs=status.rootfs,
                runtime=status.runtime or "oci",
                last_active_at=utcnow(),
            )
            if agent is not None and agent.task is not None:
                values["agent_status"] = "running"  # the worker answers once the run has started
            if not await self.store.update_sandbox(sandbox.id, expect_state=("creating",), **values):
                raise Conflict(f"sandbox {sandbox.id} was destroyed while it was being created", field="id")
            for key, value in values.items():
                setattr(sandbox, key, value)
            return sandbox
        await self._mark_destroyed(sandbox.id, "create_failed")
        if isinstance(last_error, NoCapacity) or getattr(last_error, "code", None) in SERVICE_ERRORS:
            raise last_error  # a template service that never got ready names itself
        raise WorkerFailure(f"no worker could create the sandbox: {last_error.message if last_error else ''}")

    async def _abandon_create(self, handle: WorkerAPI, sandbox_id: str) -> None:
        try:
            await handle.destroy_sandbox(sandbox_id)
        finally:
            await self._mark_destroyed(sandbox_id, "create_failed")

    def _check_agent_fields(self, request: CreateSandboxRequest) -> AgentSpec | None:
        """The agent to start (None without one), or 400/501 for bad agent input."""
        if request.agent is None:
            for name in ("llm_key", "task", "model", "llm_base_url"):
                if getattr(request, name) is not None:
                    raise BadRequest(f"{name}: only allowed together with agent", code="agent_required", field=name)
            return None
        if request.llm_key is None:
            raise BadRequest("llm_key: required when agent is set", code="missing_field", field="llm_key")
        kind = agent_registry.get(request.agent)  # 501 unknown_agent / agent_not_available
        kind.check_model(request.model)  # 400 naming `model`
        base_url = request.llm_base_url
        if base_url is None:
            provider = agent_registry.provider(kind, request.model)
            base_url = self.settings.anthropic_base_url if provider == "anthropic" else self.settings.openai_base_url
        return AgentSpec(
            kind=request.agent, model=request.model, llm_key=request.llm_key, task=request.task, base_url=base_url
        )

    async def get(self, caller: Caller, sandbox_id: str) -> Sandbox:
        sandbox = await self.store.get_sandbox(sandbox_id) if ids.is_sandbox_id(sandbox_id) else None
        # Another tenant's sandbox is indistinguishable from one that does not exist.
        if sandbox is None or sandbox.user_id != caller.user_id:
            raise NotFound(f"no sandbox {sandbox_id!r}", code="sandbox_not_found", field="id")
        return sandbox

    async def get_running(self, caller: Caller, sandbox_id: str) -> Sandbox:
        sandbox = await self.get(caller, sandbox_id)
        if sandbox.state != "running":
            raise Conflict(f"sandbox {sandbox_id} is {sandbox.state}", code="sandbox_not_running", field="id")
        return sandbox

    async def list(self, caller: Caller) -> tuple[list[Sandbox], bool]:
        """The caller's live sandboxes, and whether the answer is partial (a worker is down)."""
        sandboxes = await self.store.list_sandboxes(user_id=caller.user_id)
        partial = any(s.worker_id not in self._workers for s in sandboxes if s.worker_id)
        return sandboxes, partial

    async def exec(self, caller: Caller, sandbox_id: str, request: ExecRequest) -> dict:
        sandbox = await self.get_running(caller, sandbox_id)
        self.activity.touch(sandbox.id)
        try:
            return await self._worker(sandbox.worker_id).exec(
                sandbox.id,
                ExecCommand(
                    command=request.command,
                    cwd=request.cwd,
                    env=dict(request.env),
                    timeout_seconds=request.timeout_seconds,
                    stdin=request.stdin,
                    user=request.user,
                ),
            )
        finally:
            self.activity.touch(sandbox.id)

    async def logs(self, caller: Caller, sandbox_id: str, since: datetime | None, limit: int) -> dict:
        sandbox = await self.get_running(caller, sandbox_id)
        self.activity.touch(sandbox.id)
        since_text = since.isoformat() if since else None
        return await self._worker(sandbox.worker_id).logs(sandbox.id, since_text, limit)

    async def cancel(self, caller: Caller, sandbox_id: str) -> dict:
        """Cooperative cancel: SIGINT to the agent now; the worker escalates to SIGTERM after
        the grace period (settings.agent_cancel_grace_seconds), then SIGKILL. The run ends
        `failed` with its exit code (the reaper records it); the sandbox stays up."""
        sandbox = await self.get_running(caller, sandbox_id)
        if sandbox.agent is None or sandbox.agent_status != "running":
            raise Conflict(f"sandbox {sandbox_id} has no running agent to cancel", code="no_running_agent", field="id")
        self.activity.touch(sandbox.id)
        await self._worker(sandbox.worker_id).cancel_agent(sandbox.id, self.settings.agent_cancel_grace_seconds)
        return {"vm_id": sandbox.id, "cancelled": True, "reason": "user_request"}

    async def destroy(self, caller: Caller, sandbox_id: str) -> Sandbox:
        sandbox = await self.get(caller, sandbox_id)
        if sandbox.state == "destroyed":
            return sandbox
        await self.destroy_by_id(sandbox.id, "user_request")
        return await self.get(caller, sandbox_id)

    async def destroy_by_id(self, sandbox_id: str, reason: str, *, retry: bool = False) -> bool:
        """Tear a sandbox down. Returns False if another actor is already doing it.

        With retry, a sandbox left `stopping` by an earlier failed teardown is taken up again.
        """
        claimable = ("stopping",) if retry else ("creating", "running")
        claimed = await self.store.update_sandbox(
            sandbox_id, expect_state=claimable, state="stopping", destroy_reason=reason
        )
        sandbox = await self.store.get_sandbox(sandbox_id)
        if sandbox is None:
            return False
        if not claimed:
            if sandbox.state == "stopping":
                await self._wait_until_destroyed(sandbox_id)
            return False
        handle = self._workers.get(sandbox.worker_id or "")
        self._destroying.add(sandbox_id)
        try:
            if handle is not None:
                await asyncio.shield(handle.destroy_sandbox(sandbox_id))
        except Exception:
            # Left `stopping`: the reaper retries, so nothing is forgotten.
            log.exception("destroying %s failed; will retry", sandbox_id)
            raise WorkerFailure(f"destroying {sandbox_id} failed on its worker; it will be retried") from None
        finally:
            self._destroying.discard(sandbox_id)
        await self._mark_destroyed(sandbox_id, reason)
        return True

    async def _wait_until_destroyed(self, sandbox_id: str, timeout: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            sandbox = await self.store.get_sandbox(sandbox_id)
            if sandbox is None or sandbox.state == "destroyed":
                return
            await asyncio.sleep(0.05)

    async def _mark_destroyed(self, sandbox_id: str, reason: str) -> None:
        sandbox = await self.store.get_sandbox(sandbox_id)
        if sandbox is not None and sandbox.agent_status == "running":  # it died with its sandbox
            await self.store.update_sandbox(sandbox_id, agent_status="failed")
        await self.store.update_sandbox(
            sandbox_id,
            state="destroyed",
            destroyed_at=utcnow(),
            destroy_reason=reason,
            host_port=None,
            endpoint=None,
        )

    # --- reaping ----------------------------------------------------------------------

    async def reap_once(self) -> list[tuple[str, str]]:
        """Destroy sandboxes past their lifetime, idle, or dead; retry stuck teardowns."""
        await self.activity.flush()
        reaped: list[tuple[str, str]] = [(sandbox_id, "lost") for sandbox_id in await self.sweep_dead()]
        now = utcnow()
        for sandbox in await self.store.list_sandboxes():
            if sandbox.worker_id not in self._workers:
                continue
            reason = None
            retry = False
            if sandbox.state == "stopping":
                if sandbox.id in self._destroying:
                    continue
                reason, retry = sandbox.destroy_reason or "user_request", True
            elif sandbox.state != "running":
                continue
            elif sandbox.agent_status == "running" and await self._agent_ended(sandbox):
                continue  # it ended just now: the idle timer starts from here
            elif now - sandbox.created_at >= timedelta(seconds=sandbox.max_lifetime_seconds):
                reason = "max_lifetime"
            elif now - sandbox.last_active_at >= timedelta(seconds=sandbox.idle_timeout_seconds):
                if sandbox.agent_status == "running" or await self._busy(sandbox):
                    self.activity.touch(sandbox.id)
                    continue
                reason = "idle_timeout"
            if reason is None:
                continue
            try:
                if await self.destroy_by_id(sandbox.id, reason, retry=retry):
                    reaped.append((sandbox.id, reason))
            except SandboxdError as exc:
                log.warning("reaper could not destroy %s: %s", sandbox.id, exc.message)
        await self.store.purge_destroyed(timedelta(hours=self.settings.destroyed_retention_hours))
        return reaped

    async def _agent_ended(self, sandbox: Sandbox) -> bool:
        """Record the end of the sandbox's agent run, if it ended; the idle timer starts then."""
        try:
            state = await self._worker(sandbox.worker_id).agent_status(sandbox.id)
        except SandboxdError as exc:
            log.debug("agent status of %s unknown: %s", sandbox.id, exc.message)
            return False
        if state.status == "running":
            return False
        status = state.status or "failed"
        now = utcnow()
        if not await self.store.update_sandbox(
            sandbox.id, expect_state=("running",), agent_status=status, agent_exit_code=state.exit_code,
            last_active_at=now,
        ):  # fmt: skip
            return False
        self.activity.touch(sandbox.id)
        sandbox.agent_status, sandbox.agent_exit_code, sandbox.last_active_at = status, state.exit_code, now
        log.info("agent %s in %s ended: %s (exit code %s)", sandbox.agent, sandbox.id, status, state.exit_code)
        return True

    async def _busy(self, sandbox: Sandbox) -> bool:
        try:
            status = await self._worker(sandbox.worker_id).sandbox_status(sandbox.id)
        except SandboxdError:
            return False
        return status.running_commands > 0
