"""Placement: which worker gets a new sandbox.

Capacity per worker is its real CPUs × cpu_overcommit and its memory × memory_overcommit
(both documented in the README). A sandbox costs vcpu × cpu_fraction CPUs and memory_mib.
Among workers with room, the one with the most free memory (as a share of its capacity)
wins, which spreads load; ties go to the least CPU-loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandboxd.errors import NoCapacity, NoWorkers


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    vcpus: float
    memory_mib: int
    used_vcpu: float
    used_memory_mib: int
    runtimes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Demand:
    cpu: float  # vcpu × cpu_fraction
    memory_mib: int
    runtime: str | None = None


def rank_workers(
    candidates: list[Candidate], demand: Demand, *, cpu_overcommit: float, memory_overcommit: float
) -> list[str]:
    """Worker IDs that can take the demand, best first.

    Raises NoWorkers when there is no worker at all and NoCapacity when none has room.
    """
    if not candidates:
        raise NoWorkers("no workers registered")
    fitting: list[tuple[float, float, str]] = []
    for c in candidates:
        if demand.runtime and c.runtimes and demand.runtime not in c.runtimes:
            continue
        cpu_capacity = c.vcpus * cpu_overcommit
        memory_capacity = c.memory_mib * memory_overcommit
        free_cpu = cpu_capacity - c.used_vcpu
        free_memory = memory_capacity - c.used_memory_mib
        if free_cpu + 1e-9 < demand.cpu or free_memory < demand.memory_mib:
            continue
        fitting.append((-(free_memory / memory_capacity), -(free_cpu / cpu_capacity), c.worker_id))
    if not fitting:
        raise NoCapacity("no capacity on any worker for this sandbox")
    return [worker_id for *_, worker_id in sorted(fitting)]
