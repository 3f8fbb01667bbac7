"""The desktop of a sandbox (the `cua` template): control, screenshots, parsing, live view.

A template has a desktop when it runs the service `desktop-api`: the template file
desktop-server (sandboxd/templates/builtin/files/desktop-server.py) on port 6090 of the
sandbox. The control plane reaches it the way the port proxy reaches any port
(`PortAccess.target` → `WorkerAPI.port_target`), with the desktop's own token, which the
desktop server writes at its first start to /run/sandboxd-desktop/secrets.json (root
only) and the control plane reads once through the guest agent. A sandbox access token
opens the sandbox's ports but not that file, so a preview link cannot drive the desktop.

Live view: noVNC over the port proxy. Port 6081 serves an x11vnc started with `-viewonly`
(the VNC server drops every input event, whatever the browser sends); port 6080 serves one
that asks for the sandbox's VNC password, which only an interactive link carries (in the
URL fragment, which browsers do not send to servers).

The HTTP side is sandboxd/api/desktop.py; this module never sees FastAPI objects.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import httpx

from sandboxd.controlplane.ports import TOKEN_QUERY, PortAccess, proxy_prefix
from sandboxd.controlplane.service import Caller
from sandboxd.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, SandboxdError, WorkerFailure
from sandboxd.store.models import Sandbox
from sandboxd.templates.spec import TemplateSpecError, load_template

DESKTOP_SERVICE = "desktop-api"
DESKTOP_PORT = 6090
LIVE_VIEW_PORTS = {False: 6080, True: 6081}  # view_only → port
SECRETS_PATH = "/run/sandboxd-desktop/secrets.json"
TOKEN_HEADER = "x-desktop-token"
# A parse takes seconds on one vCPU; typing is bounded by text length x delay (api/desktop.py).
READ_TIMEOUT_SECONDS = 300.0
MAX_CACHED_SECRETS = 4096
_ERROR_BY_STATUS = {400: BadRequest, 404: NotFound, 409: Conflict, 413: PayloadTooLarge}


@dataclass(frozen=True)
class DesktopSecrets:
    api_token: str
    vnc_password: str


@dataclass(frozen=True)
class DesktopAnswer:
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class LiveView:
    url: str
    view_only: bool
    port: int
    token: str
    expires_at: datetime


class DesktopService:
    def __init__(self, access: PortAccess, client: httpx.AsyncClient):
        self.access = access
        self.service = access.service
        self.client = client
        self._secrets: OrderedDict[str, DesktopSecrets] = OrderedDict()  # by sandbox: it has a desktop

    def has_desktop(self, template: str) -> bool:
        try:
            spec = load_template(template, self.service.settings.templates_dir)
        except TemplateSpecError:
            return False
        return any(s.name == DESKTOP_SERVICE for s in spec.services)

    async def sandbox(self, caller: Caller, vm_id: str) -> Sandbox:
        """The caller's running sandbox with a desktop: 404 (not theirs), 409 (not running,
        or its template has no desktop)."""
        sandbox = await self.service.get_running(caller, vm_id)
        if sandbox.id not in self._secrets and not self.has_desktop(sandbox.template):
            raise Conflict(
                f"sandbox {vm_id} runs template {sandbox.template!r}, which has no desktop; "
                "create it with template \"cua\"",
                code="no_desktop",
                field="id",
            )
        return sandbox

    async def _read_secrets(self, sandbox: Sandbox) -> DesktopSecrets:
        cached = self._secrets.get(sandbox.id)
        if cached is not None:
            return cached
        worker = self.service._worker(sandbox.worker_id)
        try:
            stream = await worker.files_open(sandbox.id, "/files", {"path": SECRETS_PATH})
            try:
                raw = b"".join([chunk async for chunk in stream])
            finally:
                await stream.aclose()
            data = json.loads(raw)
            secrets = DesktopSecrets(api_token=data["api_token"], vnc_password=data["vnc_password"])
        except (SandboxdError, ValueError, KeyError, TypeError) as exc:
            raise WorkerFailure(
                f"the desktop of sandbox {sandbox.id} is not up (no {SECRETS_PATH}: {exc})",
                code="desktop_unavailable",
            ) from None
        self._secrets[sandbox.id] = secrets
        while len(self._secrets) > MAX_CACHED_SECRETS:
            self._secrets.popitem(last=False)
        return secrets

    async def call(self, caller: Caller, vm_id: str, method: str, path: str, *,
                   params: dict | None = None, body: dict | None = None) -> DesktopAnswer:
        """One request to the sandbox's desktop server; its 4xx errors keep their code and field."""
        sandbox = await self.sandbox(caller, vm_id)
        secrets = await self._read_secrets(sandbox)
        target = await self.access.target(sandbox, DESKTOP_PORT)
        url = f"{target.scheme}://{target.host}:{target.port}{target.path_prefix}{path}"
        headers = {**target.headers, TOKEN_HEADER: secrets.api_token}
        try:
            response = await self.client.request(
                method, url, params=params, json=body, headers=headers,
                timeout=httpx.Timeout(connect=5.0, read=READ_TIMEOUT_SECONDS, write=30.0, pool=10.0),
            )  # fmt: skip
        except httpx.HTTPError as exc:
            raise WorkerFailure(
                f"the desktop of sandbox {vm_id} does not answer ({type(exc).__name__}: {exc})",
                code="desktop_unavailable",
            ) from None
        finally:
            self.access.touch(sandbox.id)
        if response.status_code == 401:  # the sandbox's token changed under the cache
            self._secrets.pop(sandbox.id, None)
        if response.status_code >= 400:
            raise _desktop_error(response)
        return DesktopAnswer(content_type=response.headers.get("content-type", ""), body=response.content)

    async def live_view(self, caller: Caller, vm_id: str, *, base_url: str, view_only: bool,
                        expires_in_seconds: int | None) -> LiveView:
        """A noVNC link through the port proxy, carrying a new sandbox access token."""
        sandbox = await self.sandbox(caller, vm_id)
        secrets = await self._read_secrets(sandbox)
        issued = await self.access.issue_token(caller, vm_id, expires_in_seconds)
        port = LIVE_VIEW_PORTS[view_only]
        prefix = f"{proxy_prefix(vm_id)}{port}"
        query = {
            TOKEN_QUERY: issued.token,  # becomes a cookie scoped to the proxy path: the WebSocket carries it
            "autoconnect": "1",
            "reconnect": "1",
            "resize": "scale",
            "view_only": "1" if view_only else "0",
            "path": f"{prefix.lstrip('/')}/websockify",
        }
        url = f"{base_url.rstrip('/')}{prefix}/vnc.html?{urlencode(query)}"
        if not view_only:  # noVNC reads it from the fragment; browsers never send a fragment
            url += "#" + urlencode({"password": secrets.vnc_password})
        return LiveView(url=url, view_only=view_only, port=port, token=issued.token, expires_at=issued.expires_at)


def _desktop_error(response: httpx.Response) -> SandboxdError:
    try:
        error = response.json()["error"]
        code, message, field = error["code"], error["message"], error.get("field")
    except (ValueError, KeyError, TypeError):
        code, message, field = "desktop_error", response.text[:500], None
    if response.status_code == 401:
        return WorkerFailure("the desktop refused the control plane's token; retry", code="desktop_unavailable")
    error_class = _ERROR_BY_STATUS.get(response.status_code, WorkerFailure)
    return error_class(message, code=code, field=field)
