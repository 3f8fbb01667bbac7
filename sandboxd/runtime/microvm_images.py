"""The files a microVM boots from, built once and cached by content under CACHE/microvm/.

    microvm/initrd-<key>.img       busybox-static + the kernel's virtio/overlay modules + INIT_SCRIPT;
                                   key: kernel package version, busybox, script, module list
    microvm/rootfs-<name>-<digest>.ext4   a template's rootfs (mke2fs -d), read-only in every VM
    microvm/code-<hash>.ext4       read-only trees: the guest agent's code, sandboxd/agents, ...
    microvm/snapshots/<key>/       saved VM states (runtime/microvm.py)

The kernel is Debian's cloud kernel (``linux-image-cloud-amd64``) as installed in /boot:
its virtio-mmio, virtio-blk/net/console and overlayfs drivers are modules, so the
initramfs carries them and loads them before it mounts anything.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static (a static binary: the initramfs has no libc)
MKFS_EXT4 = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
# In load order (each after what it depends on, per modules.dep of Debian 12's cloud kernel).
MODULES = (
    "drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_mmio",
    "drivers/block/virtio_blk", "net/core/failover", "drivers/net/net_failover", "drivers/net/virtio_net",
    "drivers/char/virtio_console", "fs/overlayfs/overlay",
)  # fmt: skip
VM_IP, VM_GATEWAY = "169.254.0.21", "169.254.0.22"  # every VM's own /30 on its tap (see microvm.py)
GUEST_AGENT_PORT = 49983
PROBE_MARKER = "SANDBOXD-PROBE-OK"

# PID 1 of the initramfs. Kernel arguments it reads: sandboxd.dns=IP,IP  sandboxd.pids=N
# sandboxd.probe=1 (print PROBE_MARKER and power off: the accelerator probe).
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed"; done
cmdline="$(cat /proc/cmdline)"
arg() { for w in $cmdline; do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
if [ -n "$(arg sandboxd.probe)" ]; then echo "@PROBE_MARKER@"; poweroff -f; fi
fail() { echo "init: $*"; sleep 1; poweroff -f; }
disk() {  # the /dev node of the virtio disk whose serial is $1
  for _ in $(seq 200); do
    for d in /sys/block/vd*; do [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${d##*/}"; return; }; done
    usleep 10000
  done
}
mkdir -p /lower /layer /newroot
mount -t ext4 -o ro "$(disk sbdroot)" /lower || fail "no root disk"
mount -t ext4 -o noatime,discard "$(disk sbdupper)" /layer || fail "no writable layer"
mkdir -p /layer/upper /layer/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/layer/upper,workdir=/layer/work /newroot || fail "overlay"
# each tree of the code image bound where /code/mounts says (tree number, path inside)
mkdir -p /code
mount -t ext4 -o ro,nodev "$(disk sbdcode)" /code || fail "no guest code"
while read -r tree target; do
  mkdir -p "/newroot$target"
  mount --bind "/code/$tree" "/newroot$target"
done < /code/mounts
ip link set lo up
ip link set eth0 up
ip addr add @VM_IP@/30 dev eth0
ip route add default via @VM_GATEWAY@
rm -f /newroot/etc/resolv.conf
for ns in $(arg sandboxd.dns | tr , ' '); do echo "nameserver $ns"; done > /newroot/etc/resolv.conf
echo "options timeout:2 attempts:2" >> /newroot/etc/resolv.conf
for d in proc sys dev run tmp; do mkdir -p "/newroot/$d"; done
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /newroot/dev/pts
ln -sf pts/ptmx /newroot/dev/ptmx
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /newroot/dev/shm
mount -t tmpfs -o nosuid,nodev,mode=755 run /newroot/run
mkdir -p /newroot/run/sandboxd
# the sandbox's pids limit: the agent and all it starts live in one cgroup
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /newroot/sys/fs/cgroup
echo +pids > /newroot/sys/fs/cgroup/cgroup.subtree_control
mkdir /newroot/sys/fs/cgroup/sandbox
echo "$(arg sandboxd.pids)" > /newroot/sys/fs/cgroup/sandbox/pids.max
echo $$ > /newroot/sys/fs/cgroup/sandbox/cgroup.procs
port=""
for p in /newroot/sys/class/virtio-ports/*; do [ "$(cat "$p/name")" = sandboxd.boot ] && port="/dev/${p##*/}"; done
[ -n "$port" ] || fail "no boot port"
exec switch_root /newroot /usr/bin/python3 -s -B /opt/sandboxd/guest/agent.py \
  --listen 0.0.0.0:@AGENT_PORT@ --boot-port "$port"
"""


class ImageError(Exception):
    """A microVM artefact could not be built; the message carries the tool's output."""


@dataclass(frozen=True)
class Kernel:
    release: str  # e.g. 6.1.0-56-cloud-amd64
    package_version: str  # the Debian package's version (part of every cache key)
    vmlinuz: Path
    modules_dir: Path


def find_kernel(boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> Kernel | None:
    """The newest installed Debian cloud kernel with its modules, or None."""
    found = []
    for vmlinuz in boot.glob("vmlinuz-*-cloud-amd64"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        if (modules_root / release / "modules.dep").exists():
            found.append((vmlinuz.stat().st_mtime, release, vmlinuz))
    if not found:
        return None
    _, release, vmlinuz = max(found)
    return Kernel(release, _package_version(f"linux-image-{release}", vmlinuz), vmlinuz, modules_root / release)


def _package_version(package: str, fallback: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True,
                             timeout=10)  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    st = fallback.stat()
    return f"{st.st_size}-{int(st.st_mtime)}"


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _init_script() -> str:
    return (
        INIT_SCRIPT.replace("@PROBE_MARKER@", PROBE_MARKER)
        .replace("@VM_IP@", VM_IP)
        .replace("@VM_GATEWAY@", VM_GATEWAY)
        .replace("@AGENT_PORT@", str(GUEST_AGENT_PORT))
    )


def initramfs(cache: Path, kernel: Kernel) -> Path:
    """The cached initramfs for kernel (built when missing)."""
    if not BUSYBOX.exists():
        raise ImageError(f"{BUSYBOX} is missing: install busybox-static")
    script = _init_script()
    key = hashlib.sha256(
        json.dumps([kernel.release, kernel.package_version, _digest_file(BUSYBOX), script, MODULES]).encode()
    ).hexdigest()[:24]
    target = cache / f"initrd-{key}.img"
    if target.exists():
        return target
    names = [m.rsplit("/", 1)[1] for m in MODULES]
    files: list[tuple[str, int, bytes]] = [
        ("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
        ("init", 0o100755, script.encode()),
        ("modules", 0o100644, ("\n".join(names) + "\n").encode()),
    ]
    for module, name in zip(MODULES, names):
        ko = kernel.modules_dir / "kernel" / f"{module}.ko"
        if not ko.exists():
            raise ImageError(f"kernel module {ko} is missing")
        files.append((f"lib/modules/{name}.ko", 0o100644, ko.read_bytes()))
    dirs = ["bin", "dev", "lib", "lib/modules", "proc", "sys"]
    _write_atomic(target, gzip.compress(_cpio_newc(dirs, files), compresslevel=1, mtime=0))
    return target


def _cpio_newc(dirs: list[str], files: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed cpio archive ("newc"), what the kernel unpacks as its initramfs."""
    out = io.BytesIO()
    entries = [(d, 0o040755, b"") for d in dirs] + files + [("TRAILER!!!", 0, b"")]
    for ino, (name, mode, data) in enumerate(entries, start=1):
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        )
        out.write(header.encode() + encoded)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


def rootfs_image(cache: Path, rootfs: Path) -> Path:
    """The template rootfs as a read-only ext4 image (built when missing, ~seconds per 100 MB).

    Building one deletes the images of the template's older builds (VMs still running from
    one keep it open; a saved VM state of an old build is never used again)."""
    digest = _template_digest(rootfs)
    name = rootfs.parent.parent.name  # templates/<name>/<digest>/rootfs
    target = cache / f"rootfs-{name}-{digest[:24]}.ext4"
    if not target.exists():
        size, inodes = _tree_usage(rootfs)
        _mkfs_from_dir(rootfs, target, size_bytes=int(size * 1.25) + (64 << 20), inodes=inodes + 4096,
                       label="sbdroot")  # fmt: skip
        for old in cache.glob(f"rootfs-{name}-*.ext4"):
            if old != target:
                old.unlink(missing_ok=True)
    return target


def _template_digest(rootfs: Path) -> str:
    """The template build's digest (templates/<name>/<digest>/image.json), else the path's."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads((rootfs.parent / "image.json").read_text())["digest"]
    st = rootfs.stat()
    return hashlib.sha256(f"{rootfs.resolve()}:{st.st_mtime_ns}".encode()).hexdigest()


def code_image(cache: Path, trees: list[tuple[Path, str]]) -> Path:
    """One ext4 image holding the read-only trees a sandbox gets, each (host dir, absolute
    path inside), e.g. the guest agent's code at /opt/sandboxd/guest: tree N at /N, and
    /mounts listing "N path" for the initramfs to bind them."""
    for _, inside in trees:
        if not inside.startswith("/") or any(c.isspace() for c in inside) or "/../" in f"{inside}/":
            raise ImageError(f"cannot mount a tree at {inside!r}")
    target = cache / f"code-{_trees_digest(tuple(trees))[:24]}.ext4"
    if target.exists():
        return target
    staging = cache / f".code-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for number, (src, _) in enumerate(trees):
            shutil.copytree(src, staging / str(number), symlinks=True)
        (staging / "mounts").write_text("".join(f"{n} {inside}\n" for n, (_, inside) in enumerate(trees)))
        size, inodes = _tree_usage(staging)
        _mkfs_from_dir(staging, target, size_bytes=size * 2 + (16 << 20), inodes=inodes + 1024, label="sbdcode")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=16)
def _trees_digest(trees: tuple[tuple[Path, str], ...]) -> str:
    """Content digest of the trees; once per worker process (the installed code and the agent
    CLI layers do not change under a running worker, and the CLI layer is large)."""
    h = hashlib.sha256()
    for src, name in trees:
        h.update(f"tree {name}\0".encode())
        for path in sorted(_walk(src)):
            rel = path.relative_to(src)
            st = path.lstat()
            h.update(f"{rel}\0{stat.S_IMODE(st.st_mode)}\0".encode())
            h.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return h.hexdigest()


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath) / name


def _tree_usage(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inode count) of a directory tree."""
    size, inodes = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            inodes += 1
            with contextlib.suppress(OSError):
                size += (os.lstat(os.path.join(dirpath, name)).st_size + 4095) // 4096 * 4096
    return size, inodes


def _mkfs_from_dir(src: Path, target: Path, *, size_bytes: int, inodes: int, label: str) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.truncate(size_bytes)
        out = subprocess.run(
            [MKFS_EXT4, "-q", "-F", "-L", label, "-m", "0", "-O", "^has_journal", "-N", str(inodes),
             "-E", "root_owner=0:0", "-d", str(src), str(tmp)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if out.returncode != 0:
            raise ImageError(f"mkfs.ext4 -d {src} failed: {(out.stderr or out.stdout)[-500:]}")
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
