"""Template specifications: TOML files declaring what a sandbox's root filesystem holds.

A template file looks like::

    name = "standard"
    description = "Minimal Linux rootfs"
    base = "bookworm"                      # Debian suite
    packages = ["python3", "curl"]         # Debian packages (python3 is always added)
    pip_packages = []                      # optional, installed system-wide (adds python3-pip)
    npm_packages = []                      # optional, installed globally (adds nodejs, npm)
    build_commands = []                    # optional shell commands run in the rootfs at build time
    env = { }                              # optional environment for every command and service

    [resources]
    vcpu = 1
    cpu_fraction = 0.5
    memory_mib = 512
    pids_limit = 1024

    [[files]]                              # optional: copied into the rootfs at build time
    src = "files/fluxbox-overlay"          # relative to the TOML file (or `content = "..."`)
    dest = "/etc/X11/fluxbox/overlay"
    mode = "0644"

    [[services]]                           # optional: started by the guest agent at boot
    name = "chromium"
    command = "chromium --headless ..."
    user = "root"
    cwd = "/"
    env = { }
    restart = "on-failure"                 # "no" | "on-failure" | "always"
    [services.readiness]                   # how to know it is up (default: started = ready)
    tcp_port = 9222                        # or http_url = "http://127.0.0.1:9222/json/version"
    timeout_seconds = 10                   # or command = "xdpyinfo -display :99"

Unknown keys are errors (a typo must not silently build the wrong thing).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources as _ires
from pathlib import Path
from typing import Any

from sandboxd.runtime.base import Resources

__all__ = [
    "TemplateSpec", "TemplateSpecError", "FileSpec", "ServiceSpec", "Readiness",
    "load_builtin", "load_file", "loads", "list_builtin", "parse_spec", "DEFAULT_RESOURCES",
    "load_template", "list_templates",
]

DEFAULT_RESOURCES = Resources(vcpu=1, cpu_fraction=0.5, memory_mib=512, pids_limit=1024, disk_mib=2048)
REQUIRED_PACKAGES = ("python3",)  # the guest agent runs with the template's own python3

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")
_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_PIP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-\[\],<>=!~ ]*$")
_NPM_RE = re.compile(r"^(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*(@[A-Za-z0-9.^~<>=*|_ -]+)?$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SERVICE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class TemplateSpecError(ValueError):
    """A template file is invalid; the message names the file and the offending key."""


@dataclass(frozen=True)
class FileSpec:
    dest: str  # absolute path inside the rootfs
    mode: int = 0o644
    src: Path | None = None  # host file (resolved), or
    content: str | None = None  # inline content

    def data(self) -> bytes:
        if self.content is not None:
            return self.content.encode()
        assert self.src is not None
        return self.src.read_bytes()


@dataclass(frozen=True)
class Readiness:
    tcp_port: int | None = None
    http_url: str | None = None
    command: str | None = None
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    command: str
    user: str = "root"
    cwd: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    restart: str = "on-failure"
    readiness: Readiness | None = None


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    description: str = ""
    base: str = "bookworm"
    packages: tuple[str, ...] = ()
    pip_packages: tuple[str, ...] = ()
    npm_packages: tuple[str, ...] = ()
    build_commands: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    resources: Resources = DEFAULT_RESOURCES
    files: tuple[FileSpec, ...] = ()
    services: tuple[ServiceSpec, ...] = ()
    source: Path | None = field(default=None, compare=False)  # the TOML file, if any

    def all_packages(self) -> list[str]:
        """Debian packages to install: declared + required + what pip/npm need, sorted."""
        pkgs = set(self.packages) | set(REQUIRED_PACKAGES)
        if self.pip_packages:
            pkgs.add("python3-pip")
        if self.npm_packages:
            pkgs |= {"nodejs", "npm"}
        return sorted(pkgs)

    def canonical(self) -> dict[str, Any]:
        """A JSON-able, order-independent form (files by content hash, not host path)."""
        r = self.resources
        return {
            "name": self.name,
            "description": self.description,
            "base": self.base,
            "packages": self.all_packages(),
            "pip_packages": sorted(self.pip_packages),
            "npm_packages": sorted(self.npm_packages),
            "build_commands": list(self.build_commands),  # order matters
            "env": dict(sorted(self.env.items())),
            "resources": {"vcpu": r.vcpu, "cpu_fraction": r.cpu_fraction, "memory_mib": r.memory_mib,
                          "pids_limit": r.pids_limit},
            "files": [{"dest": f.dest, "mode": f.mode, "sha256": hashlib.sha256(f.data()).hexdigest()}
                      for f in self.files],
            "services": [_service_canonical(s) for s in self.services],
        }


def _service_canonical(s: ServiceSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"name": s.name, "command": s.command, "user": s.user, "cwd": s.cwd,
                         "env": dict(sorted(s.env.items())), "restart": s.restart, "readiness": None}
    if s.readiness is not None:
        rd = s.readiness
        d["readiness"] = {"tcp_port": rd.tcp_port, "http_url": rd.http_url, "command": rd.command,
                          "timeout_seconds": rd.timeout_seconds}
    return d


# --- parsing -----------------------------------------------------------------------------

class _Ctx:
    def __init__(self, where: str, base_dir: Path | None):
        self.where = where
        self.base_dir = base_dir

    def fail(self, key: str, msg: str) -> TemplateSpecError:
        return TemplateSpecError(f"{self.where}: {key} {msg}")

    def check_keys(self, table: dict, allowed: set[str], prefix: str = "") -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            names = ", ".join(prefix + k for k in unknown)
            raise TemplateSpecError(
                f"{self.where}: unknown key{'s' if len(unknown) > 1 else ''} {names} "
                f"(allowed: {', '.join(sorted(prefix + a for a in allowed))})"
            )

    def string(self, table: dict, key: str, path: str, *, default: str | None = None,
               pattern: re.Pattern | None = None, required: bool = False, nonempty: bool = False) -> str | None:
        if key not in table:
            if required:
                raise self.fail(path, "is required")
            return default
        v = table[key]
        if not isinstance(v, str):
            raise self.fail(path, f"must be a string, not {type(v).__name__}")
        if (nonempty or pattern) and not v:
            raise self.fail(path, "must not be empty")
        if pattern is not None and not pattern.match(v):
            raise self.fail(path, f"has an invalid value {v!r}")
        if "\0" in v:
            raise self.fail(path, "must not contain NUL")
        return v

    def str_list(self, table: dict, key: str, path: str, pattern: re.Pattern | None = None) -> tuple[str, ...]:
        v = table.get(key, [])
        if not isinstance(v, list):
            raise self.fail(path, "must be a list of strings")
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, str) or not item.strip():
                raise self.fail(f"{path}[{i}]", "must be a non-empty string")
            if pattern is not None and not pattern.match(item):
                raise self.fail(f"{path}[{i}]", f"has an invalid value {item!r}")
            out.append(item)
        if len(set(out)) != len(out) and pattern is not None:
            raise self.fail(path, "has duplicate entries")
        return tuple(out)

    def env(self, table: dict, key: str, path: str) -> dict[str, str]:
        v = table.get(key, {})
        if not isinstance(v, dict):
            raise self.fail(path, "must be a table of strings")
        for k, val in v.items():
            if not _ENV_RE.match(k):
                raise self.fail(f"{path}.{k}", "is not a valid environment variable name")
            if not isinstance(val, str) or "\0" in val:
                raise self.fail(f"{path}.{k}", "must be a string")
        return dict(v)

    def integer(self, table: dict, key: str, path: str, default: int, lo: int, hi: int) -> int:
        v = table.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(path, f"must be an integer, not {type(v).__name__}")
        if not lo <= v <= hi:
            raise self.fail(path, f"must be between {lo} and {hi}, got {v}")
        return v

    def number(self, table: dict, key: str, path: str, default: float, lo: float, hi: float,
               lo_open: bool = False) -> float:
        v = table.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(path, f"must be a number, not {type(v).__name__}")
        if not (lo < v if lo_open else lo <= v) or not v <= hi:
            raise self.fail(path, f"must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {v}")
        return float(v)


_TOP_KEYS = {"name", "description", "base", "packages", "pip_packages", "npm_packages", "build_commands",
             "env", "resources", "files", "services"}
_RES_KEYS = {"vcpu", "cpu_fraction", "memory_mib", "pids_limit", "disk_mib"}
_FILE_KEYS = {"src", "content", "dest", "mode"}
_SERVICE_KEYS = {"name", "command", "user", "cwd", "env", "restart", "readiness"}
_READY_KEYS = {"tcp_port", "http_url", "command", "timeout_seconds"}


def parse_spec(data: dict[str, Any], *, where: str = "<template>", base_dir: Path | None = None,
               source: Path | None = None) -> TemplateSpec:
    """Validate a parsed TOML document and build a TemplateSpec."""
    c = _Ctx(where, base_dir)
    if not isinstance(data, dict):
        raise TemplateSpecError(f"{where}: a template must be a table")
    c.check_keys(data, _TOP_KEYS)
    name = c.string(data, "name", "name", pattern=_NAME_RE, required=True)
    description = c.string(data, "description", "description", default="")
    base = c.string(data, "base", "base", default="bookworm", pattern=_SUITE_RE)

    res_t = data.get("resources", {})
    if not isinstance(res_t, dict):
        raise c.fail("resources", "must be a table")
    c.check_keys(res_t, _RES_KEYS, "resources.")
    d = DEFAULT_RESOURCES
    resources = Resources(
        vcpu=c.integer(res_t, "vcpu", "resources.vcpu", d.vcpu, 1, 64),
        cpu_fraction=c.number(res_t, "cpu_fraction", "resources.cpu_fraction", d.cpu_fraction, 0.0, 1.0,
                              lo_open=True),
        memory_mib=c.integer(res_t, "memory_mib", "resources.memory_mib", d.memory_mib, 64, 1024 * 1024),
        pids_limit=c.integer(res_t, "pids_limit", "resources.pids_limit", d.pids_limit, 16, 4_194_304),
        # the writable layer's size limit; not a build input, so not part of canonical()/the digest
        disk_mib=c.integer(res_t, "disk_mib", "resources.disk_mib", d.disk_mib, 64, 1024 * 1024),
    )

    files_t = data.get("files", [])
    if not isinstance(files_t, list):
        raise c.fail("files", "must be an array of tables ([[files]])")
    files = []
    dests = set()
    for i, f in enumerate(files_t):
        p = f"files[{i}]"
        if not isinstance(f, dict):
            raise c.fail(p, "must be a table")
        c.check_keys(f, _FILE_KEYS, p + ".")
        dest = c.string(f, "dest", p + ".dest", required=True, nonempty=True)
        if not dest.startswith("/") or ".." in dest.split("/") or dest.rstrip("/") == "":
            raise c.fail(p + ".dest", f"must be an absolute path inside the rootfs, got {dest!r}")
        if dest in dests:
            raise c.fail(p + ".dest", f"duplicates {dest!r}")
        dests.add(dest)
        mode_v = f.get("mode", "0644")
        if isinstance(mode_v, str) and re.fullmatch(r"0?[0-7]{3,4}", mode_v):
            mode = int(mode_v, 8)
        elif isinstance(mode_v, int) and not isinstance(mode_v, bool) and 0 <= mode_v <= 0o7777:
            mode = mode_v
        else:
            raise c.fail(p + ".mode", f"must be an octal string like \"0644\", got {mode_v!r}")
        has_src, has_content = "src" in f, "content" in f
        if has_src == has_content:
            raise c.fail(p, "needs exactly one of src or content")
        if has_content:
            files.append(FileSpec(dest=dest, mode=mode, content=c.string(f, "content", p + ".content")))
        else:
            src_s = c.string(f, "src", p + ".src", nonempty=True)
            src = Path(src_s)
            if not src.is_absolute():
                if base_dir is None:
                    raise c.fail(p + ".src", "is relative but the template has no directory")
                src = base_dir / src
            if not src.is_file():
                raise c.fail(p + ".src", f"file not found: {src}")
            files.append(FileSpec(dest=dest, mode=mode, src=src.resolve()))

    services_t = data.get("services", [])
    if not isinstance(services_t, list):
        raise c.fail("services", "must be an array of tables ([[services]])")
    services = []
    names = set()
    for i, s in enumerate(services_t):
        p = f"services[{i}]"
        if not isinstance(s, dict):
            raise c.fail(p, "must be a table")
        c.check_keys(s, _SERVICE_KEYS, p + ".")
        sname = c.string(s, "name", p + ".name", required=True, pattern=_SERVICE_RE)
        if sname in names:
            raise c.fail(p + ".name", f"duplicates {sname!r}")
        names.add(sname)
        restart = c.string(s, "restart", p + ".restart", default="on-failure")
        if restart not in ("no", "on-failure", "always"):
            raise c.fail(p + ".restart", f"must be \"no\", \"on-failure\" or \"always\", got {restart!r}")
        readiness = None
        if "readiness" in s:
            r = s["readiness"]
            rp = p + ".readiness"
            if not isinstance(r, dict):
                raise c.fail(rp, "must be a table")
            c.check_keys(r, _READY_KEYS, rp + ".")
            kinds = [k for k in ("tcp_port", "http_url", "command") if k in r]
            if len(kinds) != 1:
                raise c.fail(rp, "needs exactly one of tcp_port, http_url, command")
            readiness = Readiness(
                tcp_port=c.integer(r, "tcp_port", rp + ".tcp_port", 0, 1, 65535) if "tcp_port" in r else None,
                http_url=c.string(r, "http_url", rp + ".http_url", pattern=re.compile(r"^https?://\S+$")),
                command=c.string(r, "command", rp + ".command", nonempty=True),
                timeout_seconds=c.number(r, "timeout_seconds", rp + ".timeout_seconds", 30.0, 0.0, 3600.0,
                                         lo_open=True),
            )
        services.append(ServiceSpec(
            name=sname,
            command=c.string(s, "command", p + ".command", required=True, nonempty=True),
            user=c.string(s, "user", p + ".user", default="root", pattern=re.compile(r"^[a-z_][a-z0-9_-]*$")),
            cwd=c.string(s, "cwd", p + ".cwd", default="/", nonempty=True),
            env=c.env(s, "env", p + ".env"),
            restart=restart,
            readiness=readiness,
        ))

    return TemplateSpec(
        name=name,
        description=description,
        base=base,
        packages=c.str_list(data, "packages", "packages", _PKG_RE),
        pip_packages=c.str_list(data, "pip_packages", "pip_packages", _PIP_RE),
        npm_packages=c.str_list(data, "npm_packages", "npm_packages", _NPM_RE),
        build_commands=c.str_list(data, "build_commands", "build_commands"),
        env=c.env(data, "env", "env"),
        resources=resources,
        files=tuple(files),
        services=tuple(services),
        source=source,
    )


def loads(text: str, *, where: str = "<string>", base_dir: Path | None = None) -> TemplateSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TemplateSpecError(f"{where}: invalid TOML: {e}") from None
    return parse_spec(data, where=where, base_dir=base_dir)


def load_file(path: str | Path) -> TemplateSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateSpecError(f"{path}: cannot read: {e}") from None
    spec = loads(text, where=str(path), base_dir=path.resolve().parent)
    return replace(spec, source=path)


def _builtin_dir() -> Path:
    return Path(str(_ires.files("sandboxd.templates") / "builtin"))


def list_builtin() -> list[str]:
    """Names of the templates shipped with sandboxd."""
    return sorted(p.stem for p in _builtin_dir().glob("*.toml"))


def load_builtin(name: str) -> TemplateSpec:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TemplateSpecError(f"invalid template name {name!r}")
    path = _builtin_dir() / f"{name}.toml"
    if not path.is_file():
        raise TemplateSpecError(f"no builtin template {name!r} (have: {', '.join(list_builtin()) or 'none'})")
    spec = load_file(path)
    if spec.name != name:
        raise TemplateSpecError(f"{path}: name {spec.name!r} does not match the file name")
    return spec


def load_template(name: str, templates_dir: Path | str | None = None) -> TemplateSpec:
    """The operator's template ``templates_dir/NAME.toml`` if there is one (it may replace a
    builtin), else the builtin template ``name``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TemplateSpecError(f"invalid template name {name!r}")
    if templates_dir is not None:
        path = Path(templates_dir) / f"{name}.toml"
        if path.is_file():
            spec = load_file(path)
            if spec.name != name:
                raise TemplateSpecError(f"{path}: name {spec.name!r} does not match the file name")
            return spec
    return load_builtin(name)


def list_templates(templates_dir: Path | str | None = None) -> list[str]:
    """Builtin template names and the operator's (``templates_dir/*.toml``)."""
    names = set(list_builtin())
    if templates_dir is not None and Path(templates_dir).is_dir():
        names |= {p.stem for p in Path(templates_dir).glob("*.toml") if _NAME_RE.match(p.stem)}
    return sorted(names)


def service_boot(spec: TemplateSpec) -> list[dict[str, Any]]:
    """The template's services as the guest agent reads them from boot.json."""
    return [_service_canonical(s) for s in spec.services]


def canonical_json(spec: TemplateSpec) -> str:
    return json.dumps(spec.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
