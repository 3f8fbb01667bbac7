"""Builds template root filesystems with mmdebstrap and caches them by digest.

Layout under ``cache_dir``::

    templates/<name>/.lock                  flock: one build of a template at a time
    templates/<name>/<digest>/rootfs/       a finished build (never modified afterwards)
    templates/<name>/<digest>/image.json    its metadata (TemplateImage + canonical spec)
    templates/<name>/<digest>/build.log
    templates/<name>/current -> <digest>    the build in service (flipped atomically)
    templates/<name>/.tmp-<digest>-<pid>/   a build in progress (renamed into place when done)

Builds are synchronous and slow (tens of seconds): call them from a thread
(``asyncio.to_thread``) in async code.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sandboxd.guest.protocol import GUEST_CODE_DIR, GUEST_RUN_DIR, WORKSPACE_DIR
from sandboxd.runtime.base import Resources
from sandboxd.templates.spec import TemplateSpec, TemplateSpecError, canonical_json, parse_spec

__all__ = ["TemplateImage", "TemplateStore", "TemplateBuildError", "BUILDER_VERSION"]

BUILDER_VERSION = "2"  # bump when the build recipe changes in a way the hook text does not show

DEFAULT_MIRROR = "http://deb.debian.org/debian"
GUEST_MOUNT_POINTS = (GUEST_RUN_DIR, GUEST_CODE_DIR, WORKSPACE_DIR)
LOG_TAIL_LINES = 40

# Files the image must not ship: documentation and translations nobody reads in a sandbox.
DPKG_EXCLUDES = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
]

# Run by mmdebstrap as its customize hook with the rootfs as $1 (/dev, /proc, /sys mounted).
HOOK_HEAD = r"""#!/bin/sh
set -eu
R="$1"
FILES="$2"
in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive /bin/sh -c "$1"; }

echo "sandboxd: creating user 'user' (uid 1000)"
if ! chroot "$R" getent passwd user >/dev/null 2>&1; then
    if [ -x "$R/usr/sbin/useradd" ]; then
        chroot "$R" /usr/sbin/useradd --uid 1000 --user-group --create-home --home-dir /home/user \
            --shell /bin/bash user
    else
        echo 'user:x:1000:1000::/home/user:/bin/bash' >> "$R/etc/passwd"
        echo 'user:x:1000:' >> "$R/etc/group"
        echo 'user:*:19000:0:99999:7:::' >> "$R/etc/shadow"
        mkdir -p "$R/home/user" && chown 1000:1000 "$R/home/user" && chmod 0750 "$R/home/user"
    fi
fi

echo "sandboxd: creating /workspace and mount points"
mkdir -p "$R/workspace" "$R/opt/sandboxd/guest"  # /run/sandboxd: after mmdebstrap (tmpfs here)
chown 1000:1000 "$R/workspace"
chmod 0755 "$R/workspace"
echo sandbox > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
"""

HOOK_TAIL = r"""
echo "sandboxd: cleaning caches"
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/cache/apt/archives/*.deb \
    "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old "$R"/root/.cache "$R"/root/.npm \
    "$R"/tmp/* "$R"/var/tmp/* "$R"/var/log/apt/* "$R"/var/log/*.log
find "$R/usr/lib" -name __pycache__ -path '*/python3*/site-packages/*' -prune -exec rm -rf {} + 2>/dev/null || true

echo "sandboxd: checking the guest agent's interpreter"
in_root '/usr/bin/python3 -s -B -c "import json, select, signal, socket, subprocess, threading; print(\"python3 ok\")"'
"""


# pip and npm in the chroot trust the CAs the host trusts (a host may reach PyPI and npm only
# through a TLS-inspecting proxy whose CA the fresh rootfs lacks); the copy leaves with /tmp.
HOST_CA_STEP = r"""
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then cp /etc/ssl/certs/ca-certificates.crt "$R/tmp/sandboxd-host-ca.crt"; fi
"""
TRUST_HOST_CA = ("if [ -f /tmp/sandboxd-host-ca.crt ]; then export PIP_CERT=/tmp/sandboxd-host-ca.crt "
                 "NODE_EXTRA_CA_CERTS=/tmp/sandboxd-host-ca.crt; fi; ")


class TemplateBuildError(RuntimeError):
    """A build failed; the message ends with the tail of the build log."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message + (f"\n--- last lines of the build log ---\n{log_tail}" if log_tail else ""))
        self.log_tail = log_tail


@dataclass(frozen=True)
class TemplateImage:
    name: str
    digest: str
    rootfs: Path
    resources: Resources
    image_name: str  # "standard@1a2b3c4d5e6f"
    size_bytes: int
    built_at: str  # ISO 8601 UTC
    spec: TemplateSpec | None = None  # as built (services, env, ...)

    @property
    def path(self) -> Path:
        """The build's directory (rootfs/, image.json, build.log)."""
        return self.rootfs.parent


def _hook_script(spec: TemplateSpec) -> str:
    parts = [HOOK_HEAD]
    for i, f in enumerate(spec.files):
        parts.append(
            f"echo {shlex.quote('sandboxd: installing ' + f.dest)}\n"
            f"install -D -m {f.mode:04o} \"$FILES/{i}\" \"$R\"{shlex.quote(f.dest)}\n"
        )
    if spec.pip_packages or spec.npm_packages:
        parts.append(HOST_CA_STEP)
    if spec.pip_packages:
        pkgs = " ".join(shlex.quote(p) for p in sorted(spec.pip_packages))
        cmd = f"python3 -m pip install --no-cache-dir --break-system-packages --root-user-action=ignore {pkgs}"
        parts.append(f"echo 'sandboxd: pip install'\nin_root {shlex.quote(TRUST_HOST_CA + cmd)}\n")
    if spec.npm_packages:
        pkgs = " ".join(shlex.quote(p) for p in sorted(spec.npm_packages))
        cmd = "npm install -g --no-fund --no-audit " + pkgs
        parts.append(f"echo 'sandboxd: npm install'\nin_root {shlex.quote(TRUST_HOST_CA + cmd)}\n")
    for cmd in spec.build_commands:
        parts.append(f"echo {shlex.quote('sandboxd: running ' + cmd[:200])}\nin_root {shlex.quote(cmd)}\n")
    parts.append(HOOK_TAIL)
    return "".join(parts)


def spec_digest(spec: TemplateSpec) -> str:
    """sha256 over the canonical spec (files by content), the builder version and recipe."""
    h = hashlib.sha256()
    h.update(f"sandboxd-template-builder {BUILDER_VERSION}\n".encode())
    h.update(canonical_json(spec).encode())
    h.update(b"\n")
    h.update(_hook_script(spec).encode())
    h.update(json.dumps(DPKG_EXCLUDES).encode())
    return h.hexdigest()


def _tree_size(root: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_size
    return total


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp.startswith(prefix) or mp == prefix[:-1]:
                    out.append(mp)
    except OSError:
        pass
    return sorted(out, key=len, reverse=True)


def _safe_rmtree(path: Path) -> bool:
    """Remove a build directory, never descending into a mount left behind by a crashed build."""
    if not path.exists():
        return True
    for mp in _mounts_under(path):
        subprocess.run(["umount", "--lazy", mp], capture_output=True)
    if _mounts_under(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1e6)


class TemplateStore:
    def __init__(self, cache_dir: Path, mirror: str = DEFAULT_MIRROR):
        self.cache_dir = Path(cache_dir)
        self.mirror = mirror
        self.root = self.cache_dir / "templates"

    # -- lookups ---------------------------------------------------------------------
    def digest(self, spec: TemplateSpec) -> str:
        return spec_digest(spec)

    def _dir(self, name: str) -> Path:
        return self.root / name

    def _load(self, build_dir: Path) -> TemplateImage | None:
        try:
            meta = json.loads((build_dir / "image.json").read_text())
        except (OSError, ValueError):
            return None
        rootfs = build_dir / "rootfs"
        if not rootfs.is_dir():
            return None
        r = meta["resources"]
        spec = None
        if isinstance(meta.get("spec"), dict):
            try:
                spec = _spec_from_canonical(meta["spec"])
            except TemplateSpecError:
                spec = None
        return TemplateImage(
            name=meta["name"], digest=meta["digest"], rootfs=rootfs,
            resources=Resources(vcpu=r["vcpu"], cpu_fraction=r["cpu_fraction"], memory_mib=r["memory_mib"],
                                pids_limit=r["pids_limit"]),
            image_name=meta["image_name"], size_bytes=meta["size_bytes"], built_at=meta["built_at"], spec=spec,
        )

    def get(self, name: str) -> TemplateImage | None:
        """The build in service for this template name, if any."""
        cur = self._dir(name) / "current"
        try:
            target = os.readlink(cur)
        except OSError:
            return None
        return self._load(self._dir(name) / target)

    def lookup(self, spec: TemplateSpec) -> TemplateImage | None:
        """The cached build of exactly this spec, if any (does not build)."""
        return self._load(self._dir(spec.name) / self.digest(spec))

    def images(self, name: str) -> list[TemplateImage]:
        d = self._dir(name)
        if not d.is_dir():
            return []
        out = [img for p in sorted(d.iterdir()) if not p.name.startswith(".") and not p.is_symlink() and p.is_dir()
               if (img := self._load(p)) is not None]
        return sorted(out, key=lambda i: i.built_at)

    # -- building --------------------------------------------------------------------
    def build(self, spec: TemplateSpec, *, force: bool = False,
              progress: Callable[[str], None] | None = None) -> TemplateImage:
        """Return the build of ``spec``, building it first unless an identical one is cached.

        On failure the previous build stays in service and TemplateBuildError is raised.
        """
        say = progress or (lambda _line: None)
        digest = self.digest(spec)
        tdir = self._dir(spec.name)
        tdir.mkdir(parents=True, exist_ok=True)
        final = tdir / digest
        if not force:
            img = self._load(final)
            if img is not None:
                self._set_current(tdir, digest)
                return img
        with open(tdir / ".lock", "a+") as lockf:
            try:
                fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
                waited = False
            except BlockingIOError:
                say(f"sandboxd: waiting for another build of template {spec.name!r}")
                fcntl.flock(lockf, fcntl.LOCK_EX)
                waited = True
            if not force or waited:  # a build that finished while we waited is fresh: reuse it
                img = self._load(final)
                if img is not None:
                    self._set_current(tdir, digest)
                    return img
            for stale in tdir.glob(".tmp-*"):  # leftovers of crashed builds (we hold the lock)
                _safe_rmtree(stale)
            return self._build_locked(spec, digest, tdir, final, say)

    def _build_locked(self, spec: TemplateSpec, digest: str, tdir: Path, final: Path,
                      say: Callable[[str], None]) -> TemplateImage:
        if shutil.which("mmdebstrap") is None:
            raise TemplateBuildError("mmdebstrap is not installed (apt-get install mmdebstrap)")
        tmp = tdir / f".tmp-{digest[:16]}-{os.getpid()}"
        _safe_rmtree(tmp)
        tmp.mkdir()
        files_dir = tmp / "files"
        files_dir.mkdir()
        for i, f in enumerate(spec.files):
            (files_dir / str(i)).write_bytes(f.data())
        hook = tmp / "customize.sh"
        hook.write_text(_hook_script(spec))
        rootfs = tmp / "rootfs"
        log_path = tmp / "build.log"
        argv = [
            "mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
            "--include=" + ",".join(spec.all_packages()),
            "--aptopt=Acquire::Retries \"3\"",
            *[f"--dpkgopt={o}" for o in DPKG_EXCLUDES],
            f"--customize-hook=sh {shlex.quote(str(hook))} \"$1\" {shlex.quote(str(files_dir))}",
            spec.base, str(rootfs), self.mirror,
        ]
        say(f"sandboxd: building template {spec.name!r} ({digest[:12]}): {len(spec.all_packages())} packages")
        t0 = time.monotonic()
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        try:
            with open(log_path, "w") as log:
                log.write("$ " + shlex.join(argv) + "\n")
                log.flush()
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, cwd=str(tmp), text=True, errors="replace",
                                        env={**os.environ, "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"})
                assert proc.stdout is not None
                try:
                    for line in proc.stdout:
                        line = line.rstrip("\n")
                        log.write(line + "\n")
                        tail.append(line)
                        say(line)
                finally:
                    rc = proc.wait()
            if rc != 0:
                raise TemplateBuildError(f"building template {spec.name!r} failed: mmdebstrap exited with {rc}",
                                         "\n".join(tail))
            # Mount points under /run must be made after mmdebstrap: /run is a tmpfs during its hooks.
            for mp in GUEST_MOUNT_POINTS:
                (rootfs / mp.lstrip("/")).mkdir(mode=0o755, parents=True, exist_ok=True)
            if not (rootfs / "usr/bin/python3").exists():
                raise TemplateBuildError(f"building template {spec.name!r} failed: no /usr/bin/python3",
                                         "\n".join(tail))
            size = _tree_size(rootfs)
            image_name = f"{spec.name}@{digest[:12]}"
            meta = {
                "name": spec.name, "digest": digest, "image_name": image_name, "size_bytes": size,
                "built_at": _now_iso(), "build_seconds": round(time.monotonic() - t0, 1),
                "builder_version": BUILDER_VERSION, "base": spec.base, "mirror": self.mirror,
                "resources": spec.canonical()["resources"], "spec": spec.canonical(),
            }
            (tmp / "image.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            for leftover in (hook, files_dir):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
            if final.exists():  # forced rebuild: keep the old tree (a sandbox may still use it)
                final.rename(tdir / f".old-{digest[:16]}-{int(time.time())}")
            os.rename(tmp, final)
        except BaseException:
            if tmp.exists():
                # keep the log next to the previous builds for post-mortems
                try:
                    shutil.copyfile(log_path, tdir / "last-failed-build.log")
                except OSError:
                    pass
                _safe_rmtree(tmp)
            raise
        self._set_current(tdir, digest)
        img = self._load(final)
        assert img is not None
        say(f"sandboxd: built {img.image_name} in {time.monotonic() - t0:.1f}s, {size / 1e6:.0f} MB")
        return img

    @staticmethod
    def _set_current(tdir: Path, digest: str) -> None:
        cur = tdir / "current"
        try:
            if os.readlink(cur) == digest:
                return
        except OSError:
            pass
        tmp_link = tdir / f".current-{os.getpid()}"
        try:
            tmp_link.unlink()
        except FileNotFoundError:
            pass
        os.symlink(digest, tmp_link)
        os.replace(tmp_link, cur)

    # -- cleanup ---------------------------------------------------------------------
    def gc(self, keep_digests: set[str] | frozenset[str] = frozenset()) -> list[Path]:
        """Delete builds that are neither current nor in ``keep_digests``.

        The caller must pass the digest of every image a sandbox (running, paused or
        snapshotted) still uses; superseded trees of forced rebuilds (``.old-*``) are
        deleted only when their digest is not kept either.
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for tdir in self.root.iterdir():
            if not tdir.is_dir():
                continue
            with open(tdir / ".lock", "a+") as lockf:
                try:
                    fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a build is running: leave this template alone
                try:
                    current = os.readlink(tdir / "current")
                except OSError:
                    current = None
                for p in tdir.iterdir():
                    if not p.is_dir() or p.is_symlink():
                        continue
                    if p.name.startswith(".old-"):
                        digest_prefix = p.name.split("-")[1]
                        if any(k.startswith(digest_prefix) for k in keep_digests):
                            continue
                    elif p.name.startswith("."):
                        continue
                    elif p.name == current or p.name in keep_digests:
                        continue
                    if _safe_rmtree(p):
                        removed.append(p)
        return removed


def _spec_from_canonical(c: dict) -> TemplateSpec:
    """Rebuild a TemplateSpec from image.json (files are already in the rootfs: dropped)."""
    data = {k: v for k, v in c.items() if k not in ("files",)}
    for s in data.get("services", []):
        for k in [k for k, v in s.items() if v is None]:
            del s[k]
        rd = s.get("readiness")
        if isinstance(rd, dict):
            for k in [k for k, v in rd.items() if v is None]:
                del rd[k]
    return parse_spec(data, where="image.json")

