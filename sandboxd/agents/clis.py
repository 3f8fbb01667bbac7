"""The agent CLI layer: the claude and codex CLIs, npm-installed once per host and mounted
read-only into sandboxes that run them (at ``GUEST_CLI_DIR``).

Layout under ``cache_dir``::

    agent-clis/.lock                      flock: one installer at a time
    agent-clis/<digest>/                  a finished layer (never modified afterwards)
    agent-clis/<digest>/bin/claude        -> ../node_modules/@anthropic-ai/claude-code-<plat>/claude
    agent-clis/<digest>/bin/codex         -> ../node_modules/@openai/codex-<plat>/vendor/<triple>/bin/codex
    agent-clis/<digest>/layer.json        versions, size, install time (written last: "complete")
    agent-clis/.tmp-<digest>-<pid>/       an install in progress (renamed into place when done)

``<digest>`` is the SHA-256 of the pinned versions, the platform and ``LAYER_VERSION``.

Both npm packages are thin wrappers around native binaries shipped in per-platform optional
dependencies; the wrappers need node, the binaries do not. ``bin/`` therefore links straight to
the native binaries (relative symlinks, so the layer works wherever it is mounted) and a
sandbox rootfs needs no node. claude's binary is a glibc executable (fine on the Debian
templates); codex's is static (musl) and finds its helpers (``codex-path/rg``,
``codex-resources/``) next to its real path. npm runs with ``--ignore-scripts``: claude's
postinstall only copies the native binary over ``bin/claude.exe``, which we do not use.

The install is synchronous and takes ~10-20 s and ~800 MB: call it from a thread in async code.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from sandboxd.agents.base import GUEST_CLI_DIR, CliLayer

__all__ = ["CLAUDE_CODE_VERSION", "CODEX_VERSION", "PINNED", "CliInstallError", "install_layer", "layer_digest"]

CLAUDE_CODE_VERSION = "2.1.332"
CODEX_VERSION = "0.171.0"
PINNED = {"@anthropic-ai/claude-code": CLAUDE_CODE_VERSION, "@openai/codex": CODEX_VERSION}
LAYER_VERSION = "1"  # bump when the layout of a layer changes

# machine → (claude platform package suffix, codex platform package suffix, codex target triple)
_PLATFORMS = {
    "x86_64": ("linux-x64", "linux-x64", "x86_64-unknown-linux-musl"),
    "aarch64": ("linux-arm64", "linux-arm64", "aarch64-unknown-linux-musl"),
}


class CliInstallError(RuntimeError):
    pass


def _platform() -> tuple[str, str, str]:
    machine = platform.machine()
    if machine not in _PLATFORMS:
        raise CliInstallError(f"no agent CLI binaries for machine {machine!r}")
    return _PLATFORMS[machine]


def layer_digest() -> str:
    key = json.dumps({"pinned": PINNED, "machine": platform.machine(), "layout": LAYER_VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _bin_targets() -> dict[str, str]:
    claude_plat, codex_plat, triple = _platform()
    return {
        "claude": f"../node_modules/@anthropic-ai/claude-code-{claude_plat}/claude",
        "codex": f"../node_modules/@openai/codex-{codex_plat}/vendor/{triple}/bin/codex",
    }


def _complete(path: Path) -> bool:
    if not (path / "layer.json").is_file():
        return False
    return all((path / "bin" / name).resolve().is_file() for name in _bin_targets())


def _du(path: Path) -> int:
    total, seen = 0, set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def install_layer(cache_dir: Path, progress: Callable[[str], None] | None = None) -> CliLayer:
    """The layer of pinned agent CLIs under ``cache_dir``, installed first if missing."""
    say = progress or (lambda _line: None)
    root = Path(cache_dir) / "agent-clis"
    digest = layer_digest()
    final = root / digest
    layer = CliLayer(host_dir=final, bin_dir=f"{GUEST_CLI_DIR}/bin")
    if _complete(final):
        return layer
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lockf:
        try:
            fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("waiting for another installer of the agent CLIs")
            fcntl.flock(lockf, fcntl.LOCK_EX)
        if _complete(final):  # the other installer finished it
            return layer
        for stale in root.glob(f".tmp-{digest}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete leftover (e.g. a crash between rename and layer.json)
            shutil.rmtree(final, ignore_errors=True)
        tmp = root / f".tmp-{digest}-{os.getpid()}"
        tmp.mkdir()
        try:
            started = time.monotonic()
            specs = [f"{name}@{version}" for name, version in PINNED.items()]
            say(f"npm install {' '.join(specs)}")
            (tmp / "package.json").write_text(json.dumps({"name": "sandboxd-agent-clis", "private": True}) + "\n")
            proc = subprocess.run(
                ["npm", "install", "--prefix", str(tmp), "--no-fund", "--no-audit", "--ignore-scripts",
                 "--no-update-notifier", "--loglevel=error", *specs],
                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800, check=False,
                env={**os.environ, "npm_config_update_notifier": "false"},
            )
            if proc.returncode != 0:  # (no npm at all raises FileNotFoundError, below)
                raise CliInstallError(f"npm install failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
            (tmp / "bin").mkdir()
            versions = {}
            for name, target in _bin_targets().items():
                if not (tmp / "bin" / target).resolve().is_file():
                    raise CliInstallError(f"npm installed no native {name} binary at {target}")
                os.symlink(target, tmp / "bin" / name)
                check = subprocess.run([str(tmp / "bin" / name), "--version"], capture_output=True, text=True,
                                       stdin=subprocess.DEVNULL, timeout=60, check=False, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
                if check.returncode != 0:
                    raise CliInstallError(f"{name} --version failed: {check.stderr[-500:]}")
                versions[name] = check.stdout.strip()
            elapsed = time.monotonic() - started
            size = _du(tmp)
            (tmp / "layer.json").write_text(json.dumps({
                "pinned": PINNED, "versions": versions, "machine": platform.machine(),
                "install_seconds": round(elapsed, 1), "size_bytes": size}, indent=2) + "\n")
            for path in [tmp, *tmp.rglob("*")]:  # read-only for everyone but root, readable by all
                if not path.is_symlink():
                    mode = path.stat().st_mode
                    path.chmod((mode | 0o444 | (0o111 if mode & 0o111 or path.is_dir() else 0)) & ~0o022)
            os.rename(tmp, final)
            say(f"agent CLIs installed in {elapsed:.1f} s ({size / 2**20:.0f} MiB)")
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (OSError, subprocess.SubprocessError)):
                raise CliInstallError(f"installing the agent CLIs failed: {exc}") from exc
            raise
    return layer
