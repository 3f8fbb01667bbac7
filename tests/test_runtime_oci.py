"""The OCI backend against the real crun and runc, checked from inside the sandbox.

Needs root, crun/runc and the standard template's rootfs (``tests.helpers.standard_rootfs``). Commands inside a sandbox run through the runtime's own ``exec``
(``OciRuntime.exec_debug``), so these tests do not depend on the guest agent's API.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from sandboxd.guest.protocol import AGENT_ARGV, BOOT_CONFIG_NAME, GUEST_CODE_DIR, GUEST_RUN_DIR, SOCKET_NAME
from sandboxd.runtime import oci_spec
from sandboxd.runtime.base import LaunchSpec, Resources
from sandboxd.runtime.oci import OciError, OciRuntime
from tests.helpers import standard_rootfs

# Does not depend on the sandbox runtime: runs in the default (oci) pass only.
pytestmark = pytest.mark.runtime_independent

ROOTFS = standard_rootfs()
REPO_GUEST_DIR = Path(__file__).resolve().parent.parent / "sandboxd" / "guest"
DOCKER_CAPS_MASK = "00000000a80425fb"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_rootfs = pytest.mark.skipif(not (ROOTFS / "usr/bin/python3").exists(), reason=f"no template rootfs at {ROOTFS}")
RUNTIMES = [b for b in ("crun", "runc") if shutil.which(b)]


def run(coro):
    return asyncio.run(coro)


def new_vm_id() -> str:
    return "sbx_" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def guest_code_dir() -> Path:
    return REPO_GUEST_DIR


class Sandboxes:
    """Factory: launches sandboxes (each in its own netns) and destroys whatever is left."""

    def __init__(self, runtime: OciRuntime, base: Path, guest_code_dir: Path) -> None:
        self.runtime = runtime
        self.base = base
        self.guest_code_dir = guest_code_dir
        self.live: dict[str, LaunchSpec] = {}

    def spec(self, resources: Resources | None = None, vm_id: str | None = None, netns: bool = True) -> LaunchSpec:
        vm_id = vm_id or new_vm_id()
        if netns:
            subprocess.run(["ip", "netns", "add", vm_id], check=True)
        agent_dir = self.base / vm_id / "agent"
        agent_dir.mkdir(parents=True)
        boot = {"protocol": 1, "token": uuid.uuid4().hex, "vm_id": vm_id, "hostname": vm_id}
        (agent_dir / BOOT_CONFIG_NAME).write_text(json.dumps(boot))
        spec = LaunchSpec(
            vm_id=vm_id,
            hostname=vm_id,
            rootfs=ROOTFS,
            resources=resources or Resources(vcpu=1, cpu_fraction=0.5, memory_mib=256, pids_limit=128),
            netns_path=Path("/var/run/netns") / vm_id,
            agent_dir=agent_dir,
            guest_code_dir=self.guest_code_dir,
            state_dir=self.base / vm_id / "state",
        )
        self.live[vm_id] = spec
        return spec

    def launch(self, resources: Resources | None = None, wait_agent: bool = True) -> LaunchSpec:
        spec = self.spec(resources)
        run(self.runtime.launch(spec))
        if wait_agent:
            sock = spec.agent_dir / SOCKET_NAME
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert time.monotonic() < deadline, (spec.state_dir / "init.log").read_text()
                time.sleep(0.02)
        return spec

    def exec(self, spec: LaunchSpec, script: str, timeout: float = 60) -> tuple[int, str, str]:
        rc, out, err = run(self.runtime.exec_debug(spec.vm_id, ["sh", "-c", script], timeout=timeout))
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def destroy(self, spec: LaunchSpec) -> None:
        run(self.runtime.destroy(spec.vm_id, spec.state_dir))
        if spec.netns_path.exists():
            subprocess.run(["ip", "netns", "del", spec.vm_id], check=False)
        self.live.pop(spec.vm_id, None)

    def cleanup(self) -> None:
        for spec in list(self.live.values()):
            self.destroy(spec)


@pytest.fixture(params=RUNTIMES)
def sandboxes(request, tmp_path, guest_code_dir):
    if os.geteuid() != 0 or not (ROOTFS / "usr/bin/python3").exists():
        pytest.skip("needs root and a template rootfs")
    rt = OciRuntime(request.param, tmp_path / "oci")
    f = Sandboxes(rt, tmp_path / "sb", guest_code_dir)
    yield f
    f.cleanup()
    assert_nothing_left(rt, f)


@pytest.fixture
def crun_sandboxes(tmp_path, guest_code_dir):
    if os.geteuid() != 0 or not (ROOTFS / "usr/bin/python3").exists() or not shutil.which("crun"):
        pytest.skip("needs root, crun and a template rootfs")
    rt = OciRuntime("crun", tmp_path / "oci")
    f = Sandboxes(rt, tmp_path / "sb", guest_code_dir)
    yield f
    f.cleanup()
    assert_nothing_left(rt, f)


def cgroup_dirs(vm_id: str) -> list[str]:
    return [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{vm_id}")]


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path) in line]


def agent_processes(vm_id: str) -> list[str]:
    # a sandbox's processes are in its cgroups; after destroy none may exist
    out = []
    for d in Path("/sys/fs/cgroup").glob(f"*/{vm_id}"):
        out += (d / "cgroup.procs").read_text().split()
    return out


def assert_nothing_left(rt: OciRuntime, f: Sandboxes) -> None:
    assert run(rt.list_running()) == set()
    assert not list(rt.root.iterdir()), "runtime state left"
    assert not list(rt.bundles.iterdir()), "bundle records left"
    assert not mounts_under(f.base), "mounts left"
    for d in f.base.glob("*"):
        assert not cgroup_dirs(d.name), f"cgroups of {d.name} left"
        assert not (d / "state").exists(), f"state dir of {d.name} left"


# ---- the config, as a pure function -------------------------------------------------


def _dummy_spec(tmp_path: Path) -> LaunchSpec:
    return LaunchSpec(
        vm_id="sbx_0123abcd",
        hostname="sbx_0123abcd",
        rootfs=Path("/templates/standard"),
        resources=Resources(vcpu=2, cpu_fraction=0.5, memory_mib=512, pids_limit=256),
        netns_path=Path("/var/run/netns/sbx_0123abcd"),
        agent_dir=tmp_path / "agent",
        guest_code_dir=tmp_path / "guest",
        state_dir=tmp_path / "state",
    )


def test_config_shape(tmp_path):
    spec = _dummy_spec(tmp_path)
    c = oci_spec.build_config(
        spec, hosts_file=tmp_path / "h", hostname_file=tmp_path / "hn", resolv_conf_file=tmp_path / "r", machine="x86_64"
    )
    proc = c["process"]
    assert proc["args"] == AGENT_ARGV and proc["cwd"] == "/" and proc["noNewPrivileges"] is True
    assert {e.split("=", 1)[0] for e in proc["env"]} <= {"PATH", "LANG", "HOME"}
    caps = proc["capabilities"]
    assert sorted(caps["bounding"]) == sorted(caps["effective"]) == sorted(caps["permitted"])
    assert len(caps["bounding"]) == 14 and "CAP_SYS_ADMIN" not in caps["bounding"]
    assert caps["ambient"] == [] and caps["inheritable"] == []
    assert proc["oomScoreAdj"] > 0 and "rlimits" not in proc
    assert c["root"] == {"path": str(spec.state_dir / "rootfs"), "readonly": False}
    assert c["hostname"] == spec.hostname
    linux = c["linux"]
    ns = {n["type"]: n.get("path") for n in linux["namespaces"]}
    assert ns == {"pid": None, "mount": None, "uts": None, "ipc": None, "cgroup": None, "network": str(spec.netns_path)}
    assert linux["cgroupsPath"] == "/sbx_0123abcd"
    res = linux["resources"]
    assert res["memory"] == {"limit": 512 << 20, "swap": 512 << 20}
    assert res["cpu"] == {"quota": 100_000, "period": 100_000}  # 2 vcpu x 0.5
    assert res["pids"] == {"limit": 256}
    dests = {m["destination"]: m for m in c["mounts"]}
    assert dests[GUEST_RUN_DIR]["source"] == str(spec.agent_dir) and "rw" in dests[GUEST_RUN_DIR]["options"]
    assert dests[GUEST_CODE_DIR]["source"] == str(spec.guest_code_dir) and "ro" in dests[GUEST_CODE_DIR]["options"]
    assert "ro" in dests["/sys"]["options"] and "ro" in dests["/sys/fs/cgroup"]["options"]
    assert any(o.startswith("size=") for o in dests["/dev/shm"]["options"])
    for p in ("/etc/hosts", "/etc/resolv.conf", "/dev/pts", "/dev/mqueue", "/proc", "/dev"):
        assert p in dests
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    sc = linux["seccomp"]
    assert sc["defaultAction"] == "SCMP_ACT_ALLOW" and sc["architectures"] == ["SCMP_ARCH_X86_64"]
    denied = {n for rule in sc["syscalls"] if not rule.get("args") for n in rule["names"]}
    for name in ("mount", "umount2", "pivot_root", "unshare", "setns", "bpf", "keyctl", "kexec_load", "clone3"):
        assert name in denied
    assert "chroot" not in denied and "ptrace" not in denied
    clone_masks = {r["args"][0]["value"] for r in sc["syscalls"] if r["names"] == ["clone"]}
    assert clone_masks == set(oci_spec.CLONE_NAMESPACE_FLAGS.values())


def test_personality_rules_deny_exactly_the_complement():
    rules = [r for r in oci_spec.seccomp_profile("x86_64")["syscalls"] if r["names"] == ["personality"]]

    def denied(v: int) -> bool:
        for r in rules:
            (c,) = r["args"]
            if c["op"] == "SCMP_CMP_GT" and v > c["value"]:
                return True
            if c["op"] == "SCMP_CMP_MASKED_EQ" and v & c["value"] == c["valueTwo"]:
                return True
        return False

    assert not any(denied(v) for v in oci_spec.PERSONALITY_ALLOWED)
    probes = [1 << b for b in range(64)] + [(1 << b) - 1 for b in range(1, 65)] + [0x40000, 0x40008, 0x20009]
    assert all(denied(v) for v in probes if v not in oci_spec.PERSONALITY_ALLOWED)


def test_config_rejects_bad_resources(tmp_path):
    spec = _dummy_spec(tmp_path)
    import dataclasses

    bad = dataclasses.replace(spec, resources=Resources(vcpu=1, cpu_fraction=0, memory_mib=512, pids_limit=64))
    with pytest.raises(ValueError):
        oci_spec.build_config(bad, hosts_file=tmp_path, hostname_file=tmp_path, resolv_conf_file=tmp_path)


# ---- real containers -----------------------------------------------------------------


@needs_root
@needs_rootfs
def test_isolation_from_inside(sandboxes):
    f = sandboxes
    marker = Path("/tmp") / f"sandboxd-host-marker-{uuid.uuid4().hex}"
    marker.write_text("host secret\n")
    try:
        spec = f.launch()
        assert run(f.runtime.list_running()) == {spec.vm_id}

        rc, out, err = f.exec(spec, "hostname; cat /etc/hostname")
        assert rc == 0 and out.split() == [spec.vm_id, spec.vm_id], err

        rc, out, _ = f.exec(spec, "ps -eo pid=,args=")
        procs = [line.split(None, 1) for line in out.strip().splitlines()]
        assert procs[0][0] == "1" and "/opt/sandboxd/guest/agent.py" in procs[0][1], out
        assert len(procs) <= 6, out

        rc, out, _ = f.exec(spec, f"test -e {marker} && echo VISIBLE; ls /work /sys/fs/cgroup/unified 2>&1; true")
        assert "VISIBLE" not in out and "No such file" in out

        # the init (the agent) and a process run inside
        for proc in ("1", "self"):
            rc, out, _ = f.exec(spec, f"grep -E '^(Cap...|Seccomp|NoNewPrivs):' /proc/{proc}/status")
            status = dict(line.split(":\t") for line in out.strip().splitlines())
            assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == DOCKER_CAPS_MASK, out
            assert status["CapInh"] == status["CapAmb"] == "0000000000000000"
            assert status["Seccomp"] == "2"
        # `exec` does not set no_new_privs; the init has it
        rc, out, _ = f.exec(spec, "grep NoNewPrivs /proc/1/status")
        assert out.split() == ["NoNewPrivs:", "1"]

        # seccomp and capabilities bite
        rc, out, err = f.exec(spec, "unshare -U true")
        assert rc != 0 and "Operation not permitted" in err
        rc, out, err = f.exec(spec, "mkdir -p /mnt/x && mount -t tmpfs none /mnt/x")
        assert rc != 0
        rc, out, err = f.exec(
            spec,
            "python3 -c 'import ctypes; l=ctypes.CDLL(None); print(l.personality(ctypes.c_ulong(0x40000)), l.personality(ctypes.c_ulong(0xffffffff)) >= 0)'",
        )
        assert out.split() == ["-1", "True"], (out, err)
        rc, out, _ = f.exec(spec, "echo 1 > /proc/sys/kernel/panic 2>&1 || echo denied; cat /proc/kcore | head -c1 | wc -c")
        assert "denied" in out

        # writes land in the upper layer, never in the template
        rc, out, err = f.exec(spec, "echo inside > /root/written && echo x >> /etc/motd && rm -f /etc/issue && echo ok")
        assert out.strip() == "ok", err
        assert not (ROOTFS / "root/written").exists()
        assert (ROOTFS / "etc/issue").exists()
        assert (spec.state_dir / "layer/upper/root/written").read_text() == "inside\n"

        # the agent's dirs: run dir writable and shared with the host, code dir read-only
        rc, out, _ = f.exec(spec, f"echo hi > {GUEST_RUN_DIR}/probe && touch {GUEST_CODE_DIR}/x 2>&1; true")
        assert (spec.agent_dir / "probe").read_text() == "hi\n"
        assert "Read-only file system" in out

        # limits as configured, cgroups named after the sandbox
        mem = Path(f"/sys/fs/cgroup/memory/{spec.vm_id}")
        assert int((mem / "memory.limit_in_bytes").read_text()) == 256 << 20
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 256 << 20
        assert int(Path(f"/sys/fs/cgroup/cpu/{spec.vm_id}/cpu.cfs_quota_us").read_text()) == 50_000
        assert Path(f"/sys/fs/cgroup/pids/{spec.vm_id}/pids.max").read_text().strip() == "128"

        f.destroy(spec)
        assert not cgroup_dirs(spec.vm_id)
        assert not mounts_under(spec.state_dir)
        assert run(f.runtime.list_running()) == set()
        # idempotent: a second destroy, and one of a sandbox that never existed
        run(f.runtime.destroy(spec.vm_id, spec.state_dir))
        run(f.runtime.destroy(new_vm_id(), f.base / "never"))
    finally:
        marker.unlink()


@needs_root
@needs_rootfs
def test_memory_hog_is_oom_killed_inside(crun_sandboxes):
    f = crun_sandboxes
    spec = f.launch(Resources(vcpu=1, cpu_fraction=1.0, memory_mib=64, pids_limit=64))
    rc, out, err = f.exec(spec, "python3 -c 'b = bytearray(300 << 20); print(len(b))'")
    assert rc != 0 and "314572800" not in out
    mem = Path(f"/sys/fs/cgroup/memory/{spec.vm_id}")
    oom = dict(line.split() for line in (mem / "memory.oom_control").read_text().splitlines())
    assert int(oom.get("oom_kill", "0")) >= 1 or int((mem / "memory.memsw.failcnt").read_text()) > 0
    # the init (agent) survived; the sandbox still works
    assert run(f.runtime.list_running()) == {spec.vm_id}
    rc, out, _ = f.exec(spec, "ps -o pid=,args= -p 1")
    assert rc == 0 and "agent.py" in out


@needs_root
@needs_rootfs
def test_fork_bomb_stops_at_pids_limit(crun_sandboxes):
    f = crun_sandboxes
    spec = f.launch(Resources(vcpu=1, cpu_fraction=1.0, memory_mib=256, pids_limit=40))
    script = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 1000:\n"
        "        if os.fork() == 0:\n"
        "            os.closerange(0, 3); time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('stopped', n, e.errno)\n"
    )
    (spec.agent_dir / "bomb.py").write_text(script)
    rc, out, err = f.exec(spec, f"python3 {GUEST_RUN_DIR}/bomb.py")
    words = out.split()
    assert words[:1] == ["stopped"] and int(words[1]) < 40 and words[2] == "11", (out, err)
    pids = Path(f"/sys/fs/cgroup/pids/{spec.vm_id}")
    assert int((pids / "pids.current").read_text()) <= 40
    assert int((pids / "pids.events").read_text().split()[1]) > 0
    # destroy must take the sleeping children down with it (checked by the fixture)


@needs_root
@needs_rootfs
def test_busy_loop_gets_its_cpu_quota(crun_sandboxes):
    f = crun_sandboxes
    spec = f.launch(Resources(vcpu=1, cpu_fraction=0.5, memory_mib=128, pids_limit=64))
    usage = Path(f"/sys/fs/cgroup/cpuacct/{spec.vm_id}/cpuacct.usage")
    loop = "python3 -c 'import time\nend = time.time() + 2.5\nwhile time.time() < end: pass'"
    worker = threading.Thread(target=f.exec, args=(spec, loop))
    worker.start()
    time.sleep(0.5)  # let the loop start
    u0, t0 = int(usage.read_text()), time.monotonic()
    time.sleep(1.5)
    u1, t1 = int(usage.read_text()), time.monotonic()
    worker.join(timeout=30)
    share = (u1 - u0) / 1e9 / (t1 - t0)
    assert 0.3 < share < 0.7, f"busy loop got {share:.2f} CPUs with a 0.5 quota"


@needs_root
@needs_rootfs
def test_failed_launch_unwinds_everything(sandboxes):
    f = sandboxes
    spec = f.spec(netns=False)  # its netns_path does not exist: the runtime fails late
    with pytest.raises(OciError):
        run(f.runtime.launch(spec))
    assert not mounts_under(spec.state_dir)
    assert not cgroup_dirs(spec.vm_id)
    assert not spec.state_dir.exists()
    assert not (f.runtime.bundles / spec.vm_id).exists()
    assert not (f.runtime.root / spec.vm_id).exists()
    f.live.pop(spec.vm_id)
    # and the same vm_id can then launch for real
    subprocess.run(["ip", "netns", "add", spec.vm_id], check=True)
    f.live[spec.vm_id] = spec
    run(f.runtime.launch(spec))
    assert run(f.runtime.list_running()) == {spec.vm_id}


@needs_root
@needs_rootfs
def test_list_running_and_reclaim(sandboxes, tmp_path, guest_code_dir):
    f = sandboxes
    a, b = f.launch(wait_agent=False), f.launch(wait_agent=False)
    assert run(f.runtime.list_running()) == {a.vm_id, b.vm_id}
    # another instance (its own state root) sees none of them, and reclaims none
    other = OciRuntime(f.runtime.name, tmp_path / "other-oci")
    assert run(other.list_running()) == set()
    assert run(other.reclaim(set())) == []
    # a restarted worker that only knows about `a` reclaims `b`
    fresh = OciRuntime(f.runtime.name, f.runtime.state_root)
    assert run(fresh.reclaim({a.vm_id})) == [b.vm_id]
    assert run(fresh.list_running()) == {a.vm_id}
    assert not cgroup_dirs(b.vm_id) and not mounts_under(b.state_dir)
    subprocess.run(["ip", "netns", "del", b.vm_id], check=True)
    f.live.pop(b.vm_id)


@needs_root
@needs_rootfs
def test_destroy_kills_processes_that_escape_init(crun_sandboxes):
    """A daemonized process (reparented inside the sandbox) dies with the sandbox."""
    f = crun_sandboxes
    spec = f.launch()
    rc, out, err = f.exec(spec, "setsid sleep 300 > /dev/null 2>&1 < /dev/null & echo started")
    assert "started" in out
    assert len(agent_processes(spec.vm_id)) >= 2
    f.destroy(spec)
    assert not cgroup_dirs(spec.vm_id)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 300" not in ps
