"""The small surface every isolation backend implements.

A backend only boots a sandbox and tears it down; everything a sandbox does once it
runs (exec, files, logs) goes through the guest agent, which the worker reaches over
the transport the backend set up. Optional abilities (pause, snapshot) belong in
separate Protocols a backend may also implement, never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Resources:
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    pids_limit: int
    disk_mib: int = 2048  # size limit of the sandbox's writable layer (its own ext4 image)

    @property
    def cpu_quota(self) -> float:
        """CPUs the sandbox may use, e.g. 0.5 for vcpu 1 × cpu_fraction 0.5."""
        return self.vcpu * self.cpu_fraction


@dataclass(frozen=True)
class LaunchSpec:
    vm_id: str
    hostname: str
    rootfs: Path  # the template's read-only root filesystem (a directory)
    resources: Resources
    netns_path: Path  # network namespace prepared by the worker's NetworkManager
    agent_dir: Path  # host dir mounted read-write at GUEST_RUN_DIR; the agent's socket lives here
    guest_code_dir: Path  # host dir with the guest agent's code, mounted read-only at GUEST_CODE_DIR
    state_dir: Path  # per-sandbox directory the backend owns (bundle, upper/work layers, logs)
    # more host directories mounted read-only: (host path, path inside the sandbox), e.g. the
    # agents package and the agent CLI layer
    extra_ro_mounts: tuple[tuple[Path, str], ...] = ()


class Runtime(Protocol):
    name: str

    async def launch(self, spec: LaunchSpec) -> None:
        """Boot the sandbox with the guest agent as its init; return once it is started.

        On failure, undo whatever was taken before raising.
        """

    async def destroy(self, vm_id: str, state_dir: Path) -> None:
        """Kill every process, remove cgroups, unmount and delete the writable layer.

        Idempotent: tolerates a sandbox that is half-created, already gone, or whose
        state_dir was never written.
        """

    async def list_running(self) -> set[str]:
        """IDs of this backend's sandboxes whose init is alive (used to re-adopt after a restart)."""

    async def reclaim(self, keep: set[str]) -> list[str]:
        """Remove leftovers (containers, cgroups, mounts) of sandboxes not in keep; return their IDs."""
