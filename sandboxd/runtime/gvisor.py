"""gVisor backend: Debian's ``runsc`` over the same OCI bundle and rootfs as ``oci.py``.

The sandbox's system calls are served by gVisor's user-space kernel (the Sentry), not
by the host kernel; the host sees only the Sentry and its file proxy (the gofer).
Everything else is the OCI backend's: the overlay over the template rootfs in a
size-limited ext4 image, the bundle's ``config.json`` (``oci_spec``), the cgroup v1
limits at ``/sys/fs/cgroup/<ctrl>/<vm_id>`` (runsc puts the Sentry and gofer there, so
the memory limit caps the whole sandbox) and the network namespace the worker prepared
(``--network=sandbox``: the Sentry takes the veth over with its own network stack).

Differences from crun/runc:

* Platform: how the Sentry intercepts system calls. ``probe_platform`` tries
  ``systrap`` (not in Debian's 2022 build), ``kvm`` (needs working nested virtualisation;
  it hangs on KVM-PVM hosts) and ``ptrace`` with a ``runsc do /bin/true`` each, with a
  short timeout, once per boot (cached under /run keyed by the runsc binary and kernel).
* Guest-agent transport: a unix socket the agent creates inside gVisor lives in the
  Sentry's own filesystem, not on the host (the 2022 build cannot export a listening
  socket through the gofer), so the agent listens on TCP ``0.0.0.0:AGENT_PORT`` instead
  and the worker connects to ``http://<guest veth IP>:AGENT_PORT``. The host may open
  connections into a sandbox; other sandboxes may not (the nftables forward rules drop
  sandbox → sandbox), the ``host_port`` DNAT only targets port 9090, and every request
  still needs the sandbox's bearer token.
* coreutils: runsc's statx gap is bridged by a preloaded shim (runtime/gvisor_compat.py).
* Seccomp: the bundle's profile is not applied to the workload (runsc without
  ``--oci-seccomp`` ignores it); the Sentry itself runs under runsc's own tight filter
  and the workload never reaches the host kernel. Capabilities are the bundle's.
* ``runsc delete`` is slow (~1.8 s): destroy kills every process through the cgroups
  first (the sandbox is gone at once), then lets runsc forget its record.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import platform as _platform
import shutil
import signal
import tempfile
from pathlib import Path

from sandboxd.guest.protocol import AGENT_ARGV
from sandboxd.runtime.base import LaunchSpec
from sandboxd.runtime.gvisor_compat import build_shim, shim_mounts
from sandboxd.runtime.oci import (
    _MS_NODEV,
    _MS_NOEXEC,
    _MS_NOSUID,
    _MS_REC,
    _MS_SLAVE,
    OciRuntime,
    _libc,
)

_CLONE_NEWNS = 0x00020000
_PROC_SYS_NET = b"/proc/sys/net"

log = logging.getLogger(__name__)

AGENT_PORT = 49983  # the guest agent's TCP port inside a gVisor sandbox (never host_port's 9090)
PLATFORMS = ("systrap", "kvm", "ptrace")  # best first
PROBE_TIMEOUT_S = 3.0
PROBE_CACHE = Path("/run/sandboxd/gvisor-probe.json")  # /run: forgotten at reboot


def hide_proc_sys_net() -> None:
    """preexec_fn for runsc: a private (slave) mount namespace with /proc/sys/net covered.

    runsc 2022 refuses ``--network=sandbox`` when ``/proc/sys/net/core/rmem_default``
    exists, taking it as the sign of the host's root network namespace; kernels since 6.x
    have that file in every namespace, so the check always fires. Hiding the directory
    from runsc (only runsc: its own mount namespace) restores the old meaning. Only
    ctypes calls (runs between fork and exec).
    """
    if _libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if _libc.mount(None, b"/", None, _MS_REC | _MS_SLAVE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount(MS_REC|MS_SLAVE)")
    if (
        _libc.mount(
            b"tmpfs",
            _PROC_SYS_NET,
            b"tmpfs",
            _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
            b"size=4k,mode=555",
        )
        != 0
    ):
        raise OSError(ctypes.get_errno(), "mount tmpfs on /proc/sys/net")


def runsc_path() -> str | None:
    return shutil.which("runsc")


def _probe_key(binary: str) -> str:
    st = os.stat(binary)
    return f"{os.path.realpath(binary)}:{st.st_size}:{int(st.st_mtime)}:{_platform.release()}"


async def _probe_one(binary: str, plat: str) -> bool:
    """Does ``runsc --platform=plat do /bin/true`` succeed in time? Leaves nothing behind."""
    root = tempfile.mkdtemp(prefix="sandboxd-runsc-probe-", dir="/run" if os.path.isdir("/run") else None)
    proc = None
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, f"--platform={plat}", "--network=none", "--root", root, "do", "/bin/true",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True, cwd="/",
        )  # fmt: skip
        rc = await asyncio.wait_for(proc.wait(), PROBE_TIMEOUT_S)
        return rc == 0
    except (asyncio.TimeoutError, OSError):
        return False
    finally:
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        _kill_processes_mentioning(root)
        await asyncio.to_thread(shutil.rmtree, root, True)


def _kill_processes_mentioning(needle: str) -> None:
    """SIGKILL every process whose command line mentions needle (a probe's private --root)."""
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    os.kill(int(entry.name), signal.SIGKILL)


async def probe_platform(binary: str | None = None) -> str | None:
    """The best gVisor platform that boots here, or None when runsc is missing or none does."""
    binary = binary or runsc_path()
    if binary is None:
        return None
    try:
        key = _probe_key(binary)
    except OSError:
        return None
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(PROBE_CACHE.read_text())
        if cached["key"] == key:
            return cached["platform"]
    candidates = [p for p in PLATFORMS if p != "kvm" or os.path.exists("/dev/kvm")]
    results = await asyncio.gather(*(_probe_one(binary, p) for p in candidates))
    found = next((p for p, ok in zip(candidates, results) if ok), None)
    log.info("gVisor platform probe: %s", dict(zip(candidates, results)))
    with contextlib.suppress(OSError):
        PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        PROBE_CACHE.write_text(json.dumps({"key": key, "platform": found}))
    return found


class GvisorRuntime(OciRuntime):
    """Runtime protocol over ``runsc`` (gVisor); see the module docstring."""

    agent_port = AGENT_PORT

    def __init__(
        self,
        state_root: Path = Path("/run/sandboxd/oci"),
        *,
        platform: str = "ptrace",
        nameservers: list[str] | None = None,
        binary_path: str | None = None,
    ) -> None:
        super().__init__("runsc", state_root, nameservers=nameservers, binary_path=binary_path)
        self.platform = platform
        self._preexec = hide_proc_sys_net
        self._statx_shim = build_shim(state_root.parent / "gvisor-compat")

    def _global_flags(self) -> list[str]:
        return [f"--platform={self.platform}", "--network=sandbox"]

    def _adjust_config(self, config: dict, spec: LaunchSpec) -> dict:
        config["process"]["args"] = [*AGENT_ARGV, "--listen", f"0.0.0.0:{AGENT_PORT}"]
        if self._statx_shim is not None:
            config["mounts"] += shim_mounts(self._statx_shim)
        return config

    async def list_running(self) -> set[str]:
        # `runsc list` costs a Go start-up (~30 ms CPU) and the reaper asks every second:
        # skip it while this worker has no gVisor sandbox (launch records one first)
        with os.scandir(self.bundles) as entries:
            if next(entries, None) is None:
                return set()
        return await super().list_running()
