"""What the sync and async clients share: request shapes, answers, and errors.

Both clients build the same requests here and parse the same answers, so they differ
only in how they send them (httpx.Client or httpx.AsyncClient).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import httpx

from sandboxd import errors

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)

# status → the server's error class (the same tree the server raises)
_ERRORS_BY_STATUS: dict[int, type[errors.SandboxdError]] = {
    400: errors.BadRequest,
    401: errors.Unauthorized,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    501: errors.NotImplementedYet,
    502: errors.WorkerFailure,
    503: errors.NoWorkers,
}


def settings(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    base_url = base_url or os.environ.get("SANDBOXD_URL", DEFAULT_URL)
    api_key = api_key or os.environ.get("SANDBOXD_API_KEY")
    if not api_key:
        raise ValueError("an API key is needed: pass api_key= or set SANDBOXD_API_KEY")
    return base_url.rstrip("/"), api_key


def raise_for_error(response: httpx.Response) -> None:
    """Turn an error answer into the matching SandboxdError (code, message, field kept)."""
    if response.status_code < 400:
        return
    try:
        detail = response.json()["error"]
        message, code, field_name = detail["message"], detail["code"], detail.get("field")
    except (ValueError, KeyError, TypeError):
        message, code, field_name = response.text[:500] or response.reason_phrase, "http_error", None
    error_class = _ERRORS_BY_STATUS.get(response.status_code, errors.SandboxdError)
    if response.status_code == 409 and code == "no_capacity":
        error_class = errors.NoCapacity
    error = error_class(message, code=code, field=field_name)
    error.status = response.status_code
    raise error


@dataclass(frozen=True)
class ExecResult:
    output: str
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    truncated: bool = False
    duration_ms: float = 0.0

    @classmethod
    def from_json(cls, data: dict) -> "ExecResult":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass(frozen=True)
class SandboxInfo:
    vm_id: str
    state: str
    raw: dict = field(repr=False, compare=False)

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    @classmethod
    def from_json(cls, data: dict) -> "SandboxInfo":
        return cls(vm_id=data["vm_id"], state=data["state"], raw=data)


def create_body(template: str, **options: Any) -> dict:
    return {"template": template, **{key: value for key, value in options.items() if value is not None}}


def exec_body(command: str, **options: Any) -> dict:
    return {"command": command, **{key: value for key, value in options.items() if value is not None}}


def list_items(data: Any) -> tuple[list[SandboxInfo], bool]:
    """The list answer is a bare array, or `{sandboxes, partial}` when a worker is down."""
    if isinstance(data, dict):
        return [SandboxInfo.from_json(item) for item in data["sandboxes"]], bool(data.get("partial"))
    return [SandboxInfo.from_json(item) for item in data], False
