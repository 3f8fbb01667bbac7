"""microVM backend: QEMU ``-M microvm`` with KVM where a real boot works, TCG otherwise.

Each sandbox is a VM booting Debian's cloud kernel with sandboxd's own initramfs
(microvm_images.py): three virtio disks (the template rootfs as a read-only ext4 image
shared by every VM; a per-sandbox sparse ext4 image of ``disk_mib``, the overlay's upper
layer, so the disk limit bites as ENOSPC inside; the guest agent's code, read-only), a
virtio-net NIC on a tap, and a virtio-serial port that carries the boot config. The
initramfs mounts the overlay, configures the network and execs the guest agent as PID 1,
which then waits on the port for its boot config (guest/_vmboot.py).

Network: the tap ``tap0`` lives in the sandbox's own network namespace (the one the
worker's NetworkManager made, with its veth and host-side rules). Every VM has the same
address, VM_IP/30 with gateway VM_GATEWAY on the tap; an nftables table inside the
namespace DNATs the slot's guest_ip to VM_IP and SNATs the VM's traffic to guest_ip, so
every host-side rule (egress, host_port → 9090, no sandbox → host or sandbox → sandbox)
applies unchanged and a saved VM needs no re-addressing. The worker reaches the agent at
``guest_ip:AGENT_PORT`` (like gVisor's); QEMU itself runs inside that namespace.

Fast start: the first sandbox of a shape (template image, vCPUs, memory, disk, pids,
guest code, accelerator) cold-boots (seconds under TCG) and a background task boots one
more VM of that shape (in a network namespace of its own) up to the waiting agent, saves
its state (``migrate exec:cat > FILE``) next to a copy of its pristine writable layer, and
stops it. Later sandboxes of that shape
start from the saved state (``-incoming exec:cat FILE``) with their own copy of that layer;
the boot config then delivers everything that must differ between clones: vm_id, token,
hostname, env, services, the wall clock and fresh entropy for the guest's RNG.

Limits: ``vcpu`` → ``-smp``, ``memory_mib`` → ``-m``, ``cpu_fraction`` → a CFS quota on
QEMU's cgroup (``cpu/<vm_id>``, with ``memory/<vm_id>`` capping QEMU at guest memory
plus QEMU_OVERHEAD_MIB; the quota binds once the agent has its boot config: booting and
restoring run unthrottled), ``pids_limit`` → a cgroup inside the guest.

Layout::

    state_root/microvm/<vm_id>/          the record reclaim finds: qemu.pid, qmp.sock,
                                         boot.sock, state -> the sandbox's state_dir
    state_dir/disk.img                   the writable layer (sparse ext4, disk_mib)
    state_dir/init.log                   QEMU's errors and the VM's serial console
    state_dir/vm.json                    accelerator, cold or snapshot start
    CACHE/snapshots/<key>/               vm.state, upper.img, meta.json
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import platform as _platform
import re
import secrets
import shlex
import shutil
import signal
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from sandboxd.errors import WorkerFailure
from sandboxd.guest.protocol import BOOT_CONFIG_NAME, GUEST_CODE_DIR
from sandboxd.runtime import microvm_images as images
from sandboxd.runtime.base import LaunchSpec
from sandboxd.runtime.oci import (
    CGROUP_ROOT,
    OciError,
    _remove_cgroups,
    _run_tool,
    default_nameservers,
    make_sparse_ext4,
)
from sandboxd.runtime.oci_spec import render_hosts

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
AGENT_PORT = images.GUEST_AGENT_PORT
TAP = "tap0"
VM_MAC = "52:54:00:00:00:21"
QEMU_OVERHEAD_MIB = 256  # QEMU's own memory on top of the guest's (TCG translation cache, devices)
TCG_TB_MIB = 64  # TCG translation-block cache (QEMU's default is 1 GiB of address space)
BOOT_TIMEOUT_S = 120.0  # cold boot under TCG on a loaded host
START_TIMEOUT_S = 30.0  # QEMU's own start-up (until it daemonizes)
PROBE_TIMEOUT_S = 20.0
PROBE_CACHE = Path("/run/sandboxd/microvm-probe.json")  # /run: forgotten at reboot
_VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class MicrovmError(WorkerFailure):
    """QEMU or the VM failed (502); the message carries QEMU's or the console's last lines."""

    code = "sandbox_boot_failed"


def qemu_path() -> str | None:
    return shutil.which(QEMU)


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL when the worker dies (a snapshot build never outlives it)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _host_tsc_khz() -> int:
    """The host TSC rate: TCG's guest TSC is the host's, but the kernel's calibration
    against the emulated PIT fails on a busy host (it then hangs without a clocksource)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


@dataclass(frozen=True)
class Shape:
    """Everything a saved VM state depends on: two VMs of one shape are interchangeable."""

    accel: str
    kernel: str  # release + package version
    initrd: str
    rootfs_image: str
    code_image: str
    vcpu: int
    memory_mib: int
    disk_mib: int
    pids_limit: int
    nameservers: tuple[str, ...]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


class _Qmp:
    """A minimal QMP client (QEMU's JSON monitor) over its unix socket."""

    def __init__(self, path: Path):
        self.path = path

    async def __aenter__(self) -> "_Qmp":
        self.reader, self.writer = await asyncio.open_unix_connection(str(self.path), limit=1 << 20)
        await self.reader.readline()  # greeting
        await self.execute("qmp_capabilities")
        return self

    async def __aexit__(self, *exc) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()

    async def execute(self, command: str, arguments: dict | None = None) -> dict:
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        while True:
            line = await self.reader.readline()
            if not line:
                raise MicrovmError(f"QMP {command}: QEMU closed its monitor")
            reply = json.loads(line)
            if "error" in reply:
                raise MicrovmError(f"QMP {command}: {reply['error'].get('desc')}")
            if "return" in reply:
                return reply["return"]


async def probe_accelerator(qemu: str, kernel: images.Kernel, initrd: Path) -> str:
    """``kvm`` when a VM really boots under KVM here (probed once per boot), else ``tcg``."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    st = os.stat(qemu)
    key = f"{os.path.realpath(qemu)}:{st.st_size}:{int(st.st_mtime)}:{kernel.package_version}:{_platform.release()}"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(PROBE_CACHE.read_text())
        if cached["key"] == key:
            return cached["accel"]
    proc = await asyncio.create_subprocess_exec(
        qemu, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults", "-no-user-config",
        "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1 sandboxd.probe=1",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
        booted = images.PROBE_MARKER.encode() in out
    except asyncio.TimeoutError:  # KVM-PVM hosts: the guest kernel hangs
        booted = False
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    accel = "kvm" if booted else "tcg"
    log.info("microVM accelerator probe: KVM %s; using %s", "boots" if booted else "does not boot", accel)
    with contextlib.suppress(OSError):
        PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        PROBE_CACHE.write_text(json.dumps({"key": key, "accel": accel}))
    return accel


class MicrovmRuntime:
    """Runtime protocol over QEMU microVMs; see the module docstring."""

    agent_port = AGENT_PORT

    def __init__(
        self,
        state_root: Path,
        cache_dir: Path,
        *,
        qemu: str,
        kernel: images.Kernel,
        initrd: Path,
        accelerator: str,
        nameservers: list[str] | None = None,
    ) -> None:
        self.name = QEMU
        self.qemu = qemu
        self.kernel = kernel
        self.initrd = initrd
        self.accelerator = accelerator
        self.cache = Path(cache_dir)
        self.snapshots = self.cache / "snapshots"
        self.runs = Path(state_root) / "microvm"
        self.nameservers = (nameservers if nameservers is not None else default_nameservers())[:3]
        self.runs.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self._artefacts_lock = asyncio.Lock()
        self._snapshot_builds: dict[str, asyncio.Task] = {}

    @classmethod
    async def create(cls, state_root: Path, cache_dir: Path, nameservers: list[str] | None = None):
        """The runtime when QEMU, the cloud kernel and busybox-static are installed, else None."""
        qemu, kernel = qemu_path(), images.find_kernel()
        if qemu is None or kernel is None or not images.BUSYBOX.exists():
            return None
        initrd = await asyncio.to_thread(images.initramfs, Path(cache_dir), kernel)
        accel = await probe_accelerator(qemu, kernel, initrd)
        return cls(state_root, cache_dir, qemu=qemu, kernel=kernel, initrd=initrd, accelerator=accel,
                   nameservers=nameservers)  # fmt: skip

    # ---- the VM's shape and its QEMU command line ----------------------------------

    async def _shape(self, spec: LaunchSpec) -> tuple[Shape, Path, Path]:
        trees = [(Path(spec.guest_code_dir), GUEST_CODE_DIR)]
        trees += [(Path(source), inside) for source, inside in spec.extra_ro_mounts]
        async with self._artefacts_lock:  # one build of an image at a time
            try:
                rootfs = await asyncio.to_thread(images.rootfs_image, self.cache, Path(spec.rootfs))
                code = await asyncio.to_thread(images.code_image, self.cache, trees)
            except images.ImageError as exc:
                raise MicrovmError(str(exc)) from None
        r = spec.resources
        shape = Shape(
            accel=self.accelerator, kernel=f"{self.kernel.release}:{self.kernel.package_version}",
            initrd=self.initrd.name, rootfs_image=rootfs.name, code_image=code.name, vcpu=r.vcpu,
            memory_mib=r.memory_mib, disk_mib=r.disk_mib, pids_limit=r.pids_limit, nameservers=tuple(self.nameservers),
        )  # fmt: skip
        return shape, rootfs, code

    def _qemu_argv(self, shape: Shape, rootfs: Path, code: Path, upper: Path, run: Path, log_file: Path) -> list[str]:
        append = ["console=ttyS0", "quiet", "panic=-1", f"sandboxd.pids={shape.pids_limit}",
                  f"sandboxd.dns={','.join(shape.nameservers)}"]  # fmt: skip
        if shape.accel == "tcg":
            append += [f"tsc_early_khz={_host_tsc_khz()}", "tsc=reliable"]
            accel, cpu = f"tcg,tb-size={TCG_TB_MIB}", "max"
        else:
            accel, cpu = "kvm", "host"
        drive = "format=raw,if=none,cache=none,aio=threads"
        return [
            self.qemu, "-M", "microvm,x-option-roms=off,rtc=on", "-accel", accel, "-cpu", cpu,
            "-smp", str(shape.vcpu), "-m", str(shape.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"file,id=console,path={log_file},append=on", "-serial", "chardev:console",
            "-kernel", str(self.kernel.vmlinuz), "-initrd", str(self.initrd), "-append", " ".join(append),
            "-drive", f"id=root,file={rootfs},readonly=on,{drive}", "-device", "virtio-blk-device,drive=root,serial=sbdroot",
            "-drive", f"id=upper,file={upper},discard=unmap,{drive}",
            "-device", "virtio-blk-device,drive=upper,serial=sbdupper",
            "-drive", f"id=code,file={code},readonly=on,{drive}", "-device", "virtio-blk-device,drive=code,serial=sbdcode",
            "-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=net0,mac={VM_MAC}",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=boot,path={run / 'boot.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=boot,name=sandboxd.boot",
            "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
            "-pidfile", str(run / "qemu.pid"),
        ]  # fmt: skip

    # ---- Runtime protocol ----------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> None:
        vm_id = spec.vm_id
        if not _VM_ID_RE.match(vm_id):
            raise ValueError(f"invalid vm_id {vm_id!r}")
        t0 = time.perf_counter()
        phases: dict[str, float] = {}  # milliseconds since t0 at the end of each step (vm.json; bench)

        def mark(phase: str) -> None:
            phases[phase] = round((time.perf_counter() - t0) * 1e3, 1)

        shape, rootfs, code = await self._shape(spec)
        mark("images")
        snapshot = self.snapshots / shape.key
        restore = (snapshot / "meta.json").exists()
        state_dir, run = Path(spec.state_dir), self.runs / vm_id
        async with AsyncExitStack() as undo:
            run.mkdir(mode=0o700)  # raises if the sandbox exists
            undo.callback(shutil.rmtree, run, True)
            os.symlink(state_dir, run / "state")
            state_dir.mkdir(parents=True, exist_ok=True)
            undo.callback(_remove_state_entries, state_dir)
            upper = state_dir / "disk.img"
            if restore:  # the layer exactly as the saved VM saw it (sparse: a cheap copy)
                await _tool("cp", "--sparse=always", str(snapshot / "upper.img"), str(upper))
            else:
                await _make_upper(upper, spec.resources.disk_mib)
            mark("disk")
            guest_ip = await _guest_ip(spec.netns_path)
            await _setup_vm_network(spec.netns_path, guest_ip)
            mark("network")
            undo.callback(_remove_cgroups, vm_id)  # kills QEMU too
            cgroups = _make_cgroups(vm_id, shape.memory_mib + QEMU_OVERHEAD_MIB)
            argv = self._qemu_argv(shape, rootfs, code, upper, run, state_dir / "init.log")
            if restore:
                argv += ["-incoming", f"exec:cat {shlex.quote(str(snapshot / 'vm.state'))}"]
            await _start_daemonized(argv, spec.netns_path, cgroups, state_dir / "init.log")
            mark("qemu")
            boot_path = Path(spec.agent_dir) / BOOT_CONFIG_NAME
            boot = json.loads(boot_path.read_text())
            boot["vm"] = {
                "clock": time.time(),
                "entropy": base64.b64encode(secrets.token_bytes(64)).decode(),
                "hosts": render_hosts(spec.hostname, vm_id),
            }
            await _deliver_boot(run / "boot.sock", boot, state_dir / "init.log")
            boot_path.unlink()  # it carries the token; the VM has it now
            # the quota binds from here on: booting or restoring is the host's work, not the sandbox's
            _apply_cpu_quota(vm_id, spec.resources.cpu_quota)
            mark("agent")
            (state_dir / "vm.json").write_text(json.dumps({
                "accelerator": shape.accel, "started_from": "snapshot" if restore else "cold_boot",
                "snapshot": shape.key, "shape": asdict(shape), "phases_ms": phases,
            }))  # fmt: skip
            undo.pop_all()
        log.info("launched microVM %s (%s, %s) in %.0f ms", vm_id, shape.accel,
                 "restored" if restore else "cold boot", (time.perf_counter() - t0) * 1e3)  # fmt: skip
        if not restore:
            self._schedule_snapshot(shape, rootfs, code)

    async def destroy(self, vm_id: str, state_dir: Path) -> None:
        if not _VM_ID_RE.match(vm_id):
            raise ValueError(f"invalid vm_id {vm_id!r}")
        run = self.runs / vm_id
        await asyncio.to_thread(_kill_qemu, run)
        await asyncio.to_thread(_remove_cgroups, vm_id)
        await asyncio.to_thread(_remove_state_entries, Path(state_dir))
        await asyncio.to_thread(shutil.rmtree, run, True)

    async def list_running(self) -> set[str]:
        running = set()
        with os.scandir(self.runs) as entries:
            for entry in entries:
                if _qemu_pid(Path(entry.path)) is not None:
                    running.add(entry.name)
        return running

    async def reclaim(self, keep: set[str]) -> list[str]:
        reclaimed = []
        for entry in sorted(os.scandir(self.runs), key=lambda e: e.name):
            name, run = entry.name, Path(entry.path)
            if name in keep:
                continue
            try:
                state_dir = Path(os.readlink(run / "state"))
            except OSError:
                state_dir = run / "state"  # never written: nothing of the sandbox's to remove there
            await self.destroy(name, state_dir)
            reclaimed.append(name)
        for stale in self.snapshots.glob(".tmp-*"):  # of a build whose worker died (its QEMU died too)
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(stale, ignore_errors=True)
        if reclaimed:
            log.info("microvm reclaimed %d leftover sandboxes", len(reclaimed))
        return reclaimed

    # ---- saved VM states -------------------------------------------------------------

    def _schedule_snapshot(self, shape: Shape, rootfs: Path, code: Path) -> None:
        if shape.key in self._snapshot_builds:
            return
        task = asyncio.create_task(self._build_snapshot(shape, rootfs, code))
        self._snapshot_builds[shape.key] = task
        task.add_done_callback(lambda _: self._snapshot_builds.pop(shape.key, None))

    async def _build_snapshot(self, shape: Shape, rootfs: Path, code: Path) -> None:
        """Boot one VM of shape up to its waiting agent, save its state, stop it."""
        key = shape.key
        final = self.snapshots / key
        # everything of the build, QEMU's sockets and pid file too, lives in tmp: a worker that
        # dies mid-build leaves only tmp (its QEMU dies with it), which reclaim removes
        tmp = self.snapshots / f".tmp-{key}-{os.getpid()}"
        t0 = time.perf_counter()
        proc = None
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            await _make_upper(tmp / "upper.img", shape.disk_mib)
            argv = self._qemu_argv(shape, rootfs, code, tmp / "upper.img", tmp, tmp / "console.log")
            # a network namespace of its own that dies with QEMU: the NIC's tap, no address
            proc = await asyncio.create_subprocess_exec(
                "unshare", "--net", "--", "/bin/sh", "-c", f'ip tuntap add dev {TAP} mode tap && exec "$@"', "sh", *argv,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            await _await_boot_prompt(tmp / "boot.sock", proc, tmp / "console.log")
            async with _Qmp(tmp / "qmp.sock") as qmp:
                await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(tmp / 'vm.state'))}"})
                while (status := await qmp.execute("query-migrate")).get("status") not in ("completed", "failed"):
                    await asyncio.sleep(0.02)
                if status.get("status") != "completed":
                    raise MicrovmError(f"saving the VM state failed: {status.get('error-desc')}")
                await qmp.execute("quit")
            await asyncio.wait_for(proc.wait(), START_TIMEOUT_S)
            for name in ("console.log", "boot.sock", "qmp.sock", "qemu.pid"):
                (tmp / name).unlink(missing_ok=True)
            (tmp / "meta.json").write_text(json.dumps({"shape": asdict(shape), "created": time.time()}))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._drop_superseded(shape)
            log.info("saved microVM state %s in %.1f s", key[:12], time.perf_counter() - t0)
        except (MicrovmError, OSError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("saving a microVM state for %s failed: %s", key[:12], exc)
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)

    def _drop_superseded(self, shape: Shape) -> None:
        """Delete saved states of the same sizes whose images are not this shape's (an old
        template build or guest code): each holds a VM's memory on disk."""
        sizes = json.loads(json.dumps(_sizes(asdict(shape))))
        for meta_path in self.snapshots.glob("*/meta.json"):
            if meta_path.parent.name == shape.key:
                continue
            with contextlib.suppress(OSError, ValueError, KeyError):
                if _sizes(json.loads(meta_path.read_text())["shape"]) == sizes:
                    shutil.rmtree(meta_path.parent, ignore_errors=True)

    def details(self) -> dict:
        return {"binary": self.name, "accelerator": self.accelerator, "kernel": self.kernel.release}


# ---- host plumbing ---------------------------------------------------------------------


def _sizes(shape: dict) -> dict:
    """A shape without its images: what a VM of a newer template or guest code replaces."""
    return {k: v for k, v in shape.items() if k not in ("rootfs_image", "code_image", "initrd", "kernel")}


async def _make_upper(image: Path, size_mib: int) -> None:
    try:
        await make_sparse_ext4(image, size_mib)
    except OciError as exc:
        raise MicrovmError(str(exc)) from None


async def _tool(*argv: str) -> None:
    try:
        await _run_tool(*argv)
    except OciError as exc:
        raise MicrovmError(str(exc)) from None


async def _guest_ip(netns_path: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", "-n", netns_path.name, "-4", "-o", "addr", "show", "dev", "eth0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out.decode())
    if match is None:
        raise MicrovmError(f"no IPv4 address on eth0 in {netns_path}")
    return match.group(1)


async def _setup_vm_network(netns_path: Path, guest_ip: str) -> None:
    """tap0 with the gateway address, forwarding on, and the guest_ip <-> VM_IP NAT."""
    batch = f"tuntap add dev {TAP} mode tap\naddr add {images.VM_GATEWAY}/30 dev {TAP}\nlink set {TAP} up\n"
    await _run_tool_stdin(["ip", "-n", netns_path.name, "-batch", "-"], batch.encode())
    ruleset = f"""table ip sandboxd_vm {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "eth0" ip daddr {guest_ip} dnat to {images.VM_IP}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "eth0" ip saddr {images.VM_IP} snat to {guest_ip}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{TAP}" ct state established,related accept
    iifname "{TAP}" drop
  }}
}}
"""
    await _run_tool_stdin(
        ["nsenter", f"--net={netns_path}", "--", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward && exec nft -f -"],
        ruleset.encode(),
    )


async def _run_tool_stdin(argv: list[str], data: bytes) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(data), START_TIMEOUT_S)
    if proc.returncode != 0:
        raise MicrovmError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {out.decode(errors='replace')[-400:]}")


def _make_cgroups(vm_id: str, memory_limit_mib: int) -> list[Path]:
    """cgroups named vm_id for QEMU (cgroup v1, as the OCI backend's): cpu (the quota, set by
    _apply_cpu_quota), memory (the cap), cpuacct (usage) and freezer (destroy freezes before it
    kills); their procs files."""
    dirs = [CGROUP_ROOT / controller / vm_id for controller in ("cpu", "memory", "cpuacct", "freezer")]
    memory = dirs[1]
    for d in dirs:
        if d.parent.is_dir():
            d.mkdir()
    limit = str(memory_limit_mib * 1024 * 1024)
    (memory / "memory.limit_in_bytes").write_text(limit)
    with contextlib.suppress(OSError):  # only with swap accounting
        (memory / "memory.memsw.limit_in_bytes").write_text(limit)
    return [d / "cgroup.procs" for d in dirs if d.is_dir()]


def _apply_cpu_quota(vm_id: str, cpu_quota: float) -> None:
    cpu, period = CGROUP_ROOT / "cpu" / vm_id, 100_000
    (cpu / "cpu.cfs_period_us").write_text(str(period))
    (cpu / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpu_quota * period))))


async def _start_daemonized(argv: list[str], netns_path: Path, cgroups: list[Path], log_file: Path) -> None:
    """Start QEMU detached (-daemonize: it outlives a worker restart) inside the sandbox's
    cgroups and network namespace; return once it runs."""
    script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 1; shift; done; shift; exec "$@"'
    with open(log_file, "ab", buffering=0) as out:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", script, "sh", *map(str, cgroups), "--", "nsenter", f"--net={netns_path}", "--", *argv,
            "-daemonize",
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
        try:
            rc = await asyncio.wait_for(proc.wait(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise MicrovmError("QEMU did not start in time") from None
    if rc != 0:
        raise MicrovmError(f"QEMU failed to start ({rc}): {_tail(log_file)}")


async def _deliver_boot(sock: Path, boot: dict, log_file: Path) -> None:
    """Send the boot config to the agent waiting on the VM's boot port; wait for its ok."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock))
    except OSError as exc:
        raise MicrovmError(f"boot port: {exc}; {_tail(log_file)}") from None
    try:
        writer.write(json.dumps(boot).encode() + b"\n")
        await writer.drain()
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise MicrovmError(f"the guest agent did not take its boot config; {_tail(log_file)}") from None
            if line == b"ok\n":
                return
            if not line:
                raise MicrovmError(f"the VM stopped while booting; {_tail(log_file)}")
            if line.startswith(b"error:"):
                raise MicrovmError(f"the guest agent refused its boot config: {line.decode(errors='replace')}")
            # else the agent's "awaiting boot" line (written on a cold boot)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def _await_boot_prompt(sock: Path, proc: asyncio.subprocess.Process, log_file: Path) -> None:
    """Until the agent of a booting VM waits for its config (then disconnect again)."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while True:
        if proc.returncode is not None:
            err = await proc.stderr.read() if proc.stderr else b""
            raise MicrovmError(f"QEMU exited ({proc.returncode}): {err.decode(errors='replace')[-400:]}")
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise MicrovmError("QEMU's boot port never appeared") from None
            await asyncio.sleep(0.02)
    try:
        line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise MicrovmError(f"the guest agent never asked for its boot config; {_tail(log_file)}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
    if not line.startswith(b"sandboxd-agent: awaiting boot"):
        raise MicrovmError(f"unexpected line on the boot port: {line[:200]!r}; {_tail(log_file)}")


def _qemu_pid(run: Path) -> int | None:
    """The pid of the QEMU serving run (its pid file, checked against /proc), or None."""
    try:
        pid = int((run / "qemu.pid").read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    return pid if str(run / "qmp.sock").encode() in cmdline else None


def _kill_qemu(run: Path, deadline_s: float = 10.0) -> None:
    pid = _qemu_pid(run)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + deadline_s
    while os.path.exists(f"/proc/{pid}") and _qemu_pid(run) == pid and time.monotonic() < end:
        time.sleep(0.005)


_STATE_ENTRIES = ("disk.img", "init.log", "vm.json")


def _remove_state_entries(state_dir: Path) -> None:
    for name in _STATE_ENTRIES:
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
    with contextlib.suppress(OSError):
        state_dir.rmdir()  # only if now empty: the worker may keep its own files there


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_bytes()[-4 * n :].decode(errors="replace").strip()[-n:]
    except OSError:
        return ""
