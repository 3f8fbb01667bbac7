"""Build the OCI runtime ``config.json`` for a sandbox (a pure function, no I/O).

The container is shaped like a Docker container with the default security settings,
with the guest agent as its init:

* namespaces: pid, mount, uts, ipc, cgroup of its own; the network namespace the
  worker's NetworkManager prepared (``spec.netns_path``); hostname = ``spec.hostname``.
* root: the overlay mount at ``state_dir/rootfs`` (template lower, writable upper).
* process: ``AGENT_ARGV`` as uid 0 in ``/``, env PATH/LANG/HOME only, no_new_privs,
  capabilities = Docker's default 14 in bounding/effective/permitted (none ambient or
  inheritable), ``oomScoreAdj`` high so a host-wide OOM picks the sandbox, not the worker.
* mounts: /proc, /dev (tmpfs) + /dev/pts + /dev/shm (size-limited) + /dev/mqueue,
  /sys and the cgroup tree read-only, the agent's run dir (rw) and code dir (ro),
  ``spec.extra_ro_mounts`` (ro: the agents package, the agent CLI layer), and generated /etc/hosts, /etc/hostname, /etc/resolv.conf.
* maskedPaths / readonlyPaths: Docker's lists.
* resources: memory limit = memory+swap limit (swap counted, so it cannot be dodged
  by swapping) = ``memory_mib``; CFS quota = period × vcpu × cpu_fraction; pids limit;
  device cgroup deny-all (the runtime adds its default devices back).
* ``cgroupsPath`` = ``/<vm_id>``: cgroups land at ``/sys/fs/cgroup/<ctrl>/<vm_id>`` with
  no shared parent directory to leak.
* no ``rlimits``: root on some hosts lacks CAP_SYS_RESOURCE, and raising a limit above
  the current hard limit fails; the sandbox inherits the worker's limits.

Seccomp
-------
``defaultAction`` is ALLOW with an explicit deny list, which is at least as strict as
Docker's default allow-list profile for a container without CAP_SYS_ADMIN,
CAP_SYS_MODULE, CAP_SYS_TIME, CAP_SYS_BOOT, CAP_SYS_RAWIO, CAP_SYSLOG, CAP_SYS_PACCT,
CAP_SYS_NICE, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_BPF/PERFMON:

* kernel and modules: init_module finit_module delete_module create_module
  query_module get_kernel_syms kexec_load kexec_file_load reboot
* mounts and namespaces: mount umount2 pivot_root unshare setns fsopen fsconfig
  fsmount fspick move_mount open_tree mount_setattr; ``clone`` with any of
  CLONE_NEWNS/NEWUTS/NEWIPC/NEWUSER/NEWPID/NEWNET/NEWCGROUP (EPERM);
  ``clone3`` returns ENOSYS so libc falls back to ``clone`` (its flags live in memory
  seccomp cannot inspect)
* swap and quota: swapon swapoff quotactl quotactl_fd
* tracing, BPF, perf, keys: bpf perf_event_open lookup_dcookie fanotify_init
  userfaultfd add_key request_key keyctl kcmp process_vm_readv process_vm_writev
  pidfd_getfd (``ptrace`` stays allowed, as in Docker on kernels >= 4.8: it only
  reaches processes inside the sandbox's own pid namespace)
* file handles: open_by_handle_at name_to_handle_at
* time: settimeofday clock_settime adjtimex clock_adjtime
* hardware: iopl ioperm
* NUMA policy: mbind set_mempolicy get_mempolicy move_pages migrate_pages
  set_mempolicy_home_node
* io_uring_setup io_uring_enter io_uring_register (Docker >= 25 blocks io_uring)
* socket(AF_VSOCK) (Docker >= 25)
* misc: acct syslog sysfs _sysctl nfsservctl uselib ustat vhangup
* personality: only the values Docker allows (0, 0x8, 0x20000, 0x20008, 0xffffffff)

Only the native architecture is listed, so a syscall made through another ABI (i386
``int 0x80``, x32) hits libseccomp's bad-arch action (kill) instead of bypassing the
deny list.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from sandboxd.guest.protocol import AGENT_ARGV, GUEST_CODE_DIR, GUEST_RUN_DIR
from sandboxd.runtime.base import LaunchSpec

OCI_VERSION = "1.0.2"
CPU_PERIOD_US = 100_000
SHM_SIZE_BYTES = 64 * 1024 * 1024
DEV_SIZE_BYTES = 64 * 1024
# The kernel's OOM killer prefers higher scores; the sandbox must die before the worker.
SANDBOX_OOM_SCORE_ADJ = 500

ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "HOME=/root",
]

# Docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

# Docker's defaults (moby oci/defaults.go).
MASKED_PATHS = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]

DENIED_SYSCALLS = [
    # kernel and modules
    "init_module", "finit_module", "delete_module", "create_module", "query_module",
    "get_kernel_syms", "kexec_load", "kexec_file_load", "reboot",
    # mounts and namespaces
    "mount", "umount2", "pivot_root", "unshare", "setns", "fsopen", "fsconfig",
    "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    # swap and quota
    "swapon", "swapoff", "quotactl", "quotactl_fd",
    # tracing, BPF, perf, keys, cross-process memory
    "bpf", "perf_event_open", "lookup_dcookie", "fanotify_init", "userfaultfd",
    "add_key", "request_key", "keyctl", "kcmp", "process_vm_readv",
    "process_vm_writev", "pidfd_getfd",
    # file handles
    "open_by_handle_at", "name_to_handle_at",
    # time
    "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
    # hardware
    "iopl", "ioperm",
    # NUMA policy
    "mbind", "set_mempolicy", "get_mempolicy", "move_pages", "migrate_pages",
    "set_mempolicy_home_node",
    # io_uring
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # misc
    "acct", "syslog", "sysfs", "_sysctl", "nfsservctl", "uselib", "ustat", "vhangup",
]  # fmt: skip

CLONE_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
AF_VSOCK = 40
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

EPERM = 1
ENOSYS = 38

_ARCHES = {
    "x86_64": "SCMP_ARCH_X86_64",
    "aarch64": "SCMP_ARCH_AARCH64",
    "arm64": "SCMP_ARCH_AARCH64",
    "riscv64": "SCMP_ARCH_RISCV64",
    "s390x": "SCMP_ARCH_S390X",
    "ppc64le": "SCMP_ARCH_PPC64LE",
}


def seccomp_profile(machine: str | None = None) -> dict[str, Any]:
    """The deny-list profile described in the module docstring."""
    machine = machine or platform.machine()
    arch = _ARCHES.get(machine)
    if arch is None:
        raise ValueError(f"no seccomp architecture known for machine {machine!r}")
    # On s390x clone's flags are the second argument.
    clone_flags_arg = 1 if machine == "s390x" else 0
    syscalls: list[dict[str, Any]] = [
        {"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_EQ"}],
        },
    ]
    for flag in CLONE_NAMESPACE_FLAGS.values():
        syscalls.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [
                    {"index": clone_flags_arg, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}
                ],
            }
        )
    for cmp in _personality_deny_comparisons():
        syscalls.append({"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM, "args": [cmp]})
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": [arch], "syscalls": syscalls}


def _personality_deny_comparisons() -> list[dict[str, Any]]:
    """Single-comparison rules matching every value except PERSONALITY_ALLOWED.

    A rule ANDs its comparisons, but runtimes/libseccomp do not support several
    comparisons of the same argument in one rule (all values ended up denied), so the
    complement is spelled out as one-comparison rules (any matching rule denies):

    * anything above 32 bits;
    * bit 0 clear and a bit outside 0x20008 set (covers everything but 0, 0x8,
      0x20000, 0x20008 among even values);
    * bit 0 set and not all 32 bits set: bits 0..k set and bit k+1 clear, for each k
      (leaves only 0xffffffff, the "query" value).
    """
    low_allowed = 0x20008
    cmps: list[dict[str, Any]] = [{"index": 0, "value": 0xFFFFFFFF, "op": "SCMP_CMP_GT"}]
    for b in range(1, 32):
        if not (low_allowed >> b) & 1:
            # OCI MASKED_EQ: (arg & value) == valueTwo
            cmps.append({"index": 0, "value": (1 << b) | 1, "valueTwo": 1 << b, "op": "SCMP_CMP_MASKED_EQ"})
    for k in range(31):
        mask = (1 << (k + 2)) - 1
        cmps.append({"index": 0, "value": mask, "valueTwo": (1 << (k + 1)) - 1, "op": "SCMP_CMP_MASKED_EQ"})
    return cmps


def render_hosts(hostname: str, vm_id: str) -> str:
    names = hostname if hostname == vm_id else f"{hostname} {vm_id}"
    return (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{names}\n"
    )


def render_resolv_conf(nameservers: list[str]) -> str:
    lines = [f"nameserver {ns}" for ns in nameservers]
    lines.append("options timeout:2 attempts:2")
    return "\n".join(lines) + "\n"


def build_config(
    spec: LaunchSpec,
    *,
    hosts_file: Path,
    hostname_file: Path,
    resolv_conf_file: Path,
    machine: str | None = None,
) -> dict[str, Any]:
    """The config.json dict for ``spec``; the caller writes the three /etc files."""
    res = spec.resources
    if res.vcpu < 1 or not 0 < res.cpu_fraction <= 1:
        raise ValueError(f"invalid cpu resources: vcpu={res.vcpu} cpu_fraction={res.cpu_fraction}")
    if res.memory_mib < 16:
        raise ValueError(f"memory_mib too small: {res.memory_mib}")
    if res.pids_limit < 8:
        raise ValueError(f"pids_limit too small: {res.pids_limit}")
    memory_bytes = res.memory_mib * 1024 * 1024
    quota = max(1000, int(CPU_PERIOD_US * res.vcpu * res.cpu_fraction))
    caps = list(DEFAULT_CAPABILITIES)
    nosuid_noexec_nodev = ["nosuid", "noexec", "nodev"]

    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": nosuid_noexec_nodev},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", f"size={DEV_SIZE_BYTES}"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": [*nosuid_noexec_nodev, "mode=1777", f"size={SHM_SIZE_BYTES}"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": nosuid_noexec_nodev},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": [*nosuid_noexec_nodev, "ro"]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": [*nosuid_noexec_nodev, "relatime", "ro"],
        },
        {
            "destination": GUEST_RUN_DIR,
            "type": "bind",
            "source": str(spec.agent_dir),
            "options": ["rbind", "rw", "nosuid", "nodev"],
        },
        {
            "destination": GUEST_CODE_DIR,
            "type": "bind",
            "source": str(spec.guest_code_dir),
            "options": ["rbind", "ro", "nosuid", "nodev"],
        },
        *(
            {"destination": target, "type": "bind", "source": str(source), "options": ["rbind", "ro", "nosuid", "nodev"]}
            for source, target in spec.extra_ro_mounts
        ),
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts_file), "options": ["bind", "rw"]},
        {"destination": "/etc/hostname", "type": "bind", "source": str(hostname_file), "options": ["bind", "rw"]},
        {
            "destination": "/etc/resolv.conf",
            "type": "bind",
            "source": str(resolv_conf_file),
            "options": ["bind", "rw"],
        },
    ]

    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(AGENT_ARGV),
            "env": list(ENV),
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": list(caps),
                "permitted": list(caps),
                "inheritable": [],
                "ambient": [],
            },
            "noNewPrivileges": True,
            "oomScoreAdj": SANDBOX_OOM_SCORE_ADJ,
        },
        "root": {"path": str(spec.state_dir / "rootfs"), "readonly": False},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "mount"},
                {"type": "uts"},
                {"type": "ipc"},
                {"type": "cgroup"},
                {"type": "network", "path": str(spec.netns_path)},
            ],
            "cgroupsPath": "/" + spec.vm_id,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": memory_bytes, "swap": memory_bytes},
                "cpu": {"quota": quota, "period": CPU_PERIOD_US},
                "pids": {"limit": res.pids_limit},
            },
            "seccomp": seccomp_profile(machine),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
