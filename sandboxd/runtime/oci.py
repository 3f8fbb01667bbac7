"""OCI container backend: ``crun`` (default) or ``runc``.

Per sandbox (``spec.state_dir``)::

    state_dir/
      disk.img          sparse ext4 image, size = resources.disk_mib: the writable layer's limit
      layer/            disk.img loop-mounted (autoclear); holds upper/ and work/
      layer/upper/ layer/work/   overlay writable layer (everything the sandbox writes)
      rootfs/           overlay mount: lowerdir = template rootfs (never written)
      config.json       OCI bundle config (see oci_spec)
      hosts hostname resolv.conf   bind-mounted into /etc
      init.log          stdout/stderr of the container's init (the guest agent)
      runtime.log       the OCI runtime's own error log

Per runtime instance (``state_root``)::

    state_root/<binary>/            the runtime's ``--root``: two sandboxd instances
                                    on one host never see each other's containers
    state_root/<binary>.bundles/<vm_id> -> state_dir    written before anything is
                                    taken, so ``reclaim`` finds what a crash leaked

crun on a hybrid cgroup host (v1 controllers + cgroup2 at /sys/fs/cgroup/unified)
refuses to run ("cgroups in hybrid mode not supported"). It is started in a private
mount namespace (a slave of the host's, so it still sees the sandbox overlay) in which
/sys/fs/cgroup/unified is covered by an empty tmpfs: crun then sees a plain v1 host. That is done by a
``preexec_fn`` making three syscalls through ctypes (no extra exec); runc handles v1
and hybrid hosts itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

from sandboxd.runtime import oci_spec
from sandboxd.runtime.base import LaunchSpec

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNIFIED_MOUNT = CGROUP_ROOT / "unified"
CLI_TIMEOUT_S = 30.0
_VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Entries of state_dir this backend creates (and removes on destroy).
_STATE_ENTRIES = (
    "rootfs",
    "layer",  # unmounted after rootfs (the overlay's upper lives in it), then its image goes
    "disk.img",
    "upper",  # sandboxes created before the size limit kept upper/work on the host disk
    "work",
    "config.json",
    "hosts",
    "hostname",
    "resolv.conf",
    "init.log",
    "runtime.log",
)

_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19
_MNT_DETACH = 2
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_UNIFIED_BYTES = bytes(UNIFIED_MOUNT)


_LOOP_CLR_FD = 0x4C01
MKFS_EXT4 = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"


class OciError(Exception):
    """An OCI runtime command failed; the message carries the runtime's own error text."""


def enter_legacy_cgroup_view() -> None:
    """preexec_fn for crun: private (slave) mount namespace without the cgroup2 mount.

    Runs in the forked child before exec: only ctypes calls, nothing that imports or
    takes a Python-level lock.
    """
    if _libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if _libc.mount(None, b"/", None, _MS_REC | _MS_SLAVE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount(MS_REC|MS_SLAVE)")
    # Cover the cgroup2 mount with a private tmpfs rather than unmounting it: crun
    # mkdirs a "unified" cgroup path and would otherwise leave it on the host's
    # /sys/fs/cgroup tmpfs, underneath (hidden by) the host's cgroup2 mount.
    if _libc.mount(b"tmpfs", _UNIFIED_BYTES, b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"size=64k,mode=755") != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs on /sys/fs/cgroup/unified")


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount in this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype = right.split(" ", 1)[0]
            out.append((_unescape_mount(fields[4]), fstype))
    return out


def _unescape_mount(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def host_is_cgroup_hybrid() -> bool:
    mounts = dict(_mountinfo())
    return mounts.get(str(CGROUP_ROOT)) == "tmpfs" and mounts.get(str(UNIFIED_MOUNT)) == "cgroup2"


def _is_mountpoint(path: Path) -> bool:
    p = str(path)
    return any(mp == p for mp, _ in _mountinfo())


def _mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    for p in (lower, upper, work):
        if any(c in str(p) for c in ",:\n"):
            raise ValueError(f"overlay path contains an unsupported character: {p}")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if _libc.mount(b"overlay", bytes(target), b"overlay", 0, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount overlay on {target}: {os.strerror(e)}")


def _umount(target: Path) -> None:
    """Unmount target; lazy-detach if busy; no error if it is not mounted."""
    b = bytes(target)
    for _ in range(8):  # stacked mounts (should not happen) come off one by one
        if _libc.umount2(b, 0) == 0:
            continue
        e = ctypes.get_errno()
        if e in (errno.EINVAL, errno.ENOENT):
            return
        if e == errno.EBUSY:
            if _libc.umount2(b, _MNT_DETACH) == 0:
                continue
            e = ctypes.get_errno()
            if e in (errno.EINVAL, errno.ENOENT):
                return
        raise OSError(e, f"umount {target}: {os.strerror(e)}")


def _cgroup_dirs(vm_id: str) -> list[Path]:
    """Existing cgroup directories named vm_id under every mounted hierarchy."""
    found = []
    try:
        hierarchies = list(os.scandir(CGROUP_ROOT))
    except FileNotFoundError:
        return found
    for h in hierarchies:
        d = Path(h.path) / vm_id
        if d.is_dir():
            found.append(d)
    return found


def _kill_cgroup_tasks(vm_id: str) -> bool:
    """SIGKILL every task of the sandbox, frozen first so no pid is reused under us.

    Returns whether any cgroup of the sandbox exists.
    """
    dirs = _cgroup_dirs(vm_id)
    if not dirs:
        return False
    freezer = CGROUP_ROOT / "freezer" / vm_id / "freezer.state"
    frozen = False
    with contextlib.suppress(OSError):
        freezer.write_text("FROZEN")
        frozen = True
    try:
        pids: set[int] = set()
        for d in dirs:
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        if frozen:
            with contextlib.suppress(OSError):
                freezer.write_text("THAWED")
    return True


def _remove_cgroups(vm_id: str, deadline_s: float = 10.0) -> None:
    """Kill whatever is left in the sandbox's cgroups and remove them (deepest first)."""
    if not _kill_cgroup_tasks(vm_id):
        return
    end = time.monotonic() + deadline_s
    delay = 0.0005
    while True:
        pending: list[Path] = []
        for d in _cgroup_dirs(vm_id):
            # children first (the sandbox's cgroup mount is read-only, but be thorough)
            subs = sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for sub in [*subs, d]:
                _kill_and_rmdir(sub, pending)
        if not pending:
            return
        if time.monotonic() > end:
            raise OciError(f"cgroups of {vm_id} still busy: {', '.join(map(str, pending))}")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _kill_and_rmdir(d: Path, pending: list[Path]) -> None:
    try:
        d.rmdir()
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
    with contextlib.suppress(FileNotFoundError):
        for pid in (d / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    pending.append(d)


def default_nameservers() -> list[str]:
    servers = []
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                if not parts[1].startswith("127.") and parts[1] != "::1":
                    servers.append(parts[1])
    return servers or ["1.1.1.1", "8.8.8.8"]


class OciRuntime:
    """Runtime protocol implementation over the crun/runc command-line interface."""

    def __init__(
        self,
        binary: str = "crun",
        state_root: Path = Path("/run/sandboxd/oci"),
        *,
        nameservers: list[str] | None = None,
        binary_path: str | None = None,
    ) -> None:
        if binary not in ("crun", "runc", "runsc"):  # runsc: see runtime/gvisor.py
            raise ValueError(f"unsupported OCI runtime {binary!r} (crun or runc)")
        self.name = binary
        self.binary_path = binary_path or shutil.which(binary) or binary
        self.state_root = Path(state_root)
        self.root = self.state_root / binary
        self.bundles = self.state_root / f"{binary}.bundles"
        self.nameservers = nameservers if nameservers is not None else default_nameservers()
        self._preexec = enter_legacy_cgroup_view if binary == "crun" and host_is_cgroup_hybrid() else None
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.bundles.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ---- the runtime's CLI -------------------------------------------------------

    def _global_flags(self) -> list[str]:
        """Flags put before ``--root`` on every call (runsc's platform and network)."""
        return []

    def _adjust_config(self, config: dict, spec: LaunchSpec) -> dict:
        """Hook for a runtime that needs a different config.json (gVisor's agent transport)."""
        return config

    def _argv(self, *args: str) -> list[str]:
        return [self.binary_path, *self._global_flags(), "--root", str(self.root), *args]

    async def _cli(
        self,
        *args: str,
        check: bool = True,
        timeout: float = CLI_TIMEOUT_S,
        legacy_view: bool = True,
    ) -> tuple[int, bytes, bytes]:
        """Run the runtime's CLI; ``legacy_view`` is needed by commands touching cgroups."""
        proc = await asyncio.create_subprocess_exec(
            *self._argv(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=self._preexec if legacy_view else None,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise OciError(f"{self.name} {args[0]} timed out after {timeout}s") from None
        rc = proc.returncode
        assert rc is not None
        if check and rc != 0:
            raise OciError(f"{self.name} {' '.join(args[:2])} failed ({rc}): {_tail(err or out)}")
        return rc, out or b"", err or b""

    # ---- Runtime protocol ----------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> None:
        vm_id = spec.vm_id
        if not _VM_ID_RE.match(vm_id):
            raise ValueError(f"invalid vm_id {vm_id!r}")
        state_dir = Path(spec.state_dir)
        t0 = time.perf_counter()
        async with contextlib.AsyncExitStack() as undo:
            record = self.bundles / vm_id
            if record.is_symlink() or record.exists():
                raise OciError(f"sandbox {vm_id} already exists in {self.name}")
            os.symlink(state_dir, record)
            undo.callback(_unlink_quiet, record)

            state_dir.mkdir(parents=True, exist_ok=True)
            undo.callback(_remove_state_entries, state_dir)
            layer, rootfs = state_dir / "layer", state_dir / "rootfs"
            layer.mkdir(mode=0o700)
            rootfs.mkdir(mode=0o755)
            await _make_layer_fs(state_dir / "disk.img", layer, spec.resources.disk_mib)
            upper, work = layer / "upper", layer / "work"
            for d in (upper, work):
                d.mkdir(mode=0o755)
            # the template root's mode/owner, not mkdir's, becomes the sandbox's "/"
            st = os.stat(spec.rootfs)
            os.chmod(upper, st.st_mode & 0o7777)
            _mount_overlay(Path(spec.rootfs), upper, work, rootfs)
            undo.callback(_umount, rootfs)

            hosts, hostname, resolv = state_dir / "hosts", state_dir / "hostname", state_dir / "resolv.conf"
            hosts.write_text(oci_spec.render_hosts(spec.hostname, vm_id))
            hostname.write_text(spec.hostname + "\n")
            resolv.write_text(oci_spec.render_resolv_conf(self.nameservers))
            config = oci_spec.build_config(spec, hosts_file=hosts, hostname_file=hostname, resolv_conf_file=resolv)
            config = self._adjust_config(config, spec)
            (state_dir / "config.json").write_text(json.dumps(config))

            undo.push_async_callback(self._delete_container, vm_id)
            runtime_log = state_dir / "runtime.log"
            log_arg = f"file:{runtime_log}" if self.name == "crun" else str(runtime_log)
            with open(state_dir / "init.log", "ab", buffering=0) as init_log:
                # the detached init inherits stdout/stderr: a file, never a pipe
                rc, _, _ = await self._cli_run(log_arg, state_dir, vm_id, init_log.fileno())
            if rc != 0:
                detail = _read_tail(runtime_log) or _read_tail(state_dir / "init.log")
                raise OciError(f"{self.name} run {vm_id} failed ({rc}): {detail}")
            undo.pop_all()
        log.debug("launched %s with %s in %.1f ms", vm_id, self.name, (time.perf_counter() - t0) * 1e3)

    async def _cli_run(self, log_arg: str, bundle: Path, vm_id: str, out_fd: int) -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            self.binary_path,
            *self._global_flags(),
            "--root",
            str(self.root),
            "--log",
            log_arg,
            "run",
            "--detach",
            "--bundle",
            str(bundle),
            vm_id,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_fd,
            stderr=out_fd,
            preexec_fn=self._preexec,
        )
        try:
            rc = await asyncio.wait_for(proc.wait(), CLI_TIMEOUT_S)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise OciError(f"{self.name} run {vm_id} timed out") from None
        return rc, b"", b""

    async def destroy(self, vm_id: str, state_dir: Path) -> None:
        if not _VM_ID_RE.match(vm_id):
            raise ValueError(f"invalid vm_id {vm_id!r}")
        t0 = time.perf_counter()
        # Nothing of the sandbox runs past this line ...
        await asyncio.to_thread(_remove_cgroups, vm_id)
        # ... so the runtime's bookkeeping and the filesystem can go in parallel.
        await asyncio.gather(
            self._forget_container(vm_id),
            asyncio.to_thread(_remove_state_entries, Path(state_dir)),
        )
        _unlink_quiet(self.bundles / vm_id)
        log.debug("destroyed %s in %.1f ms", vm_id, (time.perf_counter() - t0) * 1e3)

    async def _delete_container(self, vm_id: str) -> None:
        """Kill every process, remove the cgroups, then the runtime's own state (idempotent)."""
        await asyncio.to_thread(_remove_cgroups, vm_id)
        await self._forget_container(vm_id)

    async def _forget_container(self, vm_id: str) -> None:
        """Delete the runtime's record of a container whose processes are all gone.

        Killing through the cgroups (freeze, SIGKILL, thaw; the pid namespace dies with
        its init) is much faster than ``delete --force`` (runc polls in 100 ms steps)
        and, for crun, a plain ``delete`` of a stopped container needs no private mount
        namespace.
        """
        if not (self.root / vm_id).exists():
            return
        rc, out, err = await self._cli("delete", vm_id, check=False, legacy_view=False)
        if rc != 0:
            # e.g. a container the runtime still believes is running: the slow path
            rc, out, err = await self._cli("delete", "--force", vm_id, check=False)
            await asyncio.to_thread(_remove_cgroups, vm_id)
        if rc != 0 and (self.root / vm_id).exists():
            log.warning("%s delete %s failed (%d): %s", self.name, vm_id, rc, _tail(err or out))
            # the runtime's state of a container it cannot delete (e.g. half-created)
            await asyncio.to_thread(shutil.rmtree, self.root / vm_id, True)

    async def list_running(self) -> set[str]:
        return {c["id"] for c in await self._list() if c.get("status") == "running"}

    async def _list(self) -> list[dict]:
        _, out, _ = await self._cli("list", "--format", "json", legacy_view=False)
        data = json.loads(out or b"[]")
        return data or []

    async def reclaim(self, keep: set[str]) -> list[str]:
        bundles: dict[str, Path | None] = {}
        for c in await self._list():
            bundles[c["id"]] = Path(c["bundle"]) if c.get("bundle") else None
        for entry in os.scandir(self.bundles):
            with contextlib.suppress(OSError):
                bundles[entry.name] = Path(os.readlink(entry.path))
        reclaimed = []
        for vm_id, state_dir in sorted(bundles.items()):
            if vm_id in keep or not _VM_ID_RE.match(vm_id):
                continue
            if state_dir is None:
                await self._delete_container(vm_id)
                _unlink_quiet(self.bundles / vm_id)
            else:
                await self.destroy(vm_id, state_dir)
            reclaimed.append(vm_id)
        if reclaimed:
            log.info("%s reclaimed %d leftover sandboxes", self.name, len(reclaimed))
        return reclaimed

    # ---- debugging / tests ---------------------------------------------------------

    async def exec_debug(self, vm_id: str, argv: list[str], timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run argv inside the sandbox through the runtime's ``exec`` (tests, debugging).

        The worker talks to the guest agent instead; this bypasses it.
        """
        return await self._cli("exec", vm_id, *argv, check=False, timeout=timeout)

    async def state(self, vm_id: str) -> dict | None:
        rc, out, _ = await self._cli("state", vm_id, check=False, legacy_view=False)
        return json.loads(out) if rc == 0 else None


def _unlink_quiet(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)


async def _make_layer_fs(image: Path, mountpoint: Path, size_mib: int) -> None:
    """A sparse ext4 image of size_mib, loop-mounted on mountpoint: the sandbox's disk limit.

    ~25 ms (truncate 0, mkfs 8-13, mount -o loop 6-10). No journal (a sandbox never outlives
    its host's uptime), no reserved blocks (root inside gets exactly size_mib), lazy inode
    tables; mounted with ``discard`` so files deleted inside give their space back to the host.
    ``mount -o loop`` sets autoclear: the loop device goes away with the last unmount.
    """
    await make_sparse_ext4(image, size_mib)
    await _run_tool("mount", "-t", "ext4", "-o", "loop,discard,noatime", str(image), str(mountpoint))


async def make_sparse_ext4(image: Path, size_mib: int) -> None:
    """A new sparse file of size_mib with an empty ext4 on it (see _make_layer_fs for the options)."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_mib * 1024 * 1024)
    finally:
        os.close(fd)
    await _run_tool(MKFS_EXT4, "-q", "-F", "-m", "0", "-O", "^has_journal",
                    "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", str(image))  # fmt: skip


async def _run_tool(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise OciError(f"{argv[0]} timed out") from None
    if proc.returncode != 0:
        raise OciError(f"{os.path.basename(argv[0])} failed ({proc.returncode}): {_tail(out or b'')}")


def loop_devices_backed_by(image: Path) -> list[str]:
    """/dev/loopN devices whose backing file is image (read from sysfs, no subprocess)."""
    target = str(image)
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            name = backing.read_text().strip().removesuffix(" (deleted)")
            if name == target:
                found.append("/dev/" + backing.parent.parent.name)
    return found


def _detach_loops(image: Path, deadline_s: float = 5.0) -> None:
    """Detach the image's loop devices; wait for autoclear (a dying mount namespace may
    still hold the filesystem for a moment after the host's unmount)."""
    end = time.monotonic() + deadline_s
    while True:
        devices = loop_devices_backed_by(image)
        if not devices:
            return
        for dev in devices:
            with contextlib.suppress(OSError):
                fd = os.open(dev, os.O_RDONLY)
                try:
                    fcntl.ioctl(fd, _LOOP_CLR_FD)  # busy: the kernel sets autoclear instead
                except OSError:
                    pass
                finally:
                    os.close(fd)
        if time.monotonic() > end:
            log.warning("loop device(s) %s of %s still attached", ", ".join(devices), image)
            return
        time.sleep(0.01)


def _remove_state_entries(state_dir: Path) -> None:
    for name in _STATE_ENTRIES:
        p = state_dir / name
        if name in ("rootfs", "layer") and _is_mountpoint(p):
            _umount(p)
            if _is_mountpoint(p):  # never delete through a live mount
                continue
        if name == "disk.img":
            if _is_mountpoint(state_dir / "layer"):
                continue  # still in use: keep the image (a later destroy or reclaim retries)
            _detach_loops(p)
        if p.is_symlink() or p.is_file():
            _unlink_quiet(p)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(OSError):
        state_dir.rmdir()  # only if now empty: the worker may keep its own files there


def _tail(b: bytes, n: int = 400) -> str:
    return b.decode(errors="replace").strip()[-n:]


def _read_tail(p: Path, n: int = 400) -> str:
    try:
        return _tail(p.read_bytes()[-4 * n :], n)
    except OSError:
        return ""
