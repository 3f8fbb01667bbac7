"""The control plane's core: sandbox operations as typed commands over the store and workers.

It never sees HTTP: the API layer hands it validated requests and the caller's identity,
and maps the SandboxdError it raises to status codes in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sandboxd import ids
from sandboxd.agents import registry as agent_registry
from sandboxd.api.schemas import CreateSandboxRequest, ExecRequest
from sandboxd.config import Settings
from sandboxd.controlplane.activity import ActivityTracker
from sandboxd.errors import (
    BadRequest,
    Conflict,
    NoCapacity,
    NotFound,
    NotImplementedYet,
    NoWorkers,
    SandboxdError,
    WorkerFailure,
)
from sandboxd.scheduler.placement import Candidate, Demand, rank_workers
from sandboxd.store.models import Sandbox, Worker
from sandboxd.store.repo import LIVE_STATES, Store, utcnow
from sandboxd.templates.spec import TemplateSpecError, load_template
from sandboxd.worker.interface import AgentSpec, CreateSandbox, ExecCommand, WorkerAPI, WorkerInfo

log = logging.getLogger(__name__)

SPEC_TEMPLATES = ("standard", "browser", "cua", "canvas")  # 501 template_not_available while a file is missing
SERVICE_ERRORS = ("service_not_ready", "service_failed")
TEARDOWN_LEASE = timedelta(seconds=30)  # a `stopping` teardown older than this is retried


@dataclass(frozen=True)
class Caller:
    user_id: str
    user_name: str


class SandboxService:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.activity = ActivityTracker(store)
        self._workers: dict[str, WorkerAPI] = {}  # the workers this control plane can call
        self._in_process: set[str] = set()  # of those, the ones living in this process (never down)
        self._destroying: set[str] = set()  # teardowns in progress in this control plane

    # --- workers ----------------------------------------------------------------------

    async def register_worker(
        self, handle: WorkerAPI, *, url: str | None = None, token_id: str | None = None
    ) -> WorkerInfo:
        """Record a worker and its capacity, then reconcile what the store says it runs.

        `url` is a remote worker's API (None: the worker lives in this process)."""
        info = await handle.info()
        now = utcnow()
        await self.store.upsert_worker(
            Worker(
                id=info.worker_id,
                address=info.address,
                url=url,
                vcpus=info.vcpus,
                memory_mib=info.memory_mib,
                runtimes=info.runtimes,
                templates=info.templates,
                state="active",
                registered_at=now,
                last_heartbeat_at=now,
                draining=False,
                token_id=token_id,
            )
        )
        previous = self._workers.get(info.worker_id)
        self._workers[info.worker_id] = handle
        if url is None:
            self._in_process.add(info.worker_id)
        if previous is not None and previous is not handle and hasattr(previous, "aclose"):
            await previous.aclose()  # a remote worker's earlier registration (its secret is void now)
        await self._reconcile_worker(handle)
        return info

    async def unregister_worker(self, worker_id: str) -> None:
        handle = self._workers.pop(worker_id, None)
        self._in_process.discard(worker_id)
        if handle is not None and hasattr(handle, "aclose"):
            await handle.aclose()
        await self.store.set_worker_state(worker_id, "down")

    async def _unreachable_workers(self) -> set[str]:
        """Workers whose sandboxes this control plane cannot vouch for: down, or not
        registered with it (yet: a worker registers again after a control-plane restart)."""
        return {w.id for w in await self.store.list_workers() if w.state != "active" or w.id not in self._workers}

    async def _reachable(self, worker_id: str | None) -> WorkerAPI | None:
        handle = self._workers.get(worker_id or "")
        if handle is None:
            return None
        worker = await self.store.get_worker(worker_id)
        return handle if worker is not None and worker.state == "active" else None

    async def check_workers(self) -> None:
        """Heartbeat bookkeeping, run by every control plane's monitor loop (each transition
        is conditional, so two control planes never both perform one)."""
        now = utcnow()
        for worker_id in self._in_process:
            await self.store.heartbeat_worker(worker_id, now)
        for worker_id in await self.store.mark_silent_workers_down(
            now - timedelta(seconds=self.settings.worker_down_after_seconds)
        ):
            log.warning("worker %s missed its heartbeats: down; its sandboxes read `unknown`", worker_id)
        lost_before = now - timedelta(seconds=self.settings.worker_lost_after_seconds)
        for worker in await self.store.list_workers():
            if worker.state != "down" or worker.last_heartbeat_at >= lost_before:
                continue
            for sandbox in await self.store.list_sandboxes(worker_id=worker.id):
                if await self._mark_destroyed(sandbox.id, "lost"):
                    log.warning("sandbox %s lost: its worker %s stayed down", sandbox.id, worker.id)

    async def _reconcile_worker(self, handle: WorkerAPI) -> None:
        """After a restart: adopt what still runs, finish interrupted teardowns, mark the
        rest lost, and destroy strays the store does not know."""
        running = {status.vm_id for status in await handle.list_sandboxes() if status.alive}
        records = await self.store.list_sandboxes(worker_id=handle.worker_id)
        abandoned_before = utcnow() - timedelta(seconds=self.settings.create_timeout_seconds)
        for sandbox in records:
            if sandbox.state == "creating":
                if sandbox.created_at >= abandoned_before:
                    continue  # a create in progress (maybe in another control plane)
                await self.destroy_by_id(sandbox.id, "create_failed")
            elif sandbox.state == "stopping":
                if sandbox.id in running:
                    await handle.destroy_sandbox(sandbox.id)
                await self._mark_destroyed(sandbox.id, sandbox.destroy_reason or "user_request")
            elif sandbox.id not in running:
                if await self._mark_destroyed(sandbox.id, "lost"):
                    log.warning("sandbox %s was lost while the worker was away", sandbox.id)
            else:
                await self.store.update_sandbox(sandbox.id, expect_state=("running",), last_active_at=utcnow())
        live_anywhere = {sandbox.id for sandbox in await self.store.list_sandboxes()}
        for stray in running - live_anywhere:
            log.warning("destroying stray sandbox %s the store does not know", stray)
            await handle.destroy_sandbox(stray)

    async def sweep_dead(self) -> list[str]:
        """Destroy (reason `lost`) sandboxes whose init died under a running worker, and
        sandboxes a worker runs that the store no longer keeps live (a create whose answer
        never came back, a DELETE recorded while the worker was away)."""
        lost = []
        unreachable = await self._unreachable_workers()
        for worker_id, handle in list(self._workers.items()):
            if worker_id in unreachable:
                continue
            try:
                statuses = await handle.list_sandboxes()
            except SandboxdError as exc:  # a remote worker between heartbeats: the monitor decides
                log.info("worker %s did not list its sandboxes: %s", worker_id, exc.message)
                continue
            live = {sandbox.id for sandbox in await self.store.list_sandboxes(worker_id=worker_id)}
            for status in statuses:
                if status.vm_id not in live:  # every record is written before its worker acts
                    log.warning("destroying stray sandbox %s on %s", status.vm_id, worker_id)
                    await handle.destroy_sandbox(status.vm_id)
                elif not status.alive and await self.destroy_by_id(status.vm_id, "lost"):
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
        workers = [
            w for w in await self.store.list_workers()
            if w.state == "active" and not w.draining and w.id in self._workers
        ]
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
        if not candidates:
            raise NoWorkers("no workers available: none registered, or every one is down or draining")
        ranked = rank_workers(
            candidates,
            Demand(
                cpu=resources.vcpu * resources.cpu_fraction, memory_mib=resources.memory_mib, runtime=request.runtime
            ),
            cpu_overcommit=self.settings.cpu_overcommit,
            memory_overcommit=self.settings.memory_overcommit,
        )
        by_id = {w.id: w for w in workers}

        now = utcnow()
        sandbox = Sandbox(
            id=ids.new_sandbox_id(),
            user_id=caller.user_id,
            worker_id=None,  # set by claim_capacity
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
        cpu = resources.vcpu * resources.cpu_fraction
        for worker_id in ranked:
            worker = by_id[worker_id]
            # The ranking read loads without a lock; the claim re-checks room atomically, so two
            # control planes (or two creates here) never overfill a worker.
            if not await self.store.claim_capacity(
                sandbox.id, worker_id, cpu=cpu, memory_mib=resources.memory_mib,
                cpu_capacity=worker.vcpus * self.settings.cpu_overcommit,
                memory_capacity=worker.memory_mib * self.settings.memory_overcommit,
            ):  # fmt: skip
                continue
            handle = self._workers[worker_id]
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
                # a remote worker may have got further than its answer says: leave nothing there
                with contextlib.suppress(SandboxdError, OSError):
                    await handle.destroy_sandbox(sandbox.id)
                continue
            except BaseException:
                # cancelled (client went away, shutdown): do not leave a half-made sandbox
                await asyncio.shield(self._abandon_create(handle, sandbox.id))
                raise
            endpoint = f"http://{worker.address}:{status.host_port}" if status.host_port else None
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
        if last_error is None:  # every claim lost: others filled the workers meanwhile
            raise NoCapacity("no capacity on any worker for this sandbox")
        if isinstance(last_error, (NoCapacity, BadRequest)) or getattr(last_error, "code", None) in SERVICE_ERRORS:
            raise last_error  # the request itself (400), or a template service that never got ready, names itself
        if getattr(last_error, "code", None) == "worker_unreachable":
            raise NoWorkers(f"no worker could be reached: {last_error.message}")
        raise WorkerFailure(f"no worker could create the sandbox: {last_error.message}")

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
        if sandbox.state in LIVE_STATES and sandbox.worker_id and await self._reachable(sandbox.worker_id) is None:
            sandbox.state = "unknown"  # its worker is down: said, never stored (the record stays as it was)
        return sandbox

    async def get_running(self, caller: Caller, sandbox_id: str) -> Sandbox:
        sandbox = await self.get(caller, sandbox_id)
        if sandbox.state != "running":
            raise Conflict(f"sandbox {sandbox_id} is {sandbox.state}", code="sandbox_not_running", field="id")
        return sandbox

    async def list(self, caller: Caller) -> tuple[list[Sandbox], bool]:
        """The caller's live sandboxes, and whether the answer is partial (a worker is down)."""
        sandboxes = await self.store.list_sandboxes(user_id=caller.user_id)
        unreachable = await self._unreachable_workers()
        vouched = [s for s in sandboxes if s.worker_id not in unreachable]
        return vouched, len(vouched) < len(sandboxes)

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
        # While `stopping`, destroyed_at says when the teardown began: a retry takes over only
        # a teardown older than TEARDOWN_LEASE, so two control planes never tear down at once.
        now = utcnow()
        claimed = await self.store.update_sandbox(
            sandbox_id,
            expect_state=("stopping",) if retry else ("creating", "running"),
            teardown_started_before=now - TEARDOWN_LEASE if retry else None,
            state="stopping",
            destroy_reason=reason,
            destroyed_at=now,
        )
        sandbox = await self.store.get_sandbox(sandbox_id)
        if sandbox is None:
            return False
        if not claimed:
            if sandbox.state == "stopping":
                await self._wait_until_destroyed(sandbox_id)
            return False
        # A down worker's sandbox is recorded destroyed now; when the worker returns, its
        # registration destroys what the store no longer knows (strays).
        handle = await self._reachable(sandbox.worker_id)
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

    async def _mark_destroyed(self, sandbox_id: str, reason: str) -> bool:
        """Live -> destroyed; False if it was destroyed already (by another actor)."""
        sandbox = await self.store.get_sandbox(sandbox_id)
        if sandbox is not None and sandbox.agent_status == "running":  # it died with its sandbox
            await self.store.update_sandbox(sandbox_id, agent_status="failed")
        return await self.store.update_sandbox(
            sandbox_id,
            expect_state=LIVE_STATES,
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
        unreachable = await self._unreachable_workers()
        abandoned_before = now - timedelta(seconds=self.settings.create_timeout_seconds)
        for sandbox in await self.store.list_sandboxes():
            reason = None
            retry = False
            if sandbox.state == "creating" and sandbox.created_at < abandoned_before:
                reason = "create_failed"  # its control plane died mid-create
            elif sandbox.worker_id not in self._workers or sandbox.worker_id in unreachable:
                continue
            elif sandbox.state == "stopping":
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
