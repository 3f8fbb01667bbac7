"""The `microvm` runtime (QEMU -M microvm) through the API: cold boot, restore from a saved
VM state with a fresh identity, exec, files, limits, network isolation, destroy, re-adopt.

Skipped when QEMU, Debian's cloud kernel or busybox-static is missing (scripts/setup.sh
installs them). TCG is slow: one server and three VMs (one cold boot, two restored clones)
serve the whole module. The module starts by deleting the saved states, so the first
sandbox cold-boots and the runtime saves the state the next two start from.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pty
import select
import shutil
import subprocess
import time
import tty
import uuid
from pathlib import Path

import httpx
import pytest

from sandboxd.config import DEFAULT_CACHE_DIR
from sandboxd.runtime import microvm_images
from sandboxd.runtime.microvm import AGENT_PORT, MicrovmRuntime
from sandboxd.worker.manager import GUEST_CODE_DIR
from tests.helpers import Server, assert_error, exec_ok, free_port
from tests.test_isolation import can_connect, start_http_server

pytestmark = pytest.mark.runtime_independent  # runs in the default pass only; it picks microvm itself

MICROVM_MISSING = (
    shutil.which("qemu-system-x86_64") is None
    or microvm_images.find_kernel() is None
    or not microvm_images.BUSYBOX.exists()
)

SNAPSHOTS = DEFAULT_CACHE_DIR / "microvm" / "snapshots"
SNAPSHOT_WAIT_S = 600.0  # a TCG boot on a busy 2-core host; not a performance bound


@pytest.fixture(scope="module")
def mv_server():
    if MICROVM_MISSING:
        pytest.skip("qemu-system-x86, linux-image-cloud-amd64 or busybox-static is not installed")
    shutil.rmtree(SNAPSHOTS, ignore_errors=True)  # the first sandbox must cold-boot
    srv = Server("--runtime", "microvm").start()
    key = srv.create_key("microvm-user")
    yield srv, key
    srv.destroy_all([key])
    srv.stop()
    srv.remove_data()


@pytest.fixture(scope="module")
def client(mv_server):
    srv, key = mv_server
    with srv.client(key) as c:
        yield c


def _create(client, **extra) -> str:
    response = client.post("/v1/sandboxes", json={"template": "standard", **extra})
    assert response.status_code == 201, response.text
    return response.json()["vm_id"]


def _vm_info(srv, vm_id: str) -> dict:
    return json.loads((srv.data_dir / "sandboxes" / vm_id / "runtime" / "vm.json").read_text())


def _state(srv, vm_id: str) -> dict:
    return json.loads((srv.data_dir / "sandboxes" / vm_id / "state.json").read_text())


def _qemu_pids(vm_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64.*/microvm/{vm_id}/"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(scope="module")
def cold(mv_server, client):
    srv, _ = mv_server
    vm_id = _create(client)
    key = _vm_info(srv, vm_id)["snapshot"]
    deadline = time.monotonic() + SNAPSHOT_WAIT_S
    while not (SNAPSHOTS / key / "meta.json").exists():  # saved in the background
        assert time.monotonic() < deadline and "saving a microVM state" not in srv.log(), srv.log()
        time.sleep(0.5)
    yield vm_id
    client.delete(f"/v1/sandboxes/{vm_id}")


@pytest.fixture(scope="module")
def clones(cold, client):
    vm_ids = [_create(client), _create(client)]
    yield vm_ids
    for vm_id in vm_ids:
        client.delete(f"/v1/sandboxes/{vm_id}")


def test_first_sandbox_cold_boots_the_next_restore_the_saved_state(mv_server, client, cold, clones):
    srv, _ = mv_server
    assert _vm_info(srv, cold)["started_from"] == "cold_boot"
    assert [_vm_info(srv, vm_id)["started_from"] for vm_id in clones] == ["snapshot", "snapshot"]
    assert {_vm_info(srv, vm_id)["accelerator"] for vm_id in [cold, *clones]} <= {"kvm", "tcg"}
    assert [client.get(f"/v1/sandboxes/{vm_id}").json()["runtime"] for vm_id in clones] == ["microvm", "microvm"]
    for vm_id in [cold, *clones]:
        assert exec_ok(client, vm_id, "uname -r")["output"].strip() == microvm_images.find_kernel().release


def test_restored_clones_get_their_own_identity_clock_and_randomness(client, clones):
    probe = (
        "hostname; cat /etc/hostname; grep -c \"$(hostname)\" /etc/hosts; date +%s; "
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
        "python3 -c 'import random, os; print(random.getrandbits(64), os.urandom(8).hex())'"
    )
    seen = []
    for vm_id in clones:
        host_before = time.time()
        lines = exec_ok(client, vm_id, probe)["output"].splitlines()
        assert lines[0] == lines[1] == vm_id
        assert int(lines[2]) >= 1
        assert host_before - 60 <= int(lines[3]) <= time.time() + 60  # the host's clock, not the saved VM's
        seen.append((lines[4], lines[5]))
    assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]


def test_agent_is_reachable_only_with_its_token(mv_server, clones):
    srv, _ = mv_server
    a, b = (_state(srv, vm_id) for vm_id in clones)
    url = f"http://{a['slot']['guest_ip']}:{AGENT_PORT}/health"
    assert httpx.get(url, headers={"Authorization": f"Bearer {a['token']}"}).json()["vm_id"] == clones[0]
    assert httpx.get(url, headers={"Authorization": f"Bearer {b['token']}"}).status_code == 401


def test_exec_files_and_the_overlay(client, cold, clones):
    body = exec_ok(client, cold, "echo out; echo err >&2; exit 3")
    assert (body["stdout"], body["stderr"], body["exit_code"]) == ("out\n", "err\n", 3)
    payload = os.urandom(300_000)
    up = client.put(f"/v1/sandboxes/{cold}/files", params={"path": "/workspace/blob.bin"}, content=payload)
    assert up.status_code in (200, 201), up.text
    assert client.get(f"/v1/sandboxes/{cold}/files", params={"path": "/workspace/blob.bin"}).content == payload
    assert exec_ok(client, cold, "echo changed > /usr/bin/newfile && cat /usr/bin/newfile")["output"] == "changed\n"
    assert exec_ok(client, clones[0], "test -e /usr/bin/newfile; echo $?")["output"] == "1\n"  # own layer
    assert exec_ok(client, cold, "touch /opt/sandboxd/guest/x 2>&1; echo $?")["output"].strip().endswith("1")
    # the read-only trees (guest code, sandboxd/agents) sit where the OCI runtimes bind them
    assert exec_ok(client, cold, "test -f /opt/sandboxd/guest/agent.py && test -f /opt/sandboxd/agents/base.py")[
        "exit_code"] == 0  # fmt: skip


def test_host_filesystem_is_invisible(mv_server, client, cold):
    srv, _ = mv_server
    marker = Path(f"/tmp/host-marker-{uuid.uuid4().hex}")
    marker.write_text("host secret")
    try:
        assert exec_ok(client, cold, f"cat {marker}")["exit_code"] != 0
        assert exec_ok(client, cold, f"ls {srv.data_dir}")["exit_code"] != 0
    finally:
        marker.unlink()
    assert "agent.py" in exec_ok(client, cold, "cat /proc/1/cmdline | tr '\\0' ' '")["output"]


def test_disk_limit_gives_enospc_inside_and_413_on_upload(mv_server, client, clones):
    srv, _ = mv_server
    vm_id = clones[1]
    size_mib = int(exec_ok(client, vm_id, "df -m --output=size / | tail -1")["output"])
    assert abs(size_mib - 2048) < 2048 * 0.05  # the standard template's disk_mib
    fill = exec_ok(client, vm_id, "fallocate -l 3G /workspace/big 2>&1; fallocate -l 1900M /workspace/big2 2>&1;"
                   " dd if=/dev/zero of=/workspace/rest bs=1M 2>&1 | tail -1")  # fmt: skip
    assert "No space left on device" in fill["output"], fill
    upload = client.put(f"/v1/sandboxes/{vm_id}/files", params={"path": "/workspace/up.bin"},
                        content=b"x" * (8 * 2**20))  # fmt: skip
    assert_error(upload, 413, "no_space")
    image = srv.data_dir / "sandboxes" / vm_id / "runtime" / "disk.img"
    assert os.stat(image).st_blocks * 512 <= (2048 + 1) * 2**20  # sparse: never more than the limit
    exec_ok(client, vm_id, "rm -f /workspace/big /workspace/big2 /workspace/rest; sync")
    assert exec_ok(client, vm_id, "echo works > /workspace/after && cat /workspace/after")["output"] == "works\n"


def test_vcpu_memory_cpu_quota_and_pids_limits(client, clones):
    vm_id = clones[0]
    pid = _qemu_pids(vm_id)[0]
    cpu = Path("/sys/fs/cgroup/cpu") / vm_id
    memory = Path("/sys/fs/cgroup/memory") / vm_id
    assert str(pid) in (cpu / "cgroup.procs").read_text().split()
    assert str(pid) in (memory / "cgroup.procs").read_text().split()
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == int((cpu / "cpu.cfs_period_us").read_text()) // 2
    assert int((memory / "memory.limit_in_bytes").read_text()) == (512 + 256) * 2**20  # guest + QEMU
    out = exec_ok(client, vm_id, "nproc; awk '/MemTotal/ {print $2}' /proc/meminfo; cat /sys/fs/cgroup/sandbox/pids.max;"
                  " cat /proc/self/cgroup")  # fmt: skip
    nproc, mem_kib, pids_max, cgroup = out["output"].split()
    assert int(nproc) == 1
    assert 400 * 1024 < int(mem_kib) <= 512 * 1024
    assert int(pids_max) == 1024 and cgroup == "0::/sandbox"  # the template's pids_limit, for all it runs
    hog = exec_ok(client, vm_id, "python3 -c 'b = bytearray(900 * 2**20); print(len(b))'", timeout_seconds=120)
    # refused by the guest kernel (overcommit heuristics: MemoryError) or OOM-killed inside the VM
    assert hog["exit_code"] == 137 or "MemoryError" in hog["stderr"], hog
    assert exec_ok(client, vm_id, "echo alive")["output"] == "alive\n"


def test_host_port_reaches_9090_and_sandboxes_cannot_reach_each_other(mv_server, client, cold, clones):
    srv, _ = mv_server
    start_http_server(client, clones[1])
    endpoint = client.get(f"/v1/sandboxes/{clones[1]}").json()["endpoint"]
    assert httpx.get(endpoint + "/index.html", timeout=10).text == f"served-by-{clones[1]}\n"
    other_ip = _state(srv, clones[1])["slot"]["guest_ip"]
    assert not can_connect(client, cold, other_ip, 9090)
    assert not can_connect(client, cold, other_ip, AGENT_PORT)


# Host services, egress NAT and the rest of the network rules: tests/test_isolation.py, run
# with SANDBOXD_TEST_RUNTIME=microvm by scripts/test.sh.


def test_restart_re_adopts_running_vms(mv_server, client, cold):
    srv, _ = mv_server
    pids = _qemu_pids(cold)
    assert len(pids) == 1
    srv.stop()
    assert _qemu_pids(cold) == pids  # QEMU runs detached from the worker
    srv.start()
    assert exec_ok(client, cold, "echo still-here")["output"] == "still-here\n"
    assert _qemu_pids(cold) == pids


def test_destroy_leaves_nothing(mv_server, client):
    srv, _ = mv_server
    vm_id = _create(client)
    run = Path("/run/sandboxd") / _worker_instance(srv) / "microvm" / vm_id
    assert run.is_dir() and _qemu_pids(vm_id)
    assert client.delete(f"/v1/sandboxes/{vm_id}").status_code == 200
    assert _qemu_pids(vm_id) == []
    assert not run.exists()
    assert not glob.glob(f"/sys/fs/cgroup/*/{vm_id}")
    assert not (srv.data_dir / "sandboxes" / vm_id).exists()
    assert vm_id not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert client.get(f"/v1/sandboxes/{vm_id}").json()["state"] == "destroyed"


def test_restart_reclaims_a_vm_the_worker_lost_track_of(mv_server, client):
    """A VM whose sandbox directory vanished while the worker was down (a crash mid-create looks
    alike): start-up reclaim kills QEMU and removes its cgroups and record."""
    srv, _ = mv_server
    vm_id = _create(client)
    pids = _qemu_pids(vm_id)
    assert pids
    srv.process.kill()  # no clean stop
    srv.process.wait()
    shutil.rmtree(srv.data_dir / "sandboxes" / vm_id)
    srv.start()
    assert _qemu_pids(vm_id) == []
    assert not glob.glob(f"/sys/fs/cgroup/*/{vm_id}")
    assert not (Path("/run/sandboxd") / _worker_instance(srv) / "microvm" / vm_id).exists()


def _worker_instance(srv) -> str:
    return (srv.data_dir / "worker_id").read_text().strip().removeprefix("wrk_")


@pytest.mark.skipif(MICROVM_MISSING, reason="qemu-system-x86, linux-image-cloud-amd64 or busybox-static is missing")
def test_runtime_reports_its_accelerator(tmp_path):
    runtime = asyncio.run(MicrovmRuntime.create(tmp_path / "run", DEFAULT_CACHE_DIR / "microvm"))
    details = runtime.details()
    assert details["accelerator"] in ("kvm", "tcg")
    assert details["binary"] == "qemu-system-x86_64"


def _agent_on_a_pty(tmp_path) -> tuple[subprocess.Popen, int, int, int]:
    """The guest agent as a microVM runs it, with a pty standing in for the virtio-serial port
    (the test keeps the slave open too: a pty whose slave nobody holds reads EIO)."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    port = free_port()
    agent = subprocess.Popen(
        ["/usr/bin/python3", "-s", "-B", str(GUEST_CODE_DIR / "agent.py"), "--run-dir", str(tmp_path),
         "--workspace", str(tmp_path / "workspace"), "--listen", f"127.0.0.1:{port}", "--boot-port", os.ttyname(slave)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    return agent, master, slave, port


def _read_line(fd: int) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], 30)
        assert ready, f"no line from the agent, got {line!r}"
        line += os.read(fd, 1)
    return line


def test_agent_takes_its_boot_config_from_the_boot_port(tmp_path):
    agent, master, slave, port = _agent_on_a_pty(tmp_path)
    try:
        assert _read_line(master) == b"sandboxd-agent: awaiting boot\n"
        boot = {"protocol": 1, "vm_id": "vm-on-a-pty", "token": "t0k", "vm": {}}  # no clock/hosts: this is the host
        os.write(master, json.dumps(boot).encode() + b"\n")
        assert _read_line(master) == b"ok\n"
        url = f"http://127.0.0.1:{port}/health"
        for _ in range(100):
            try:
                health = httpx.get(url, headers={"Authorization": "Bearer t0k"})
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert health.json()["vm_id"] == "vm-on-a-pty"
        assert httpx.get(url, headers={"Authorization": "Bearer other"}).status_code == 401
    finally:
        agent.kill()
        agent.wait()
        os.close(master)
        os.close(slave)


def test_agent_refuses_a_bad_boot_config_on_the_boot_port(tmp_path):
    agent, master, slave, _ = _agent_on_a_pty(tmp_path)
    try:
        _read_line(master)
        os.write(master, b'{"protocol": 1, "vm_id": "x"}\n')  # no token
        assert _read_line(master).startswith(b"error: ")
        assert agent.wait(timeout=30) != 0
    finally:
        agent.kill()
        agent.wait()
        os.close(master)
        os.close(slave)
