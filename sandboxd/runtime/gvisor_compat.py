"""A preloaded shim for a gap of Debian's 2022 runsc with bookworm's coreutils.

That Sentry answers EINVAL to ``statx`` with ``AT_NO_AUTOMOUNT`` (0x800), which coreutils
9.1 always passes, so ``ls``, ``stat``, ``cp -a`` and friends failed inside gVisor. The flag
only matters for automount points, which a sandbox has none of; the shim drops it and calls
the real system call. It is compiled once per host boot (keyed by its source) and loaded into
every gVisor sandbox's processes through a read-only /etc/ld.so.preload, so nothing in the
sandbox's environment changes. Without a C compiler the shim is skipped and the gap stays.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GUEST_DIR = "/opt/sandboxd/gvisor-compat"  # where the shim's directory is mounted inside
SHIM_NAME = "statx-compat.so"
PRELOAD_NAME = "ld.so.preload"

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf) {
    return syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}
"""


def build_shim(root: Path) -> Path | None:
    """The directory holding the compiled shim and its ld.so.preload; None without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: gVisor sandboxes keep runsc's statx gap (coreutils ls/stat fail)")
        return None
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:16]
    target = root / digest
    if (target / SHIM_NAME).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        (build / "statx-compat.c").write_text(SHIM_SOURCE)
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(build / SHIM_NAME), str(build / "statx-compat.c")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        (build / "statx-compat.c").unlink()
        (build / PRELOAD_NAME).write_text(f"{GUEST_DIR}/{SHIM_NAME}\n")
        os.chmod(build, 0o755)
        os.rename(build, target)  # atomic: a concurrent worker's finished copy wins just as well
    except OSError:
        if not (target / SHIM_NAME).exists():
            raise
    except subprocess.CalledProcessError as exc:
        log.warning("compiling the gVisor statx shim failed: %s", exc.stderr.decode(errors="replace")[-500:])
        return None
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


def shim_mounts(shim_dir: Path) -> list[dict]:
    """OCI mounts that load the shim into every process of the sandbox."""
    options = ["rbind", "ro", "nosuid", "nodev"]
    return [
        {"destination": GUEST_DIR, "type": "bind", "source": str(shim_dir), "options": options},
        {"destination": "/etc/ld.so.preload", "type": "bind", "source": str(shim_dir / PRELOAD_NAME),
         "options": options},
    ]  # fmt: skip
