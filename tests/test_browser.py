"""The browser template and template services: Chromium's CDP on the sandbox's host_port,
driven by Playwright (connect_over_cdp, no browser download); services' logs and readiness;
a service that never gets ready fails the create cleanly.

The browser template is built through the real builder, cached under /var/cache/sandboxd
(scripts/test.sh builds it before the suite; the first build takes about a minute).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import Server, assert_error, exec_ok, host_leaks, wait_for

pytestmark = pytest.mark.slow

BROKEN_TEMPLATE = """
name = "broken-svc"
description = "test only: a service whose readiness never passes"
packages = ["python3"]

[[services]]
name = "never-ready"
command = "echo starting never-ready; sleep 0.3; exit 3"
restart = "on-failure"
[services.readiness]
tcp_port = 7777
timeout_seconds = 3
"""

PAGE = "<html><head><title>sandboxd page</title></head><body><h1 id='h'>Hello from the sandbox</h1></body></html>"
SERVE = ("import http.server as h, socketserver as s; s.TCPServer.allow_reuse_address = True; "
         "s.TCPServer(('127.0.0.1', 8000), h.SimpleHTTPRequestHandler).serve_forever()")


@pytest.fixture(scope="module")
def templates_dir():
    path = Path(tempfile.mkdtemp(prefix="sbd-templates-", dir="/tmp"))
    (path / "broken-svc.toml").write_text(BROKEN_TEMPLATE)
    yield path
    for f in path.iterdir():
        f.unlink()
    path.rmdir()


@pytest.fixture(scope="module")
def browser_server(templates_dir):
    """A server that also knows the operator templates in templates_dir; both templates
    built through the CLI first (cached by content, so later runs skip the builds)."""
    env = dict(os.environ, SANDBOXD_TEMPLATES_DIR=str(templates_dir))
    for name in ("browser", "broken-svc"):
        build = subprocess.run([sys.executable, "-m", "sandboxd", "template", "build", name],
                               capture_output=True, text=True, env=env, timeout=900)
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    old = os.environ.get("SANDBOXD_TEMPLATES_DIR")
    os.environ["SANDBOXD_TEMPLATES_DIR"] = str(templates_dir)
    try:
        srv = Server().start()
    finally:
        if old is None:
            del os.environ["SANDBOXD_TEMPLATES_DIR"]
        else:
            os.environ["SANDBOXD_TEMPLATES_DIR"] = old
    srv.keys = {"carol": srv.create_key("carol")}
    yield srv
    srv.destroy_all(list(srv.keys.values()))
    srv.stop()
    srv.remove_data()


@pytest.fixture
def carol(browser_server):
    with browser_server.client(browser_server.keys["carol"]) as client:
        yield client


@pytest.fixture
def browser(carol):
    response = carol.post("/v1/sandboxes", json={"template": "browser"})
    assert response.status_code == 201, response.text
    yield response.json()
    carol.delete(f"/v1/sandboxes/{response.json()['vm_id']}")


def test_create_answers_only_when_cdp_answers(browser, carol):
    # 201 came back: CDP must answer through the host_port forward at once, no retry
    version = httpx.get(browser["endpoint"] + "/json/version", timeout=10).json()
    assert "Chrome" in version["Browser"]
    # Chromium builds the URL from the Host header: it points back through the forward
    assert version["webSocketDebuggerUrl"].startswith(f"ws://127.0.0.1:{browser['host_port']}/devtools/browser/")
    details = carol.get(f"/v1/sandboxes/{browser['vm_id']}").json()
    assert (details["vcpu"], details["cpu_fraction"], details["memory_mib"]) == (1, 1.0, 1024)
    assert details["template"] == "browser" and details["rootfs"].startswith("browser@")


def test_playwright_over_cdp(browser, carol):
    from playwright.sync_api import sync_playwright

    vm_id = browser["vm_id"]
    put = carol.put(f"/v1/sandboxes/{vm_id}/files", params={"path": "site/index.html", "parents": "true"},
                    content=PAGE.encode())
    assert put.status_code == 201, put.text
    started = carol.post(f"/v1/sandboxes/{vm_id}/exec", json={
        "command": f'python3 -c "{SERVE}"', "cwd": "site", "background": True})
    assert started.status_code in (201, 202), started.text
    wait_for(lambda: exec_ok(carol, vm_id, "curl -sf -o /dev/null http://127.0.0.1:8000/index.html")["exit_code"] == 0,
             timeout=20)

    with sync_playwright() as pw:
        chromium = pw.chromium.connect_over_cdp(browser["endpoint"], timeout=20000)
        try:
            context = chromium.new_context(viewport={"width": 800, "height": 600})
            page = context.new_page()
            page.goto("http://127.0.0.1:8000/index.html", timeout=20000)
            assert page.title() == "sandboxd page"
            assert page.inner_text("#h") == "Hello from the sandbox"
            png = page.screenshot()
            context.close()
        finally:
            chromium.close()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert (width, height) == (800, 600)


def test_service_output_in_logs(browser, carol):
    vm_id = browser["vm_id"]
    entries = carol.get(f"/v1/sandboxes/{vm_id}/logs", params={"limit": 10000}).json()["entries"]
    service = [e for e in entries if e["source"] == "service"]
    assert any("DevTools listening on ws://127.0.0.1:9222/" in e["text"] for e in service), service[-20:]
    assert any(e["text"].startswith("service chromium is ready after") for e in service)
    assert any(e["text"].startswith("service cdp-forward started") for e in service)
    assert any(e["text"].startswith("service cdp-forward is ready after") for e in service)


def test_services_do_not_keep_a_sandbox_alive(carol):
    response = carol.post("/v1/sandboxes", json={"template": "browser", "idle_timeout_seconds": 2})
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    try:
        final = wait_for(lambda: (d := carol.get(f"/v1/sandboxes/{vm_id}").json())["state"] == "destroyed" and d,
                         timeout=30)
        assert final["reason"] == "idle_timeout"
    finally:
        carol.delete(f"/v1/sandboxes/{vm_id}")


def test_service_never_ready_fails_create_cleanly(carol, browser_server):
    t0 = time.monotonic()
    response = carol.post("/v1/sandboxes", json={"template": "broken-svc"})
    elapsed = time.monotonic() - t0
    assert_error(response, 504, "service_not_ready", "template")
    message = response.json()["error"]["message"]
    assert "never-ready" in message and "broken-svc" in message
    assert "starting never-ready" in message  # the service's own last lines, for the operator
    assert elapsed < 20
    listing = carol.get("/v1/sandboxes").json()
    assert (listing["sandboxes"] if isinstance(listing, dict) else listing) == []
    # its worker logged the sandbox it gave up: nothing of it is left (others may run beside us)
    vm_id = re.findall(r"could not create (sbx_[a-z0-9]+)", browser_server.log())[-1]
    assert [leak for leak in host_leaks() if vm_id in leak] == []
    assert not (browser_server.data_dir / "sandboxes" / vm_id).exists()
    record = carol.get(f"/v1/sandboxes/{vm_id}").json()
    assert (record["state"], record["reason"]) == ("destroyed", "create_failed")


def test_templates_dir_in_cli_list(templates_dir):
    env = dict(os.environ, SANDBOXD_TEMPLATES_DIR=str(templates_dir))
    out = subprocess.run([sys.executable, "-m", "sandboxd", "template", "list"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "broken-svc" in out.stdout and "browser" in out.stdout


def test_guest_services_unit():
    """The agent's readiness checks on their own (no container)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sandboxd" / "guest"))
    try:
        import _services
    finally:
        sys.path.pop(0)
    import http.server
    import socketserver
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Quiet) as httpd:
        port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            assert _services.check_tcp(port, 1)[0]
            assert _services.check_http(f"http://127.0.0.1:{port}/", 1)[0]
        finally:
            httpd.shutdown()
    ok, why = _services.check_http(f"http://127.0.0.1:{port}/x", 0.5)
    assert not ok and why
    assert not _services.check_tcp(port, 0.5)[0]
