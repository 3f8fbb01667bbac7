"""Python client for sandboxd (and any server of the Sandboxes API).

    from sandboxd.client import Sandboxd

    with Sandboxd("http://127.0.0.1:8080", api_key) as client, client.create() as sbx:
        print(sbx.exec("echo hello").output)

`AsyncSandboxd` is the same API for asyncio. Errors are the server's own error classes
(sandboxd.errors), carrying `code`, `message`, `field` and `status`.
"""

from sandboxd.client._async import AsyncSandbox, AsyncSandboxd
from sandboxd.client._core import ExecResult, SandboxInfo
from sandboxd.client._sync import Sandbox, Sandboxd
from sandboxd.errors import (
    BadRequest,
    Conflict,
    NoCapacity,
    NotFound,
    NotImplementedYet,
    NoWorkers,
    SandboxdError,
    Unauthorized,
)  # fmt: skip

__all__ = [
    "AsyncSandbox", "AsyncSandboxd", "BadRequest", "Conflict", "ExecResult", "NoCapacity", "NoWorkers",
    "NotFound", "NotImplementedYet", "Sandbox", "SandboxInfo", "Sandboxd", "SandboxdError", "Unauthorized",
]  # fmt: skip
