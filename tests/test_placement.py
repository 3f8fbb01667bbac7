"""Placement arithmetic: capacity × overcommit, spreading, and the 409/503 split."""

import pytest

from sandboxd.errors import NoCapacity, NoWorkers
from sandboxd.scheduler.placement import Candidate, Demand, rank_workers

# Does not depend on the sandbox runtime: runs in the default (oci) pass only.
pytestmark = pytest.mark.runtime_independent

STANDARD = Demand(cpu=0.5, memory_mib=512)


def worker(worker_id, used_vcpu=0.0, used_memory_mib=0, vcpus=2.0, memory_mib=4096, runtimes=("crun",)):
    return Candidate(worker_id, vcpus, memory_mib, used_vcpu, used_memory_mib, runtimes)


def rank(candidates, demand=STANDARD, cpu=1.0, memory=1.0):
    return rank_workers(candidates, demand, cpu_overcommit=cpu, memory_overcommit=memory)


def test_no_workers_is_503_and_no_room_is_409():
    with pytest.raises(NoWorkers):
        rank([])
    with pytest.raises(NoCapacity):
        rank([worker("a", used_vcpu=2.0)])
    with pytest.raises(NoCapacity):
        rank([worker("a", used_memory_mib=4000)])


def test_overcommit_multiplies_capacity():
    full = worker("a", used_vcpu=2.0)
    with pytest.raises(NoCapacity):
        rank([full], cpu=1.0)
    assert rank([full], cpu=2.0) == ["a"]


def test_exact_fit_is_accepted():
    assert rank([worker("a", used_vcpu=1.5, used_memory_mib=3584)]) == ["a"]


def test_least_loaded_worker_comes_first():
    assert rank([worker("busy", used_memory_mib=2048), worker("idle")]) == ["idle", "busy"]


def test_runtime_filter():
    demand = Demand(cpu=0.5, memory_mib=512, runtime="runsc")
    assert rank([worker("a"), worker("b", runtimes=("crun", "runsc"))], demand) == ["b"]
    with pytest.raises(NoCapacity):
        rank([worker("a")], demand)
