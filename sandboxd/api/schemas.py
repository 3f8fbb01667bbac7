"""Request and response shapes of the public API, with the input rules they enforce.

Requests are strict (no type coercion, no unknown fields) so that a typo such as
`idle_timeout` is a 400 naming the field instead of a silently ignored option.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_LIFETIME_CAP_SECONDS = 7200
DEFAULT_IDLE_TIMEOUT_SECONDS = 60
MAX_METADATA_BYTES = 16 * 1024
MAX_ENV_VARS = 128
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_ENV_TOTAL_BYTES = 128 * 1024
MAX_TASK_BYTES = 64 * 1024
MAX_LLM_BASE_URL_CHARS = 2048
MAX_COMMAND_BYTES = 256 * 1024
DEFAULT_EXEC_TIMEOUT_SECONDS = 60
MAX_EXEC_TIMEOUT_SECONDS = 3600

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
# Variables the platform sets itself (or will set for agents), and ones that change how
# the loader or libc behave. Any key starting with a reserved prefix is refused too.
RESERVED_ENV_KEYS = frozenset(
    {
        "HOSTNAME", "HOME", "USER", "LOGNAME", "PWD", "SHLVL", "IS_SANDBOX",
        "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN",
        "OPENAI_API_KEY", "OPENAI_BASE_URL", "CLAUDE_CODE_MAX_RETRIES",
        "GLIBC_TUNABLES", "GCONV_PATH", "LOCPATH", "HOSTALIASES", "MALLOC_CHECK_",
    }
)  # fmt: skip
RESERVED_ENV_PREFIXES = ("SANDBOXD_", "LD_")
RESERVED_METADATA_KEYS = frozenset({"user_id"})


def _error(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, message)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateSandboxRequest(StrictModel):
    template: str = Field(min_length=1, max_length=64)
    agent: str | None = Field(default=None, min_length=1, max_length=64)
    llm_key: str | None = Field(default=None, min_length=1, max_length=4096, repr=False)  # never logged
    task: str | None = Field(default=None, max_length=MAX_TASK_BYTES)
    model: str | None = Field(default=None, min_length=1, max_length=128)
    runtime: str | None = Field(
        default=None, min_length=1, max_length=32,
        description="isolation runtime: oci (crun/runc) or gvisor; default: the worker's default",
    )
    llm_base_url: str | None = Field(
        default=None, min_length=1, max_length=MAX_LLM_BASE_URL_CHARS,
        description="http(s) endpoint of the LLM provider (a gateway or proxy); default: the operator's "
        "setting, else the provider's public URL",
    )
    idle_timeout_seconds: int = Field(default=DEFAULT_IDLE_TIMEOUT_SECONDS, gt=0, le=MAX_LIFETIME_CAP_SECONDS)
    max_lifetime_seconds: int = Field(default=MAX_LIFETIME_CAP_SECONDS, gt=0, le=MAX_LIFETIME_CAP_SECONDS)
    env_vars: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("env_vars")
    @classmethod
    def _check_env_vars(cls, env: dict[str, str]) -> dict[str, str]:
        if len(env) > MAX_ENV_VARS:
            raise _error("too_many_env_vars", f"at most {MAX_ENV_VARS} variables")
        total = 0
        for key, value in env.items():
            if not ENV_KEY_RE.match(key):
                raise _error("invalid_env_var", f"{key!r} is not a valid variable name")
            if key in RESERVED_ENV_KEYS or key.startswith(RESERVED_ENV_PREFIXES):
                raise _error("reserved_env_var", f"{key} is reserved by the platform")
            if "\0" in value:
                raise _error("invalid_env_var", f"{key} contains a NUL byte")
            size = len(value.encode())
            if size > MAX_ENV_VALUE_BYTES:
                raise _error("env_var_too_large", f"{key} is over {MAX_ENV_VALUE_BYTES} bytes")
            total += size + len(key)
        if total > MAX_ENV_TOTAL_BYTES:
            raise _error("env_vars_too_large", f"over {MAX_ENV_TOTAL_BYTES} bytes in all")
        return env

    @field_validator("task")
    @classmethod
    def _check_task(cls, task: str | None) -> str | None:
        if task is not None:
            if len(task.encode("utf-8", "surrogatepass")) > MAX_TASK_BYTES:
                raise _error("task_too_large", f"over {MAX_TASK_BYTES} bytes (UTF-8)")
            if "\0" in task:
                raise _error("invalid_value", "contains a NUL character")
            if not task.strip():
                raise _error("invalid_value", "must not be empty")
        return task

    @field_validator("llm_base_url")
    @classmethod
    def _check_llm_base_url(cls, url: str | None) -> str | None:
        if url is None:
            return url
        from urllib.parse import urlsplit

        # the message never repeats the URL: it may carry credentials
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError:
            raise _error("invalid_url", "not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _error("invalid_url", "must be an http:// or https:// URL with a host")
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
            raise _error("invalid_url", "must not contain whitespace or control characters")
        return url

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        reserved = RESERVED_METADATA_KEYS & metadata.keys()
        if reserved:
            raise _error("reserved_metadata_key", f"{sorted(reserved)[0]} is set by the platform")
        if len(json.dumps(metadata, separators=(",", ":"))) > MAX_METADATA_BYTES:
            raise _error("metadata_too_large", f"over {MAX_METADATA_BYTES} bytes as JSON")
        return metadata


class ExecRequest(StrictModel):
    command: str = Field(min_length=1, max_length=MAX_COMMAND_BYTES)
    timeout_seconds: float = Field(default=DEFAULT_EXEC_TIMEOUT_SECONDS, gt=0, le=MAX_EXEC_TIMEOUT_SECONDS)
    cwd: str | None = Field(default=None, min_length=1, max_length=4096)
    env: dict[str, str] = Field(default_factory=dict)
    stdin: str | None = Field(
        default=None, max_length=MAX_COMMAND_BYTES * 4, description="written to the command's stdin, then closed"
    )
    user: str | None = Field(
        default=None, min_length=1, max_length=32, pattern=r"^[a-z_][a-z0-9_-]*[$]?$",
        description="run as this sandbox user (e.g. `user`, uid 1000, HOME=/home/user); default root",
    )
    background: bool = Field(
        default=False,
        description="answer 202 with the process at once; no timeout unless timeout_seconds is given",
    )

    # strict mode refuses an int where a float is declared; JSON clients send 5, not 5.0
    @field_validator("timeout_seconds", mode="before")
    @classmethod
    def _int_is_a_number(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        return CreateSandboxRequest._check_env_vars(env)


# --- responses (documented in the OpenAPI schema) -------------------------------------


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class CreateSandboxResponse(BaseModel):
    vm_id: str
    state: str
    host_port: int | None
    endpoint: str | None


class SandboxSummary(BaseModel):
    vm_id: str
    state: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    runtime: str | None = None  # oci | gvisor
    metadata: dict[str, Any]


class SandboxDetail(SandboxSummary):
    template: str
    runtime: str
    rootfs: str | None
    host_port: int | None
    endpoint: str | None
    created_at: str
    idle_timeout_seconds: int
    max_lifetime_seconds: int
    expires_at: str
    agent: str | None = None
    agent_status: Literal["running", "completed", "failed"] | None = None
    agent_exit_code: int | None = None
    destroyed_at: str | None = None
    reason: str | None = None


class PartialList(BaseModel):
    sandboxes: list[SandboxSummary]
    partial: bool


class ExecResponse(BaseModel):
    output: str
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    truncated: bool
    duration_ms: float


class DestroyResponse(BaseModel):
    vm_id: str
    state: str


class LogEntry(BaseModel):
    ts: str
    stream: str
    source: str
    text: str


class LogsResponse(BaseModel):
    vm_id: str
    entries: list[LogEntry]
    truncated: bool


class CancelResponse(BaseModel):
    vm_id: str
    cancelled: bool
    reason: str
