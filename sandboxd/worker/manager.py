"""The local worker: boots sandboxes with a runtime backend, keeps their state on disk,
reaches their guest agents, and reclaims what a crash left behind.

Per-sandbox layout under DATA_DIR/sandboxes/<vm_id>/:
    state.json   what the worker needs to re-adopt the sandbox after a restart (0600)
    agent/       shared with the guest agent (its socket; boot.json until the agent reads it)
    runtime/     owned by the runtime backend (bundle, writable layer)
"""

from __future__ import annotations

import asyncio
import compileall
import json
import logging
import os
import secrets
import shlex
import shutil
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Awaitable, TypeVar

import sandboxd.agents
import sandboxd.guest
from sandboxd.agents import registry as agent_registry
from sandboxd.agents.base import GUEST_AGENTS_DIR, GUEST_CLI_DIR, CliLayer
from sandboxd.config import Settings
from sandboxd.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, SandboxdError, WorkerFailure
from sandboxd.guest.client import GuestClient, GuestError, GuestUnavailable
from sandboxd.guest.protocol import BOOT_CONFIG_NAME, PROTOCOL_VERSION, SOCKET_NAME
from sandboxd.runtime.base import LaunchSpec, Resources
from sandboxd.runtime.gvisor import GvisorRuntime, probe_platform, runsc_path
from sandboxd.runtime.microvm import MicrovmRuntime
from sandboxd.runtime.network import NetworkManager, NetworkSlot
from sandboxd.runtime.oci import OciRuntime, default_nameservers
from sandboxd.templates.builder import TemplateStore
from sandboxd.templates.spec import load_template, service_boot
from sandboxd.worker.interface import (
    AgentSpec,
    AgentState,
    CreateSandbox,
    ExecCommand,
    PortTarget,
    SandboxStatus,
    WorkerInfo,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

AGENT_READY_TIMEOUT_SECONDS = 20.0
GUEST_CODE_DIR = Path(sandboxd.guest.__file__).parent
AGENTS_CODE_DIR = Path(sandboxd.agents.__file__).parent  # mounted at GUEST_AGENTS_DIR in every sandbox
GUEST_OMNIPARSER_DIR = "/opt/omniparser"  # settings.omniparser_dir, in templates with a desktop-api service
GUEST_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the guest agent's BASE_ENV
AGENT_KILL_AFTER_TERM_SECONDS = 5.0  # cancel: SIGINT, grace, SIGTERM, this long, SIGKILL


def _memory_total_mib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _load_or_create_worker_id(data_dir: Path) -> str:
    from sandboxd import ids

    path = data_dir / "worker_id"
    if path.exists():
        return path.read_text().strip()
    worker_id = ids.new_worker_id()
    path.write_text(worker_id + "\n")
    return worker_id


class _Sandbox:
    """What the worker holds for one running sandbox."""

    def __init__(self, vm_id: str, state: dict, client: GuestClient):
        self.vm_id = vm_id
        self.state = state
        self.client = client

    @property
    def slot(self) -> NetworkSlot:
        return _slot_from_state(self.state)

    def status(self, running_commands: int = 0) -> SandboxStatus:
        return SandboxStatus(
            vm_id=self.vm_id,
            alive=True,
            host_port=self.state["slot"]["host_port"],
            rootfs=self.state["image_name"],
            runtime=_runtime_key(self.state),
            running_commands=running_commands,
        )


class LocalWorker:
    """Implements WorkerAPI in-process. A remote worker serves the same calls over HTTP."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.data_dir = settings.data_dir
        self.sandboxes_dir = settings.data_dir / "sandboxes"
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.worker_id = _load_or_create_worker_id(settings.data_dir)
        instance = self.worker_id.removeprefix("wrk_")
        nameservers = default_nameservers()
        self.runtime = OciRuntime(
            binary=settings.oci_runtime, state_root=Path("/run/sandboxd") / instance, nameservers=nameservers
        )
        # Runtimes offered, by API name (README: Runtimes); `gvisor` joins in start() when
        # runsc is installed and boots here.
        self.runtimes: dict[str, OciRuntime | MicrovmRuntime] = {"oci": self.runtime}
        self.default_runtime = "oci"
        self.gvisor_platform: str | None = None
        self._nameservers = nameservers
        self._state_root = Path("/run/sandboxd") / instance
        # The host's resolvers often sit in a private range that sandboxes may not reach
        # otherwise; DNS must keep working inside.
        self.network = NetworkManager(
            instance,
            subnet=settings.subnet,
            host_port_base=settings.host_port_base,
            egress_allow=[ns for ns in nameservers if ":" not in ns],
        )
        self.templates = TemplateStore(settings.cache_dir, mirror=settings.mirror)
        self._sandboxes: dict[str, _Sandbox] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._cli_layer_lock = asyncio.Lock()
        self._cancels: dict[str, asyncio.Task] = {}  # vm_id -> the escalation after a cancel's SIGINT

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        # The guest code is mounted read-only and run with -B; byte-compiling it here once
        # (the venv's python is Debian's, the same as the templates') saves each start ~8 ms.
        await asyncio.to_thread(compileall.compile_dir, str(GUEST_CODE_DIR), quiet=1)
        await self._setup_microvm()
        await self._setup_gvisor()
        await self.network.setup_host()
        await self._recover()

    async def _setup_microvm(self) -> None:
        """Offer `microvm` when QEMU, the cloud kernel and busybox-static are installed (the
        KVM-or-TCG probe runs once per boot; runtime/microvm.py)."""
        microvm = await MicrovmRuntime.create(self._state_root, self.settings.cache_dir / "microvm", self._nameservers)
        if microvm is not None:
            self.runtimes["microvm"] = microvm

    async def _setup_gvisor(self) -> None:
        """Offer `gvisor` when runsc is installed and a platform boots (probed once per boot)."""
        binary = runsc_path()
        if binary is not None:
            self.gvisor_platform = await probe_platform(binary)
            if self.gvisor_platform is not None:
                self.runtimes["gvisor"] = GvisorRuntime(
                    self._state_root, platform=self.gvisor_platform, nameservers=self._nameservers, binary_path=binary
                )
        if self.settings.runtime not in self.runtimes:
            raise RuntimeError(
                f"runtime {self.settings.runtime!r} is not available on this host "
                f"(runsc {'found' if binary else 'not installed'}; offered: {', '.join(self.runtimes)})"
            )
        self.default_runtime = self.settings.runtime

    def _agent_target(self, runtime: str, vm_id: str, slot: NetworkSlot) -> str:
        """Where the worker reaches the sandbox's guest agent: its unix socket, or (gVisor)
        TCP on the guest's veth address (runtime/gvisor.py says why)."""
        port = getattr(self.runtimes.get(runtime), "agent_port", None)
        if port is None:
            return str(self._socket_path(vm_id))
        return f"http://{slot.guest_ip}:{port}"

    async def _list_running(self) -> set[str]:
        running: set[str] = set()
        for runtime in self.runtimes.values():
            running |= await runtime.list_running()
        return running

    async def stop(self) -> None:
        """Leave sandboxes running (a restart re-adopts them); drop host rules if none remain."""
        for task in list(self._cancels.values()):
            task.cancel()
        for sandbox in self._sandboxes.values():
            await sandbox.client.aclose()
        if not self._sandboxes:
            await self.network.teardown_host()

    async def _recover(self) -> None:
        """Re-adopt sandboxes that survived a restart; clean up the ones that did not."""
        running = await self._list_running()
        for state_path in sorted(self.sandboxes_dir.glob("sbx_*/state.json")):
            vm_id = state_path.parent.name
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError):
                log.warning("unreadable state for %s; cleaning it up", vm_id)
                await self._teardown(vm_id, None)
                continue
            runtime = _runtime_key(state)
            if runtime in self.runtimes and "slot" in state:
                client = GuestClient(self._agent_target(runtime, vm_id, _slot_from_state(state)), state["token"])
            else:
                client = GuestClient(str(self._socket_path(vm_id)), state["token"])
            if vm_id in running:
                try:
                    await client.wait_ready(timeout=3.0)
                    self._sandboxes[vm_id] = _Sandbox(vm_id, state, client)
                    log.info("re-adopted %s", vm_id)
                    continue
                except (GuestError, GuestUnavailable, TimeoutError) as exc:
                    log.warning("%s runs but its agent does not answer (%s); destroying it", vm_id, exc)
            await client.aclose()
            await self._teardown(vm_id, _slot_from_state(state) if "slot" in state else None)
        # Sandbox directories without state (a crash mid-create) are leftovers too.
        for path in self.sandboxes_dir.glob("sbx_*"):
            if path.name not in self._sandboxes and not (path / "state.json").exists():
                await self._teardown(path.name, None)
        keep = set(self._sandboxes)
        for runtime in self.runtimes.values():
            await runtime.reclaim(keep)
        await self.network.reclaim(keep)

    # --- WorkerAPI --------------------------------------------------------------------

    async def info(self) -> WorkerInfo:
        host, _port = self.settings.listen_host_port
        return WorkerInfo(
            worker_id=self.worker_id,
            address=self.settings.advertise_address or (host if host not in ("0.0.0.0", "::") else "127.0.0.1"),
            vcpus=float(self.settings.worker_vcpus or os.cpu_count() or 1),
            memory_mib=int(self.settings.worker_memory_mib or _memory_total_mib() * 0.9),
            runtimes=list(self.runtimes),
            default_runtime=self.default_runtime,
            runtime_details={
                name: rt.details() if isinstance(rt, MicrovmRuntime) else
                {"binary": rt.name, **({"platform": rt.platform} if isinstance(rt, GvisorRuntime) else {})}
                for name, rt in self.runtimes.items()
            },
            templates=[name for name in ("standard", "browser", "cua", "canvas") if self.templates.get(name)],
        )

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def _dir(self, vm_id: str) -> Path:
        return self.sandboxes_dir / vm_id

    def _socket_path(self, vm_id: str) -> Path:
        return self._dir(vm_id) / "agent" / SOCKET_NAME

    async def ensure_template(self, name: str, progress=None):
        image = self.templates.get(name)
        spec = load_template(name, self.settings.templates_dir)
        if image is None or image.digest != self.templates.digest(spec):
            image = await asyncio.to_thread(self.templates.build, spec, progress=progress)
        return image

    async def create_sandbox(self, request: CreateSandbox) -> SandboxStatus:
        async with self._lock(request.vm_id):
            if request.vm_id in self._sandboxes:
                return self._sandboxes[request.vm_id].status()
            image = await self.ensure_template(request.template)
            spec = load_template(request.template, self.settings.templates_dir)
            sandbox_dir = self._dir(request.vm_id)
            agent_dir = sandbox_dir / "agent"
            runtime_dir = sandbox_dir / "runtime"
            token = secrets.token_urlsafe(32)
            kind = agent_registry.get(request.agent.kind) if request.agent is not None else None
            runtime_name = request.runtime or self.default_runtime
            if kind is not None and runtime_name in kind.unsupported_runtimes:
                raise BadRequest(
                    f"agent: {kind.name} does not work on the {runtime_name} runtime "
                    f"({kind.unsupported_runtimes[runtime_name]}); ask for another \"runtime\"",
                    code="agent_unsupported",
                    field="agent",
                )
            extra_mounts: list[tuple[Path, str]] = [(AGENTS_CODE_DIR, GUEST_AGENTS_DIR)]
            if self.settings.omniparser_dir is not None and any(s.name == "desktop-api" for s in spec.services):
                extra_mounts.append((self.settings.omniparser_dir, GUEST_OMNIPARSER_DIR))
            cli_layer = None
            if kind is not None and kind.needs_cli_layer:
                cli_layer = await self.cli_layer()
                extra_mounts.append((cli_layer.host_dir, GUEST_CLI_DIR))
            async with AsyncExitStack() as undo:
                sandbox_dir.mkdir(mode=0o700)
                undo.callback(shutil.rmtree, sandbox_dir, ignore_errors=True)
                agent_dir.mkdir(mode=0o700)
                runtime_dir.mkdir(mode=0o700)
                slot = await self.network.allocate(request.vm_id)
                undo.push_async_callback(self.network.release, slot)
                boot = {
                    "protocol": PROTOCOL_VERSION,
                    "vm_id": request.vm_id,
                    "hostname": request.vm_id,
                    "token": token,
                    "env": {**spec.env, **request.env},
                }
                if spec.services:  # started and supervised by the guest agent (guest/_services.py)
                    boot["services"] = service_boot(spec)
                if cli_layer is not None:  # the CLIs on PATH for exec too (the key is not in the env)
                    boot["path_prepend"] = [cli_layer.bin_dir]
                boot_path = agent_dir / BOOT_CONFIG_NAME
                fd = os.open(boot_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as boot_file:
                    json.dump(boot, boot_file)
                launch = LaunchSpec(
                    vm_id=request.vm_id,
                    hostname=request.vm_id,
                    rootfs=image.rootfs,
                    resources=Resources(
                        vcpu=request.vcpu,
                        cpu_fraction=request.cpu_fraction,
                        memory_mib=request.memory_mib,
                        pids_limit=spec.resources.pids_limit,
                        disk_mib=spec.resources.disk_mib,
                    ),
                    netns_path=slot.netns_path,
                    agent_dir=agent_dir,
                    guest_code_dir=GUEST_CODE_DIR,
                    state_dir=runtime_dir,
                    extra_ro_mounts=tuple(extra_mounts),
                )
                runtime = self.runtimes.get(runtime_name)
                if runtime is None:
                    raise BadRequest(
                        f"runtime: unknown runtime {runtime_name!r}; this worker offers {', '.join(self.runtimes)}",
                        code="unknown_runtime",
                        field="runtime",
                    )
                await runtime.launch(launch)
                undo.push_async_callback(runtime.destroy, request.vm_id, runtime_dir)
                agent_target = self._agent_target(runtime_name, request.vm_id, slot)
                client = GuestClient(agent_target, token)
                undo.push_async_callback(client.aclose)
                try:
                    await client.wait_ready(timeout=AGENT_READY_TIMEOUT_SECONDS)
                except (GuestError, GuestUnavailable, TimeoutError) as exc:
                    init_log = runtime_dir / "init.log"
                    tail = init_log.read_text(errors="replace")[-2000:] if init_log.exists() else ""
                    raise WorkerFailure(f"guest agent did not start: {exc}; {tail}", code="sandbox_boot_failed")
                if spec.services:
                    await self._wait_services(request.vm_id, client, spec)
                state = {
                    "vm_id": request.vm_id,
                    "template": request.template,
                    "image_name": image.image_name,
                    "digest": image.digest,
                    "runtime": runtime_name,  # oci | gvisor | microvm
                    "oci_binary": runtime.name,  # crun | runc | runsc | qemu-system-x86_64
                    "guest_agent": agent_target,  # for operators and tests; recovery recomputes it
                    "token": token,
                    "slot": asdict(slot) | {"netns_path": str(slot.netns_path)},
                }
                if kind is not None:  # never the llm_key or the task: only what finds the run again
                    state["agent"] = await self._start_agent(request.vm_id, client, kind, request.agent, cli_layer)
                _write_private_json(sandbox_dir / "state.json", state)
                undo.pop_all()
            sandbox = _Sandbox(request.vm_id, state, client)
            self._sandboxes[request.vm_id] = sandbox
            return sandbox.status()

    async def _wait_services(self, vm_id: str, client: GuestClient, spec) -> None:
        """Until every template service passes its readiness check; else the create fails
        (504 service_not_ready, 502 service_failed) naming the service, with its last log lines."""
        wait = max((s.readiness.timeout_seconds for s in spec.services if s.readiness), default=0.0) + 5.0
        try:
            doc = await client.proc_call("GET", "/services/wait", params={"timeout": wait}, timeout=wait + 10.0)
        except (GuestError, GuestUnavailable) as exc:
            raise WorkerFailure(f"template services of {vm_id} could not be checked: {exc}", code="service_failed")
        if doc.get("ready"):
            return
        states = {s["name"]: s for s in doc.get("services", [])}
        name = doc.get("failed") or next((n for n, s in states.items() if not s.get("ready")), "?")
        svc = states.get(name, {})
        try:
            logs = await client.logs(since=None, limit=200)
            tail = [e["text"] for e in logs.get("entries", []) if e.get("source") == "service"][-8:]
        except (GuestError, GuestUnavailable):
            tail = []
        error_text = svc.get("error") or f"not ready after {wait:g}s"
        exited = svc.get("state") in ("exited", "failed") and "exited" in error_text
        message = f"template: service {name!r} of template {spec.name!r} {error_text}"
        if tail:
            message += "; last lines: " + " | ".join(tail)[-1500:]
        error = WorkerFailure(message, code="service_failed" if exited else "service_not_ready", field="template")
        if not exited:
            error.status = 504
        raise error

    async def destroy_sandbox(self, vm_id: str) -> None:
        escalation = self._cancels.pop(vm_id, None)
        if escalation is not None:
            escalation.cancel()
        async with self._lock(vm_id):
            sandbox = self._sandboxes.pop(vm_id, None)
            if sandbox is not None:
                await sandbox.client.aclose()
                await self._teardown(vm_id, sandbox.slot)
            elif self._dir(vm_id).exists():
                await self._teardown(vm_id, None)
        self._locks.pop(vm_id, None)

    async def _teardown(self, vm_id: str, slot: NetworkSlot | None) -> None:
        sandbox_dir = self._dir(vm_id)
        # every runtime's destroy is idempotent and cheap when it does not own vm_id; the
        # sandbox's own runtime goes first (it may be unknown: unreadable state)
        try:
            first = _runtime_key(json.loads((sandbox_dir / "state.json").read_text()))
        except (OSError, ValueError, AttributeError):
            first = self.default_runtime
        for name in sorted(self.runtimes, key=lambda n: n != first):
            await self.runtimes[name].destroy(vm_id, sandbox_dir / "runtime")
        if slot is not None:  # without one (unreadable state), start-up's network.reclaim sweeps it
            await self.network.release(slot)
        await asyncio.to_thread(shutil.rmtree, sandbox_dir, True)

    def _get(self, vm_id: str) -> _Sandbox:
        sandbox = self._sandboxes.get(vm_id)
        if sandbox is None:
            raise NotFound(f"sandbox {vm_id} is not on this worker", code="sandbox_not_found")
        return sandbox

    async def sandbox_status(self, vm_id: str) -> SandboxStatus:
        sandbox = self._get(vm_id)
        try:
            status = await sandbox.client.status()
        except GuestUnavailable:
            return SandboxStatus(vm_id=vm_id, alive=False)
        return sandbox.status(running_commands=int(status.get("running_commands", 0)))

    async def list_sandboxes(self) -> list[SandboxStatus]:
        running = await self._list_running()
        return [
            sandbox.status() if vm_id in running else SandboxStatus(vm_id=vm_id, alive=False)
            for vm_id, sandbox in list(self._sandboxes.items())
        ]

    async def _guest(self, vm_id: str, call: Awaitable[T]) -> T:
        """Await one call to the sandbox's agent, its failures turned into the error tree."""
        try:
            return await call
        except GuestError as exc:
            raise _guest_error(exc) from None
        except GuestUnavailable as exc:
            raise WorkerFailure(f"sandbox {vm_id} is not answering: {exc}", code="sandbox_unreachable") from None

    async def exec(self, vm_id: str, command: ExecCommand) -> dict:
        client = self._get(vm_id).client
        return await self._guest(vm_id, client.exec(
            command.command,
            cwd=command.cwd,
            env=command.env or None,
            timeout_seconds=command.timeout_seconds,
            stdin=command.stdin,
            user=command.user,
        ))  # fmt: skip

    async def logs(self, vm_id: str, since: str | None, limit: int) -> dict:
        return await self._guest(vm_id, self._get(vm_id).client.logs(since=since, limit=limit))

    async def port_target(self, vm_id: str, port: int) -> PortTarget:
        """The guest's veth address: the host reaches any port of it directly (the nft rules
        drop only connections the sandbox opens towards the host, not the host's replies)."""
        return PortTarget(host=self._get(vm_id).slot.guest_ip, port=port)

    # --- agents (sandboxd/agents; the run is a background process of the guest agent) ---

    async def cli_layer(self) -> CliLayer:
        """The shared read-only layer of agent CLIs, installed on first use (once per version)."""
        async with self._cli_layer_lock:
            try:
                from sandboxd.agents.clis import install_layer

                return await asyncio.to_thread(install_layer, self.settings.cache_dir)
            except Exception as exc:  # noqa: BLE001 -- any failure: the agent cannot start here
                log.warning("installing the agent CLI layer failed: %s", exc)
                raise WorkerFailure(
                    f"agent: the agent CLI layer could not be installed: {str(exc)[-500:]}",
                    code="agent_install_failed",
                    field="agent",
                ) from None

    async def _start_agent(
        self, vm_id: str, client: GuestClient, kind, spec: AgentSpec, cli_layer: CliLayer | None
    ) -> dict:
        """Start the agent's run (or, without a task, write its config files); answers what
        state.json keeps: the kind and the run's process id, never the key or the task."""
        try:
            if spec.task is None:
                files = kind.ready_files(model=spec.model, llm_key=spec.llm_key, base_url=spec.base_url)
                for path, content in files.items():
                    data = content.encode() if isinstance(content, str) else bytes(content)

                    async def body(data=data):
                        yield data

                    params = {"path": path, "parents": "true", "mode": "0600"}
                    await client.files_upload("/files", params, body())
                return {"kind": kind.name, "process_id": None}
            run = kind.run(model=spec.model, task=spec.task, llm_key=spec.llm_key, base_url=spec.base_url)
            path = GUEST_DEFAULT_PATH if cli_layer is None else f"{cli_layer.bin_dir}:{GUEST_DEFAULT_PATH}"
            proc = await client.proc_call("POST", "/exec", json={
                "command": "exec " + shlex.join(run.argv),  # exec: signals reach the agent itself
                "cwd": run.cwd,
                "env": {"PATH": path, **run.env},  # the key lives here, in this process alone
                "background": True,
                "stdin": "",  # closed at once
                "log_source": "agent",
            })  # fmt: skip
        except (GuestError, GuestUnavailable) as exc:
            message = exc.message if isinstance(exc, GuestError) else str(exc)
            raise WorkerFailure(
                f"agent: {kind.name} could not be started in {vm_id}: {message}", code="agent_start_failed", field="agent"
            ) from None
        log.info("started agent %s in %s (%s)", kind.name, vm_id, proc["process_id"])
        return {"kind": kind.name, "process_id": proc["process_id"]}

    def _agent_process(self, vm_id: str) -> tuple[_Sandbox, str | None]:
        sandbox = self._get(vm_id)
        return sandbox, (sandbox.state.get("agent") or {}).get("process_id")

    async def agent_status(self, vm_id: str) -> AgentState:
        sandbox, process_id = self._agent_process(vm_id)
        if process_id is None:
            return AgentState(status=None)
        try:
            doc = await self._guest(vm_id, sandbox.client.proc_call("GET", "/procs/get", params={"id": process_id}))
        except NotFound:  # cannot happen (the run is never evicted), but do not spin on it
            return AgentState(status="failed")
        if doc.get("state") != "exited":
            return AgentState(status="running")
        code = doc.get("exit_code")
        # a cancelled run failed whatever its exit code (claude exits 0 on SIGINT)
        ok = code == 0 and not sandbox.state["agent"].get("cancelled")
        return AgentState(status="completed" if ok else "failed", exit_code=code)

    async def cancel_agent(self, vm_id: str, grace_seconds: float) -> None:
        sandbox, process_id = self._agent_process(vm_id)
        no_agent = Conflict(f"sandbox {vm_id} has no running agent to cancel", code="no_running_agent", field="id")
        if process_id is None:
            raise no_agent
        try:
            await self._guest(vm_id, sandbox.client.proc_call(
                "POST", "/procs/signal", json={"id": process_id, "signal": "SIGINT"}
            ))  # fmt: skip
        except (Conflict, NotFound):  # process_exited: it ended meanwhile
            raise no_agent from None
        if not sandbox.state["agent"].get("cancelled"):
            sandbox.state["agent"]["cancelled"] = True  # kept across a worker restart
            try:
                _write_private_json(self._dir(vm_id) / "state.json", sandbox.state)
            except OSError as exc:  # destroyed meanwhile
                log.debug("cannot record the cancel of %s: %s", vm_id, exc)
        if vm_id not in self._cancels:
            task = asyncio.create_task(self._escalate_cancel(vm_id, sandbox.client, process_id, grace_seconds))
            self._cancels[vm_id] = task
            task.add_done_callback(lambda t: self._cancels.pop(vm_id, None) if self._cancels.get(vm_id) is t else None)

    async def _escalate_cancel(self, vm_id: str, client: GuestClient, process_id: str, grace: float) -> None:
        """After the SIGINT: SIGTERM if the run still lives after ``grace``, SIGKILL 5 s later."""
        try:
            for sig, wait in (("SIGTERM", grace), ("SIGKILL", AGENT_KILL_AFTER_TERM_SECONDS)):
                deadline = asyncio.get_running_loop().time() + wait
                while True:  # /procs/wait waits at most 300 s a call
                    left = max(0.0, deadline - asyncio.get_running_loop().time())
                    doc = await client.proc_call(
                        "POST", "/procs/wait", params={"id": process_id, "timeout": min(left, 300.0)},
                        timeout=min(left, 300.0) + 10.0,
                    )  # fmt: skip
                    if doc.get("state") == "exited":
                        return
                    if left <= 0:
                        break
                log.info("agent in %s outlived its cancel grace; sending %s", vm_id, sig)
                await client.proc_call("POST", "/procs/signal", json={"id": process_id, "signal": sig})
        except (GuestError, GuestUnavailable) as exc:  # exited meanwhile, or the sandbox is gone
            log.debug("cancel escalation in %s ended: %s", vm_id, exc)

    # --- processes and PTYs (the agent's /procs and /pty; sandboxd/guest/_procs.py) -----

    async def exec_stream(self, vm_id: str, command: ExecCommand):
        body: dict = {"command": command.command, "stream": True, "env": command.env or {}}
        for name in ("cwd", "timeout_seconds", "stdin", "user"):
            if getattr(command, name) is not None:
                body[name] = getattr(command, name)
        return await self._guest(vm_id, self._get(vm_id).client.proc_stream("POST", "/exec", json=body))

    async def process_call(self, vm_id, method, op, params=None, body=None, content=None, timeout=None) -> dict:
        client = self._get(vm_id).client
        return await self._guest(
            vm_id, client.proc_call(method, op, params=params, json=body, content=content, timeout=timeout)
        )

    async def process_stream(self, vm_id: str, op: str, params: dict):
        return await self._guest(vm_id, self._get(vm_id).client.proc_stream("GET", op, params=params))

    async def open_pty(self, vm_id: str, params: dict):
        return await self._guest(vm_id, self._get(vm_id).client.open_pty(params))

    # --- files (the guest agent does the work; see sandboxd/guest/_files.py) -----------

    async def files_call(self, vm_id: str, method: str, op: str, params: dict | None, body: dict | None) -> dict:
        return await self._guest(vm_id, self._get(vm_id).client.files_call(method, op, params=params, json=body))

    async def files_upload(self, vm_id: str, op: str, params: dict, content) -> dict:
        return await self._guest(vm_id, self._get(vm_id).client.files_upload(op, params, content))

    async def files_open(self, vm_id: str, op: str, params: dict):
        return await self._guest(vm_id, self._get(vm_id).client.files_open(op, params))


# Agent error codes whose message does not start with the field it is about.
_FIELD_BY_CODE = {
    "cwd_not_found": "cwd", "unknown_user": "user", "invalid_user": "user", "invalid_signal": "signal",
    "process_not_found": "process_id", "process_exited": "process_id",
    "stdin_closed": "stdin", "stdin_full": "stdin",
}  # fmt: skip
_ERROR_BY_STATUS = {400: BadRequest, 404: NotFound, 409: Conflict, 413: PayloadTooLarge}


def _guest_error(exc: GuestError) -> SandboxdError:
    """An agent's 4xx answer -> the error tree, naming the field ("path: ..." messages name
    theirs); anything else means the agent failed us."""
    if not 400 <= exc.status < 500:
        return WorkerFailure(exc.message, code=exc.code)
    head, sep, _ = exc.message.partition(": ")
    field = head if sep and head.isidentifier() else _FIELD_BY_CODE.get(exc.code)
    message = exc.message if field is None or exc.message.startswith(field) else f"{field}: {exc.message}"
    error = _ERROR_BY_STATUS.get(exc.status, BadRequest)(message, code=exc.code, field=field)
    error.status = exc.status  # also 403 permission_denied and the like
    return error


def _runtime_key(state: dict) -> str:
    """The API name of a sandbox's runtime (state.json before runtimes had names said crun/runc)."""
    runtime = state.get("runtime", "oci")
    return "oci" if runtime in ("crun", "runc") else runtime


def _slot_from_state(state: dict) -> NetworkSlot:
    return NetworkSlot(**(state["slot"] | {"netns_path": Path(state["slot"]["netns_path"])}))


def _write_private_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
