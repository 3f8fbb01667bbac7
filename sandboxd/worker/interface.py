"""What the control plane asks of a worker, and what a worker answers.

The in-process local worker implements WorkerAPI directly; a remote worker is reached
through an HTTP client that implements the same Protocol. The control plane only ever
holds WorkerAPI handles, so it cannot tell the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    address: str  # host that clients use to reach host ports (`endpoint`)
    vcpus: float
    memory_mib: int
    runtimes: list[str]
    default_runtime: str
    templates: list[str]  # templates this worker has built and can start at once


@dataclass(frozen=True)
class CreateSandbox:
    vm_id: str
    template: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    env: dict[str, str] = field(default_factory=dict)
    runtime: str | None = None


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
    timeout_seconds: float = 60.0


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
