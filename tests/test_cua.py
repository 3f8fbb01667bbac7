"""The cua template: a real Xvfb desktop with fluxbox and headful Chromium, driven through the
control plane's desktop API, read back by screen parsing (RapidOCR + OpenCV), watched live
through noVNC over the port proxy.

Pages used here log their own input events into document.title, which the window list
shows: each action is checked by what the page saw, not by what the API answered.

Needs the cua template built (`sandboxd template build cua`; scripts/test.sh does it):
the module is skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.helpers import Server, assert_error, wait_for

pytestmark = pytest.mark.slow


def _cua_built() -> bool:
    from sandboxd.config import DEFAULT_CACHE_DIR
    from sandboxd.templates.builder import TemplateStore
    from sandboxd.templates.spec import load_builtin

    return TemplateStore(DEFAULT_CACHE_DIR).lookup(load_builtin("cua")) is not None


if not _cua_built():
    pytest.skip("the cua template is not built (or is out of date): run `sandboxd template build cua`",
                allow_module_level=True)

FORM_PAGE = """<!doctype html><html><head><title>cua form</title>
<style>body{font:32px sans-serif;margin:60px} input,button{font:32px sans-serif;padding:8px}
#result{margin-top:40px;font-size:44px}</style></head><body>
<form id="f"><input id="name" placeholder="Type your name" size="18" autocomplete="off">
<button type="submit">Submit</button></form><div id="result"></div>
<script>document.getElementById('f').addEventListener('submit', function (e) {
  e.preventDefault();
  document.getElementById('result').textContent = 'Received: ' + document.getElementById('name').value;
  document.title = 'cua form submitted';
});</script></body></html>"""

# Every input event the page sees goes into its title (and so into the window list).
EVENTS_PAGE = """<!doctype html><html><head><title>events ready</title></head>
<body style="margin:0;height:5000px;font:20px sans-serif"><p>events page</p>
<input id="t" placeholder="Unicode goes here" style="font:28px sans-serif" autocomplete="off"><script>
var seen = [];
function note(s) { seen.push(s); document.title = 'ev ' + seen.slice(-4).join(' '); }
addEventListener('mousedown', function (e) { note('down' + e.button + '@' + e.screenX + ',' + e.screenY); });
addEventListener('mouseup', function (e) { note('up' + e.button + '@' + e.screenX + ',' + e.screenY); });
addEventListener('dblclick', function () { note('dbl'); });
addEventListener('contextmenu', function (e) { e.preventDefault(); note('ctx'); });
addEventListener('scroll', function () { note('scroll' + (scrollY > 0 ? 'down' : 'top')); });
document.getElementById('t').addEventListener('input', function (e) { note('val=' + e.target.value); });
addEventListener('keydown', function (e) {
  if (e.key === 'Control' || e.key === 'Shift') return;
  note('key' + (e.ctrlKey ? 'C' : '') + (e.shiftKey ? 'S' : '') + e.key);
});
</script></body></html>"""


@pytest.fixture(scope="module")
def cua_server():
    srv = Server().start()
    srv.keys = {"carol": srv.create_key("carol"), "dave": srv.create_key("dave")}
    yield srv
    srv.destroy_all(list(srv.keys.values()))
    srv.stop()
    srv.remove_data()


@pytest.fixture(scope="module")
def carol(cua_server):
    with cua_server.client(cua_server.keys["carol"]) as client:
        yield client


@pytest.fixture
def dave(cua_server):
    with cua_server.client(cua_server.keys["dave"]) as client:
        yield client


@pytest.fixture(scope="module")
def desktop(carol):
    """One cua sandbox for the module (each create boots a whole desktop)."""
    response = carol.post("/v1/sandboxes", json={"template": "cua"})
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    for name, page in (("form.html", FORM_PAGE), ("events.html", EVENTS_PAGE)):
        put = carol.put(f"/v1/sandboxes/{vm_id}/files", params={"path": f"/workspace/{name}"}, content=page.encode())
        assert put.status_code == 201, put.text
    yield vm_id
    carol.delete(f"/v1/sandboxes/{vm_id}")


def api(client, vm_id, method, path, **kwargs) -> httpx.Response:
    return client.request(method, f"/v1/sandboxes/{vm_id}/desktop/{path}", **kwargs)


def ok(response: httpx.Response):
    assert response.status_code in (200, 201), response.text
    return response.json()


def browser_title(client, vm_id) -> str:
    windows = ok(api(client, vm_id, "GET", "windows"))["windows"]
    titles = [w["title"] for w in windows if w["class"] == "Chromium" and w["visible"]]
    return titles[0] if titles else ""


def wait_title(client, vm_id, pattern: str, timeout: float = 20) -> str:
    def matched():
        title = browser_title(client, vm_id)
        return title if re.search(pattern, title) else None

    try:
        return wait_for(matched, timeout=timeout)
    except TimeoutError:
        raise AssertionError(
            f"the browser's title never matched {pattern!r}; last: {browser_title(client, vm_id)!r}"
        ) from None


def open_page(client, vm_id, name: str, title_pattern: str) -> None:
    ok(api(client, vm_id, "POST", "open", json={"url": f"file:///workspace/{name}"}))
    wait_title(client, vm_id, title_pattern)


def parse_texts(client, vm_id, **body) -> list[dict]:
    return ok(api(client, vm_id, "POST", "parse", json=body))["elements"]


def squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def find(elements: list[dict], wanted: str) -> dict | None:
    for element in elements:
        if squash(wanted) in squash(element["text"]):
            return element
    return None


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def jpeg_size(data: bytes) -> tuple[int, int]:
    assert data[:2] == b"\xff\xd8"
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    raise AssertionError("no SOF marker in the JPEG")


# --- the desktop is up at 201 ---------------------------------------------------------------


def test_create_answers_when_the_desktop_is_up(carol, desktop):
    details = ok(carol.get(f"/v1/sandboxes/{desktop}"))
    assert (details["vcpu"], details["cpu_fraction"], details["memory_mib"]) == (1, 1.0, 2048)
    assert details["template"] == "cua" and details["rootfs"].startswith("cua@")
    assert ok(api(carol, desktop, "GET", "screen")) == {"width": 1280, "height": 800, "depth": 24}
    windows = ok(api(carol, desktop, "GET", "windows"))["windows"]
    assert [w["class"] for w in windows] == ["Chromium"], windows  # and no error dialog of fluxbox's
    chromium = windows
    assert chromium[0]["visible"] and chromium[0]["width"] > 1000 and chromium[0]["height"] > 600  # maximized
    logs = ok(carol.get(f"/v1/sandboxes/{desktop}/logs", params={"limit": 10000}))["entries"]
    ready = {e["text"].split()[1] for e in logs if e["source"] == "service" and " is ready after " in e["text"]}
    assert ready >= {"xvfb", "fluxbox", "chromium", "desktop-api", "vnc", "vnc-viewonly", "novnc", "novnc-viewonly"}


# --- the test: a form, filled in and checked by screen parsing ----------------------------


def test_fill_a_form_and_read_the_result_by_screen_parsing(carol, desktop):
    open_page(carol, desktop, "form.html", r"^cua form")
    elements = wait_for(lambda: (e := parse_texts(carol, desktop)) and find(e, "Type your name") and e, timeout=30)
    field = find(elements, "Type your name")
    ok(api(carol, desktop, "POST", "mouse/click", json={"x": field["center"][0], "y": field["center"][1]}))
    ok(api(carol, desktop, "POST", "keyboard/type", json={"text": "Ada Lovelace 1815"}))
    submit = find(elements, "Submit")
    assert submit is not None, elements
    ok(api(carol, desktop, "POST", "mouse/click", json={"x": submit["center"][0], "y": submit["center"][1]}))
    wait_title(carol, desktop, "cua form submitted")
    shot = api(carol, desktop, "GET", "screenshot")
    assert png_size(shot.content) == (1280, 800)
    parsed = ok(api(carol, desktop, "POST", "parse", json={}))
    assert parsed["detector"] == "opencv" and parsed["width"] == 1280
    result = find(parsed["elements"], "Received: Ada Lovelace 1815")
    assert result is not None, [e["text"] for e in parsed["elements"]]
    assert result["kind"] in ("text", "box") and result["confidence"] >= 0.5
    assert "Lovelace 1815" in result["text"]  # words keep their spaces
    x1, y1, x2, y2 = result["bbox"]
    assert x1 <= result["center"][0] <= x2 and y1 <= result["center"][1] <= y2
    # the result line sits below the field it came from
    assert y1 > field["bbox"][3]


def test_parse_elements_shape_and_region(carol, desktop):
    parsed = ok(api(carol, desktop, "POST", "parse", json={"detector": "opencv", "min_confidence": 0.3}))
    assert parsed["elements"]
    for i, element in enumerate(parsed["elements"]):
        assert element["id"] == i and element["kind"] in ("text", "box", "icon")
        x1, y1, x2, y2 = element["bbox"]
        assert 0 <= x1 <= x2 < 1280 and 0 <= y1 <= y2 < 800
        assert x1 <= element["center"][0] <= x2 and y1 <= element["center"][1] <= y2
    assert {"box", "text"} <= {e["kind"] for e in parsed["elements"]}
    # the form's button is a box of its own holding its label, apart from the field beside it
    submit = find(parsed["elements"], "Submit")
    assert submit["kind"] == "box" and squash(submit["text"]) == "submit", parsed["elements"]
    top = ok(api(carol, desktop, "POST", "parse", json={"region": [0, 0, 1279, 199]}))
    assert top["region"] == [0, 0, 1279, 199]
    assert all(e["bbox"][3] <= 199 for e in top["elements"])
    assert_error(api(carol, desktop, "POST", "parse", json={"detector": "omniparser"}),
                 409, "omniparser_unavailable", "detector")


# --- each endpoint, checked by what the page saw ----------------------------------------------


def test_screenshot_png_jpeg_region_scale(carol, desktop):
    png = api(carol, desktop, "GET", "screenshot", params={"format": "png"})
    assert png.headers["content-type"] == "image/png" and png_size(png.content) == (1280, 800)
    jpeg = api(carol, desktop, "GET", "screenshot", params={"format": "jpeg", "quality": 60})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg_size(jpeg.content) == (1280, 800)
    region = api(carol, desktop, "GET", "screenshot", params={"x": 10, "y": 20, "width": 300, "height": 100})
    assert png_size(region.content) == (300, 100)
    small = api(carol, desktop, "GET", "screenshot", params={"format": "jpeg", "scale": 0.5})
    assert jpeg_size(small.content) == (640, 400)


def test_move_then_cursor(carol, desktop):
    for x, y in ((321, 456), (0, 0), (1279, 799)):
        assert ok(api(carol, desktop, "POST", "mouse/move", json={"x": x, "y": y})) == {"x": x, "y": y}
        assert ok(api(carol, desktop, "GET", "cursor")) == {"x": x, "y": y}


def test_clicks_scroll_drag_keys_reach_the_page(carol, desktop):
    open_page(carol, desktop, "events.html", r"^events ready")
    def click(**body):
        ok(api(carol, desktop, "POST", "mouse/click", json={"x": 500, "y": 400, **body}))

    click()
    wait_title(carol, desktop, r"down0@500,400 up0@500,400")
    click(double=True)
    wait_title(carol, desktop, r"\bdbl\b")
    click(button="right")
    wait_title(carol, desktop, r"down2@500,400 .*\bctx\b|\bctx\b")
    click(button="middle")
    wait_title(carol, desktop, r"down1@500,400 up1@500,400")

    ok(api(carol, desktop, "POST", "mouse/scroll", json={"direction": "down", "amount": 5, "x": 600, "y": 400}))
    wait_title(carol, desktop, r"scrolldown")
    ok(api(carol, desktop, "POST", "mouse/scroll", json={"direction": "up", "amount": 50}))
    wait_title(carol, desktop, r"scrolltop")

    ok(api(carol, desktop, "POST", "mouse/drag", json={"from": [100, 300], "to": [400, 350]}))
    wait_title(carol, desktop, r"down0@100,300 up0@400,350")
    ok(api(carol, desktop, "POST", "mouse/down", json={"x": 200, "y": 250, "button": "left"}))
    ok(api(carol, desktop, "POST", "mouse/up", json={"x": 220, "y": 260}))
    wait_title(carol, desktop, r"down0@200,250 up0@220,260")

    ok(api(carol, desktop, "POST", "keyboard/press", json={"keys": ["ctrl+b", "shift+a", "Escape"]}))
    wait_title(carol, desktop, r"keyCb keySA keyEscape")
    # characters the keymap lacks, into a text field found by screen parsing
    ok(api(carol, desktop, "POST", "mouse/scroll", json={"direction": "up", "amount": 50}))
    field = wait_for(lambda: find(parse_texts(carol, desktop), "Unicode goes here"), timeout=30)
    ok(api(carol, desktop, "POST", "mouse/click", json={"x": field["center"][0], "y": field["center"][1]}))
    ok(api(carol, desktop, "POST", "keyboard/type", json={"text": "hé€ö漢"}))
    wait_title(carol, desktop, r"val=hé€ö漢( |$)")
    # a browser chord: ctrl+l focuses the address bar, and the typed URL is opened
    ok(api(carol, desktop, "POST", "keyboard/press", json={"keys": "ctrl+l"}))
    ok(api(carol, desktop, "POST", "keyboard/type", json={"text": "file:///workspace/form.html\n"}))
    wait_title(carol, desktop, r"^cua form")


def test_windows_and_focus(carol, desktop):
    windows = ok(api(carol, desktop, "GET", "windows"))["windows"]
    chromium = next(w for w in windows if w["class"] == "Chromium")
    assert chromium["pid"] and chromium["title"]
    answer = ok(api(carol, desktop, "POST", f"windows/{chromium['id']}/focus"))
    assert answer == {"id": chromium["id"], "focused": True}
    assert [w["id"] for w in ok(api(carol, desktop, "GET", "windows"))["windows"] if w["focused"]] == [chromium["id"]]
    assert_error(api(carol, desktop, "POST", "windows/12345/focus"), 404, "window_not_found", "id")


def test_sdk_desktop_calls(cua_server, desktop):
    from sandboxd.client import AsyncSandboxd, BadRequest, Sandboxd

    with Sandboxd(cua_server.url, cua_server.keys["carol"]) as client:
        sbx = client.sandbox(desktop)
        assert sbx.desktop("screen")["width"] == 1280
        assert sbx.desktop("mouse/move", x=10, y=20) == {"x": 10, "y": 20}
        assert sbx.desktop("cursor") == {"x": 10, "y": 20}
        assert png_size(sbx.screenshot(scale=0.25)) == (320, 200)
        with pytest.raises(BadRequest) as bad:
            sbx.desktop("mouse/move", x=10, y=5000)
        assert (bad.value.code, bad.value.field) == ("off_screen", "y")

    async def async_calls():
        async with AsyncSandboxd(cua_server.url, cua_server.keys["carol"]) as client:
            sbx = client.sandbox(desktop)
            await sbx.desktop("mouse/drag", **{"from": [30, 40], "to": [50, 60]})
            return await sbx.desktop("cursor"), jpeg_size(await sbx.screenshot("jpeg", scale=0.5))

    assert asyncio.run(async_calls()) == ({"x": 50, "y": 60}, (640, 400))


# --- bad input, tenancy, templates without a desktop -------------------------------------------


@pytest.mark.parametrize("path, body, status, code, field", [
    ("mouse/move", {"x": -1, "y": 5}, 400, "invalid_value", "x"),
    ("mouse/move", {"x": 1280, "y": 5}, 400, "off_screen", "x"),
    ("mouse/move", {"x": 5, "y": 9000}, 400, "off_screen", "y"),
    ("mouse/move", {"x": "1", "y": 5}, 400, "invalid_type", "x"),
    ("mouse/move", {"x": 1}, 400, "missing_field", "y"),
    ("mouse/move", {"x": 1, "y": 1, "speed": 3}, 400, "unknown_field", "speed"),
    ("mouse/click", {"button": "left2"}, 400, "invalid_value", "button"),
    ("mouse/click", {"x": 10}, 400, "missing_field", "y"),
    ("mouse/click", {"double": "yes"}, 400, "invalid_type", "double"),
    ("mouse/drag", {"from": [1], "to": [5, 5]}, 400, "invalid_value", "from"),
    ("mouse/drag", {"from": [1, 1], "to": [5000, 5]}, 400, "off_screen", "to[0]"),
    ("mouse/scroll", {"direction": "sideways"}, 400, "invalid_value", "direction"),
    ("mouse/scroll", {"amount": 0}, 400, "invalid_value", "amount"),
    ("keyboard/type", {"text": ""}, 400, "invalid_value", "text"),
    ("keyboard/type", {}, 400, "missing_field", "text"),
    ("keyboard/press", {"keys": "ctrl+nosuchkey"}, 400, "unknown_key", "keys"),
    ("keyboard/press", {"keys": ["a", "hyper+x"]}, 400, "unknown_key", "keys[1]"),
    ("keyboard/press", {"keys": []}, 400, "invalid_value", "keys"),
    ("open", {"url": "javascript:alert(1)"}, 400, "invalid_value", "url"),
    ("parse", {"region": [0, 0, 2000, 10]}, 400, "off_screen", "region"),
    ("parse", {"detector": "yolo"}, 400, "invalid_value", "detector"),
    ("stream", {"view_only": "yes"}, 400, "invalid_type", "view_only"),
])  # fmt: skip
def test_bad_input_names_the_field(carol, desktop, path, body, status, code, field):
    assert_error(api(carol, desktop, "POST", path, json=body), status, code, field)


def test_bad_screenshot_queries_and_bodies(carol, desktop):
    assert_error(api(carol, desktop, "GET", "screenshot", params={"format": "gif"}), 400, "invalid_value", "format")
    assert_error(api(carol, desktop, "GET", "screenshot", params={"scale": "big"}), 400, "float_parsing", "scale")
    assert_error(api(carol, desktop, "GET", "screenshot", params={"x": 1200, "y": 0, "width": 200, "height": 10}),
                 400, "off_screen", "width")
    assert_error(api(carol, desktop, "GET", "screenshot", params={"x": 10}), 400, "missing_field", "y")
    assert_error(api(carol, desktop, "POST", "mouse/move", content=b"{nope"), 400, "invalid_json", None)
    assert_error(api(carol, desktop, "POST", "mouse/move", content=b"[1, 2]"), 400, "invalid_type", None)


def test_other_tenants_and_anonymous_callers(dave, cua_server, desktop):
    assert_error(api(dave, desktop, "GET", "screenshot"), 404, "sandbox_not_found", "id")
    assert_error(api(dave, desktop, "POST", "mouse/click", json={}), 404, "sandbox_not_found", "id")
    assert_error(api(dave, desktop, "POST", "stream", json={}), 404, "sandbox_not_found", "id")
    with cua_server.client(None) as anonymous:
        assert_error(api(anonymous, desktop, "GET", "screen"), 401, "unauthorized", "authorization")


def test_a_sandbox_without_a_desktop(carol):
    created = carol.post("/v1/sandboxes", json={"template": "standard"})
    assert created.status_code == 201, created.text
    vm_id = created.json()["vm_id"]
    try:
        for method, path in (("GET", "screenshot"), ("POST", "stream"), ("POST", "parse")):
            response = api(carol, vm_id, method, path, json={} if method == "POST" else None)
            assert_error(response, 409, "no_desktop", "id")
            assert "cua" in response.json()["error"]["message"]
    finally:
        carol.delete(f"/v1/sandboxes/{vm_id}")


def test_desktop_api_in_openapi(cua_server):
    paths = httpx.get(cua_server.url + "/openapi.json", timeout=30).json()["paths"]
    for path in ("screenshot", "cursor", "screen", "windows", "mouse/move", "mouse/click", "mouse/drag",
                 "mouse/scroll", "keyboard/type", "keyboard/press", "parse", "stream"):
        assert f"/v1/sandboxes/{{vm_id}}/desktop/{path}" in paths, path


# --- live view ----------------------------------------------------------------------------------


def _des_response(password: str, challenge: bytes) -> bytes:
    """VNC authentication: the challenge DES-encrypted with the password, each key byte's bits
    mirrored (RFC 6143 7.2.2), by the host's openssl."""
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
    out = subprocess.run(["openssl", "enc", "-des-ecb", "-nopad", "-K", key.hex(), "-provider", "legacy",
                          "-provider", "default"], input=challenge, capture_output=True, check=True)
    return out.stdout


async def _vnc_session(ws_url: str, password: str | None, pointer: tuple[int, int]) -> list[int]:
    """RFB over noVNC's WebSocket: handshake, then one pointer event. The server's offered
    security types come back."""
    from websockets.asyncio.client import connect

    async with connect(ws_url, subprotocols=["binary"], max_size=None, open_timeout=20) as ws:
        buffer = bytearray()

        async def read(n: int) -> bytes:
            while len(buffer) < n:
                buffer.extend(await asyncio.wait_for(ws.recv(), 20))
            data = bytes(buffer[:n])
            del buffer[:n]
            return data

        assert (await read(12)).startswith(b"RFB 003.")
        await ws.send(b"RFB 003.008\n")
        offered = list(await read((await read(1))[0]))
        if password is None:
            assert 1 in offered, offered
            await ws.send(bytes([1]))
        else:
            assert offered == [2], offered  # VNC authentication, nothing weaker
            await ws.send(bytes([2]))
            await ws.send(_des_response(password, await read(16)))
        assert await read(4) == b"\0\0\0\0", "VNC security handshake failed"
        await ws.send(bytes([1]))  # ClientInit: shared
        width, height = struct.unpack(">HH", await read(4))
        assert (width, height) == (1280, 800)
        await read(16)  # pixel format
        await read(struct.unpack(">I", await read(4))[0])  # desktop name
        await ws.send(struct.pack(">BBHH", 5, 0, *pointer))  # PointerEvent: move, no buttons
        await ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 8, 8))  # a FramebufferUpdateRequest: a round trip
        await read(1)
        return offered


def _ws_url(live_url: str) -> str:
    parts = urlsplit(live_url)
    query = parse_qs(parts.query)
    token = query["sandbox_token"][0]
    return f"ws://{parts.netloc}/{query['path'][0]}?sandbox_token={token}"


def test_live_view_view_only_and_interactive(carol, cua_server, desktop):
    view = ok(api(carol, desktop, "POST", "stream", json={"view_only": True}))
    assert view["view_only"] is True and view["port"] == 6081
    assert f"/v1/sandboxes/{desktop}/ports/6081/vnc.html?" in view["url"] and "#" not in view["url"]
    query = parse_qs(urlsplit(view["url"]).query)
    assert query["sandbox_token"] == [view["token"]] and query["autoconnect"] == ["1"]
    page = httpx.get(view["url"], timeout=30)  # no API key: the link alone opens noVNC
    assert page.status_code == 200 and "noVNC" in page.text

    ok(api(carol, desktop, "POST", "mouse/move", json={"x": 700, "y": 500}))
    offered = asyncio.run(_vnc_session(_ws_url(view["url"]), None, (50, 60)))
    assert offered == [1]  # x11vnc -viewonly, no password
    ok(api(carol, desktop, "GET", "screen"))  # a round trip after the event
    assert ok(api(carol, desktop, "GET", "cursor")) == {"x": 700, "y": 500}  # the view-only server dropped it

    live = ok(api(carol, desktop, "POST", "stream", json={"expires_in_seconds": 600}))
    assert live["view_only"] is False and live["port"] == 6080
    fragment = parse_qs(urlsplit(live["url"]).fragment)
    password = fragment["password"][0]
    # the view-only link's token opens the interactive port too, but not without the password
    with pytest.raises(AssertionError, match="VNC security handshake failed"):
        asyncio.run(_vnc_session(_ws_url(view["url"]).replace("/6081/", "/6080/"), "wrong!!", (50, 60)))
    asyncio.run(_vnc_session(_ws_url(live["url"]), password, (50, 60)))
    wait_for(lambda: ok(api(carol, desktop, "GET", "cursor")) == {"x": 50, "y": 60}, timeout=10)


def test_live_view_needs_a_token(cua_server, desktop):
    for port in (6080, 6081):
        response = httpx.get(f"{cua_server.url}/v1/sandboxes/{desktop}/ports/{port}/vnc.html", timeout=30)
        assert_error(response, 401, "unauthorized", "authorization")
        bad = httpx.get(f"{cua_server.url}/v1/sandboxes/{desktop}/ports/{port}/vnc.html",
                        params={"sandbox_token": "sbt_nope"}, timeout=30)
        assert_error(bad, 401, "invalid_sandbox_token")
        assert bad.json()["error"]["field"] == "sandbox_token"

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def anonymous_websocket():
        url = cua_server.url.replace("http://", "ws://") + f"/v1/sandboxes/{desktop}/ports/6081/websockify"
        async with connect(url, subprotocols=["binary"], open_timeout=20):
            pass

    with pytest.raises(InvalidStatus) as denied:
        asyncio.run(anonymous_websocket())
    assert denied.value.response.status_code == 401


# --- OmniParser configuration -------------------------------------------------------------------


def test_omniparser_dir_that_does_not_exist_stops_the_server():
    env = dict(os.environ, SANDBOXD_OMNIPARSER_DIR="/nonexistent/omniparser")
    out = subprocess.run([sys.executable, "-m", "sandboxd", "serve", "--listen", "127.0.0.1:1"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert "SANDBOXD_OMNIPARSER_DIR: /nonexistent/omniparser is not a directory" in out.stdout + out.stderr


def test_omniparser_dir_without_the_model_is_reported_and_nothing_is_downloaded():
    weights = Path(tempfile.mkdtemp(prefix="sbd-omni-", dir="/tmp"))
    (weights / "icon_detect").mkdir()
    (weights / "icon_detect" / "model.pt").write_bytes(b"not an onnx export")
    before = sorted(p.relative_to(weights) for p in weights.rglob("*"))
    old = os.environ.get("SANDBOXD_OMNIPARSER_DIR")
    os.environ["SANDBOXD_OMNIPARSER_DIR"] = str(weights)
    try:
        srv = Server().start()
    finally:
        if old is None:
            del os.environ["SANDBOXD_OMNIPARSER_DIR"]
        else:
            os.environ["SANDBOXD_OMNIPARSER_DIR"] = old
    key = srv.create_key("erin")
    try:
        with srv.client(key) as erin:
            created = erin.post("/v1/sandboxes", json={"template": "cua"})
            assert created.status_code == 201, created.text
            vm_id = created.json()["vm_id"]
            refused = api(erin, vm_id, "POST", "parse", json={"detector": "omniparser"})
            assert_error(refused, 409, "omniparser_unavailable", "detector")
            assert "icon_detect/model.onnx" in refused.json()["error"]["message"]
            assert "yolo export" in refused.json()["error"]["message"]
            parsed = ok(api(erin, vm_id, "POST", "parse", json={}))  # auto: falls back, and says why
            assert parsed["detector"] == "opencv" and "icon_detect/model.onnx" in parsed["omniparser_error"]
            # mounted read-only; nothing fetched into the usual model caches
            probe = ok(erin.post(f"/v1/sandboxes/{vm_id}/exec", json={
                "command": "touch /opt/omniparser/x; echo rc=$?; ls -a /root/.cache/huggingface /root/.cache/torch "
                           "2>&1 | head -2; ls /opt/omniparser/icon_detect"}))
            assert "rc=1" in probe["stdout"] and "model.pt" in probe["stdout"], probe
            assert probe["stdout"].count("No such file or directory") == 2, probe
            # a file that is not an ONNX model: refused by name, not a 500
            (weights / "icon_detect" / "model.onnx").write_bytes(b"not a model")
            broken = api(erin, vm_id, "POST", "parse", json={"detector": "omniparser"})
            assert_error(broken, 409, "omniparser_unavailable", "detector")
            assert "icon_detect/model.onnx did not run" in broken.json()["error"]["message"]
            fallback = ok(api(erin, vm_id, "POST", "parse", json={}))
            assert fallback["detector"] == "opencv" and "did not run" in fallback["omniparser_error"]
    finally:
        srv.destroy_all([key])
        srv.stop()
        srv.remove_data()
    after = sorted(p.relative_to(weights) for p in weights.rglob("*"))
    assert after == sorted(before + [Path("icon_detect/model.onnx")])  # the sandbox wrote nothing there
    (weights / "icon_detect" / "model.onnx").unlink()
    (weights / "icon_detect" / "model.pt").unlink()
    (weights / "icon_detect").rmdir()
    weights.rmdir()


def test_secrets_stay_in_the_sandbox(carol, desktop):
    """The desktop token never leaves the control plane: no answer carries it."""
    probe = ok(carol.post(f"/v1/sandboxes/{desktop}/exec", json={"command": "cat /run/sandboxd-desktop/secrets.json"}))
    secrets = json.loads(probe["stdout"])
    answers = [api(carol, desktop, "GET", "windows").text, api(carol, desktop, "GET", "screen").text,
               api(carol, desktop, "POST", "stream", json={}).text]
    assert not any(secrets["api_token"] in answer for answer in answers)
    # the port proxy reaches the desktop server, but it wants the token the proxy does not have
    direct = carol.get(f"/v1/sandboxes/{desktop}/ports/6090/screen")
    assert direct.status_code == 401 and "X-Desktop-Token" in direct.text
