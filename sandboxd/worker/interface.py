"""What the control plane asks of a worker, and what a worker answers.

The in-process local worker implements WorkerAPI directly; a remote worker is reached
through an HTTP client that implements the same Protocol. The control plane only ever
holds WorkerAPI handles, so it cannot tell the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    address: str  # host that clients use to reach host ports (`endpoint`)
    vcpus: float
    memory_mib: int
    runtimes: list[str]
    default_runtime: str
    templates: list[str]  # templates this worker has built and can start at once
    # per runtime: what backs it, e.g. {"oci": {"binary": "crun"}, "gvisor": {"binary": "runsc", "platform": "ptrace"}}
    runtime_details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AgentSpec:
    """An agent to start in a new sandbox. The llm_key travels only in memory (API ->
    worker -> the agent process's environment): never written, logged or repr'd."""

    kind: str  # "deictic" | "claude-code" | "codex"
    model: str | None
    llm_key: str = field(repr=False)
    task: str | None = field(default=None, repr=False)  # None: leave the CLI ready for exec
    base_url: str | None = None  # None: the provider's public URL


@dataclass(frozen=True)
class AgentState:
    status: str | None  # "running" | "completed" | "failed"; None: no agent run in the sandbox
    exit_code: int | None = None


@dataclass(frozen=True)
class CreateSandbox:
    vm_id: str
    template: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    env: dict[str, str] = field(default_factory=dict)
    runtime: str | None = None
    agent: AgentSpec | None = None


@dataclass(frozen=True)
class SandboxStatus:
    vm_id: str
    alive: bool
    host_port: int | None = None
    rootfs: str | None = None
    runtime: str | None = None
    running_commands: int = 0


@dataclass(frozen=True)
class ExecCommand:
    command: str
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float | None = 60.0  # None: no limit (background processes only)
    stdin: str | None = None
    user: str | None = None
    background: bool = False


@dataclass(frozen=True)
class PortTarget:
    """Where the control plane connects to reach port `port` of a sandbox.

    The local worker answers the guest's own address (its veth IP and the port itself).
    A remote worker answers its own proxy instead: host/port of the worker, the proxied
    path prefixed with `path_prefix`, and `headers` (e.g. the worker's credentials) added.
    """

    host: str
    port: int
    scheme: str = "http"  # "http" or "https"; WebSockets use ws/wss accordingly
    path_prefix: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class WorkerAPI(Protocol):
    worker_id: str

    async def info(self) -> WorkerInfo: ...

    async def create_sandbox(self, request: CreateSandbox) -> SandboxStatus: ...

    async def destroy_sandbox(self, vm_id: str) -> None:
        """Idempotent: a sandbox the worker does not know is already destroyed."""

    async def sandbox_status(self, vm_id: str) -> SandboxStatus: ...

    async def list_sandboxes(self) -> list[SandboxStatus]: ...

    async def exec(self, vm_id: str, command: ExecCommand) -> dict: ...

    async def logs(self, vm_id: str, since: str | None, limit: int) -> dict: ...

    async def port_target(self, vm_id: str, port: int) -> PortTarget:
        """Where to connect for the sandbox's port (1-65535); NotFound if the sandbox is unknown."""

    # Agents (sandboxd/agents): the run started by create_sandbox.
    async def agent_status(self, vm_id: str) -> AgentState: ...

    async def cancel_agent(self, vm_id: str, grace_seconds: float) -> None:
        """SIGINT to the agent's process group at once; SIGTERM after ``grace_seconds``,
        SIGKILL a little later, in the background. Conflict (no_running_agent) if none runs."""

    # Processes and PTYs (sandboxd/controlplane/processes.py; the agent's /procs, /pty).
    async def exec_stream(self, vm_id: str, command: ExecCommand) -> EventStream:
        """Starts a command and streams its events; errors raise before any event."""

    async def process_call(
        self, vm_id: str, method: str, op: str, params: dict | None = None, body: dict | None = None,
        content: bytes | None = None, timeout: float | None = None,
    ) -> dict: ...

    async def process_stream(self, vm_id: str, op: str, params: dict) -> EventStream: ...

    async def open_pty(self, vm_id: str, params: dict) -> PtySession: ...

    # Files (sandboxd/controlplane/files.py). `op` is the guest path ("/files/stat", ...).
    async def files_call(self, vm_id: str, method: str, op: str, params: dict | None, body: dict | None) -> dict: ...

    async def files_upload(self, vm_id: str, op: str, params: dict, content: AsyncIterator[bytes]) -> dict:
        """Streams `content` (never held whole) into the sandbox."""

    async def files_open(self, vm_id: str, op: str, params: dict) -> ByteStream:
        """Opens a streamed answer (download, tar, watch); errors raise before any byte."""


class ByteStream(Protocol):
    headers: dict[str, str]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class EventStream(Protocol):
    """Events of a running command: dicts with ``type`` stdout/stderr (``data``,
    ``offset``), heartbeat, and finally exit (``exit_code``, ``timed_out``)."""

    def __aiter__(self) -> AsyncIterator[dict]: ...

    async def aclose(self) -> None: ...


class PtySession(Protocol):
    async def read_frame(self) -> tuple[str, bytes] | None: ...

    async def write(self, data: bytes) -> None: ...

    async def resize(self, cols: int, rows: int) -> None: ...

    async def aclose(self) -> None: ...
