"""One typed configuration object, validated once at start and passed down.

Every value can come from a CLI flag or a SANDBOXD_* environment variable; the CLI
builds a Settings and hands it to the control plane and the worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = Path("/var/lib/sandboxd")
DEFAULT_CACHE_DIR = Path("/var/cache/sandboxd")
DEFAULT_LISTEN = "127.0.0.1:8080"
RUNTIMES = ("oci", "gvisor", "microvm")  # isolation backends a worker may offer (README: Runtimes)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError(f"listen address must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True)
class Settings:
    data_dir: Path = DEFAULT_DATA_DIR
    cache_dir: Path = DEFAULT_CACHE_DIR  # template builds, shared by every data dir on the host
    templates_dir: Path | None = None  # the operator's template files (NAME.toml), besides the builtin ones
    listen: str = DEFAULT_LISTEN
    database_url: str | None = None  # default: SQLite under data_dir
    local_worker: bool = True
    oci_runtime: str = "crun"  # crun | runc: the binary behind the `oci` runtime
    runtime: str = "oci"  # the local worker's default runtime: oci | gvisor | microvm (RUNTIMES)
    advertise_address: str | None = None  # host in `endpoint`; default: the listen host
    # Placement: a worker may promise this many times its real CPUs; memory is never overcommitted
    # beyond memory_overcommit (1.0 = none).
    cpu_overcommit: float = 8.0
    memory_overcommit: float = 1.0
    worker_vcpus: float | None = None  # default: os.cpu_count()
    worker_memory_mib: int | None = None  # default: 90% of MemTotal
    subnet: str = "10.200.0.0/16"
    host_port_base: int = 30000
    reaper_interval_seconds: float = 1.0
    # Many hosts (README: Many hosts): a worker heartbeats every heartbeat_interval_seconds; one
    # silent for worker_down_after_seconds is down (its sandboxes read `unknown`), and after
    # worker_lost_after_seconds its sandboxes are destroyed with reason `lost`. A `creating`
    # record older than create_timeout_seconds was abandoned by a control plane that died.
    heartbeat_interval_seconds: float = 2.0
    worker_down_after_seconds: float = 10.0
    worker_lost_after_seconds: float = 600.0
    create_timeout_seconds: float = 300.0
    destroyed_retention_hours: float = 24.0
    mirror: str = "http://deb.debian.org/debian"
    # Agents: the LLM endpoints they call (None: the provider's public URL). A create
    # request's llm_base_url wins over these.
    anthropic_base_url: str | None = None
    openai_base_url: str | None = None
    agent_cancel_grace_seconds: float = 10.0  # SIGINT, then this long, then SIGTERM/SIGKILL
    # OmniParser weights on this host (README: cua), mounted read-only at /opt/omniparser in
    # desktop sandboxes; never downloaded.
    omniparser_dir: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "sandboxd.db"

    @property
    def effective_database_url(self) -> str:
        url = self.database_url or f"sqlite+aiosqlite:///{self.sqlite_path}"
        for plain in ("postgresql://", "postgres://"):  # the async driver behind a plain PostgreSQL URL
            if url.startswith(plain):
                return "postgresql+asyncpg://" + url[len(plain):]
        return url

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Defaults, then SANDBOXD_* environment variables, then explicit overrides (CLI flags)."""
        env = os.environ
        values: dict = {}
        if "SANDBOXD_DATA_DIR" in env:
            values["data_dir"] = Path(env["SANDBOXD_DATA_DIR"])
        if "SANDBOXD_CACHE_DIR" in env:
            values["cache_dir"] = Path(env["SANDBOXD_CACHE_DIR"])
        if env.get("SANDBOXD_TEMPLATES_DIR"):
            values["templates_dir"] = Path(env["SANDBOXD_TEMPLATES_DIR"])
        if "SANDBOXD_LISTEN" in env:
            values["listen"] = env["SANDBOXD_LISTEN"]
        if "SANDBOXD_DATABASE_URL" in env:
            values["database_url"] = env["SANDBOXD_DATABASE_URL"]
        if "SANDBOXD_OCI_RUNTIME" in env:
            values["oci_runtime"] = env["SANDBOXD_OCI_RUNTIME"]
        if "SANDBOXD_RUNTIME" in env:
            values["runtime"] = env["SANDBOXD_RUNTIME"]
        if "SANDBOXD_MIRROR" in env:
            values["mirror"] = env["SANDBOXD_MIRROR"]
        if "SANDBOXD_ANTHROPIC_BASE_URL" in env:
            values["anthropic_base_url"] = env["SANDBOXD_ANTHROPIC_BASE_URL"] or None
        if "SANDBOXD_OPENAI_BASE_URL" in env:
            values["openai_base_url"] = env["SANDBOXD_OPENAI_BASE_URL"] or None
        if env.get("SANDBOXD_OMNIPARSER_DIR"):
            values["omniparser_dir"] = Path(env["SANDBOXD_OMNIPARSER_DIR"])
        if "SANDBOXD_AGENT_CANCEL_GRACE_SECONDS" in env:
            values["agent_cancel_grace_seconds"] = float(env["SANDBOXD_AGENT_CANCEL_GRACE_SECONDS"])
        for name in ("heartbeat_interval_seconds", "worker_down_after_seconds", "worker_lost_after_seconds",
                     "create_timeout_seconds"):
            if f"SANDBOXD_{name.upper()}" in env:
                values[name] = float(env[f"SANDBOXD_{name.upper()}"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("runtime") in ("crun", "runc"):  # `--runtime crun|runc`: oci with that binary
            values["oci_runtime"] = values.pop("runtime")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        parse_listen(self.listen)
        if self.oci_runtime not in ("crun", "runc"):
            raise ValueError(f"oci_runtime must be crun or runc, got {self.oci_runtime!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of oci, gvisor, microvm, crun, runc; got {self.runtime!r}")
        if self.cpu_overcommit <= 0 or self.memory_overcommit <= 0:
            raise ValueError("overcommit ratios must be positive")
        for name in ("anthropic_base_url", "openai_base_url"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http:// or https:// URL, got {url!r}")
        if not 0 < self.heartbeat_interval_seconds < self.worker_down_after_seconds <= self.worker_lost_after_seconds:
            raise ValueError("need 0 < heartbeat interval < worker down grace <= worker lost grace")
        if self.omniparser_dir is not None and not self.omniparser_dir.is_dir():
            raise ValueError(f"SANDBOXD_OMNIPARSER_DIR: {self.omniparser_dir} is not a directory")
        if self.agent_cancel_grace_seconds < 0:
            raise ValueError("agent_cancel_grace_seconds must not be negative")
