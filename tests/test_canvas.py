"""The canvas template: POST /v1/sandboxes/{id}/canvas/render draws HTML (through the
sandbox's Chromium) and JS canvas scripts (through @napi-rs/canvas); the pixels of the
answers are checked, text is read back by OCR (RapidOCR, its models ship in the wheel).

Needs the canvas template built (scripts/test.sh builds it: `sandboxd template build canvas`).
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from sandboxd.config import DEFAULT_CACHE_DIR
from sandboxd.templates.builder import TemplateStore
from sandboxd.templates.spec import load_builtin
from tests.helpers import assert_error

pytestmark = pytest.mark.slow


def _canvas_built() -> bool:
    store = TemplateStore(DEFAULT_CACHE_DIR)
    image = store.get("canvas")
    return image is not None and image.digest == store.digest(load_builtin("canvas"))


if not _canvas_built():
    pytest.skip("the canvas template is not built (or is out of date): run `sandboxd template build canvas`",
                allow_module_level=True)

RED = (220, 20, 60)
BLUE = (30, 60, 200)
# A white page with a red 100x50 rectangle at (40, 30), drawn on a <canvas> by JS.
HTML_RECT = """<!doctype html><html><body style="margin:0;background:#fff">
<canvas id="c" width="320" height="200"></canvas>
<script>
  const ctx = document.getElementById("c").getContext("2d");
  ctx.fillStyle = "rgb(220, 20, 60)";
  ctx.fillRect(40, 30, 100, 50);
</script></body></html>"""
# The same drawing as a @napi-rs/canvas script (plus a white background: a canvas starts transparent).
SCRIPT_RECT = """
ctx.fillStyle = "#ffffff";
ctx.fillRect(0, 0, width, height);
ctx.fillStyle = "rgb(220, 20, 60)";
ctx.fillRect(40, 30, 100, 50);
"""


def render(client, vm_id, **body):
    return client.post(f"/v1/sandboxes/{vm_id}/canvas/render", json=body)


def image_of(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def close_to(pixel, colour, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


@pytest.fixture(scope="module")
def canvas_sandbox(server):
    with server.client(server.keys["alice"]) as client:
        response = client.post("/v1/sandboxes", json={"template": "canvas"})
        assert response.status_code == 201, response.text
        vm_id = response.json()["vm_id"]
        yield vm_id
        client.delete(f"/v1/sandboxes/{vm_id}")


@pytest.fixture(scope="module")
def ocr():
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()

    def read(png: bytes) -> str:
        found, _ = engine(png)
        return " ".join(" ".join(text.split()) for _box, text, _score in found or [])  # OCR spaces vary

    return read


def test_created_ready_with_template_resources(alice, canvas_sandbox):
    # 201 came back: the renderer answers at once, no retry
    assert image_of(render(alice, canvas_sandbox, script=SCRIPT_RECT, width=320, height=200)).size == (320, 200)
    details = alice.get(f"/v1/sandboxes/{canvas_sandbox}").json()
    assert (details["vcpu"], details["cpu_fraction"], details["memory_mib"]) == (1, 1.0, 1024)
    assert details["template"] == "canvas"


@pytest.mark.parametrize("source", ["script", "html"])
def test_rectangle_pixels(alice, canvas_sandbox, source):
    body = {"script": SCRIPT_RECT} if source == "script" else {"html": HTML_RECT}
    response = render(alice, canvas_sandbox, width=320, height=200, **body)
    assert response.headers["content-type"] == "image/png"
    image = image_of(response)
    assert image.size == (320, 200)
    assert close_to(image.getpixel((90, 55)), RED)  # the rectangle's middle
    assert close_to(image.getpixel((41, 31)), RED) and close_to(image.getpixel((138, 78)), RED)  # inside its corners
    for outside in [(10, 10), (150, 55), (90, 90), (300, 190)]:
        assert close_to(image.getpixel(outside), (255, 255, 255)), outside


@pytest.mark.parametrize("source", ["script", "html"])
def test_device_scale_doubles_the_pixels(alice, canvas_sandbox, source):
    body = {"script": SCRIPT_RECT} if source == "script" else {"html": HTML_RECT}
    response = render(alice, canvas_sandbox, width=320, height=200, device_scale_factor=2, **body)
    image = image_of(response)
    assert image.size == (640, 400)
    assert (response.headers["x-render-width"], response.headers["x-render-height"]) == ("640", "400")
    assert close_to(image.getpixel((180, 110)), RED)  # (90, 55) doubled
    assert close_to(image.getpixel((82, 62)), RED) and close_to(image.getpixel((278, 158)), RED)
    assert close_to(image.getpixel((76, 56)), (255, 255, 255))  # just outside its doubled corner
    assert close_to(image.getpixel((284, 164)), (255, 255, 255))


def test_text_read_back_by_ocr(alice, canvas_sandbox, ocr):
    script = """
    ctx.fillStyle = "white"; ctx.fillRect(0, 0, width, height);
    ctx.fillStyle = "black"; ctx.font = "bold 44px DejaVu Sans";
    ctx.fillText("Sandboxd Canvas 42", 20, 70);
    """
    response = render(alice, canvas_sandbox, script=script, width=560, height=110)
    assert "Sandboxd Canvas 42" in ocr(response.content)
    html = ("<html><body style='margin:0;background:white'><h1 style='font:bold 44px sans-serif;margin:20px'>"
            "Rendered by Chromium 7</h1></body></html>")
    response = render(alice, canvas_sandbox, html=html, width=640, height=110)
    assert "Rendered by Chromium 7" in ocr(response.content)


def test_saved_file_is_the_answer(alice, canvas_sandbox):
    response = render(alice, canvas_sandbox, script=SCRIPT_RECT, width=320, height=200)
    saved = response.headers["x-render-path"]
    assert saved == f"/tmp/renders/{response.headers['x-render-id']}.png"
    download = alice.get(f"/v1/sandboxes/{canvas_sandbox}/files", params={"path": saved})
    assert download.status_code == 200 and download.content == response.content

    response = render(alice, canvas_sandbox, html=HTML_RECT, path="renders/rect.png")  # relative to /workspace
    assert response.headers["x-render-path"] == "/workspace/renders/rect.png"
    download = alice.get(f"/v1/sandboxes/{canvas_sandbox}/files", params={"path": "renders/rect.png"})
    assert download.content == response.content


def test_json_answer_and_jpeg(alice, canvas_sandbox):
    response = render(alice, canvas_sandbox, script=SCRIPT_RECT, width=320, height=200, format="jpeg", quality=80,
                      response="json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["media_type"] == "image/jpeg" and (body["width"], body["height"]) == (320, 200)
    assert body["path"].endswith(".jpg") and body["device_scale_factor"] == 1.0
    jpeg = base64.b64decode(body["image_base64"])
    assert jpeg[:3] == b"\xff\xd8\xff" and len(jpeg) == body["bytes"]
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    assert close_to(image.getpixel((90, 55)), RED, tolerance=24)
    saved = alice.get(f"/v1/sandboxes/{canvas_sandbox}/files", params={"path": body["path"]})
    assert saved.content == jpeg


def test_script_error_is_422_with_the_js_error(alice, canvas_sandbox):
    response = render(alice, canvas_sandbox, script="ctx.fillRect(0, 0, 1, 1);\nnotDefined.call();")
    assert_error(response, 422, "script_error", "script")
    message = response.json()["error"]["message"]
    assert "ReferenceError" in message and "notDefined" in message and "line 2" in message
    assert_error(render(alice, canvas_sandbox, script="const = ;"), 422, "script_error", "script")
    assert "SyntaxError" in render(alice, canvas_sandbox, script="const = ;").json()["error"]["message"]
    thrown = render(alice, canvas_sandbox, script="throw new TypeError('bad colour')")
    assert "TypeError: bad colour" in thrown.json()["error"]["message"]


@pytest.mark.parametrize("source", ["script", "html"])
def test_endless_loop_times_out_and_the_renderer_goes_on(alice, canvas_sandbox, source):
    body = {"script": "while (true) {}"} if source == "script" else {
        "html": "<html><body><script>while (true) {}</script></body></html>"}
    assert_error(render(alice, canvas_sandbox, timeout_seconds=1, **body), 504, "render_timeout", "timeout_seconds")
    good = {"script": SCRIPT_RECT} if source == "script" else {"html": HTML_RECT}
    image = image_of(render(alice, canvas_sandbox, width=320, height=200, **good))
    assert close_to(image.getpixel((90, 55)), RED)


def test_concurrent_renders_each_get_their_own_drawing(server, canvas_sandbox):
    colours = {"rgb(220, 20, 60)": RED, "rgb(30, 60, 200)": BLUE}

    def one(kind_and_colour):
        kind, colour = kind_and_colour
        source = (SCRIPT_RECT if kind == "script" else HTML_RECT).replace("rgb(220, 20, 60)", colour)
        with server.client(server.keys["alice"]) as client:
            return kind, colour, render(client, canvas_sandbox, width=320, height=200, **{kind: source})

    jobs = [(kind, colour) for kind in ("html", "script") for colour in colours] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        for kind, colour, response in pool.map(one, jobs):
            assert close_to(image_of(response).getpixel((90, 55)), colours[colour]), (kind, colour)


def test_a_script_that_ends_its_process_does_not_end_the_renderer(alice, canvas_sandbox):
    assert_error(render(alice, canvas_sandbox, script="process.exit(3)"), 422, "script_error", "script")
    image = image_of(render(alice, canvas_sandbox, script=SCRIPT_RECT, width=320, height=200))
    assert close_to(image.getpixel((90, 55)), RED)


@pytest.mark.parametrize(
    "body, code, field",
    [
        ({}, "missing_field", "html"),
        ({"html": "<p>x</p>", "script": "1"}, "invalid_value", "script"),
        ({"html": ""}, "invalid_value", "html"),
        ({"script": 5}, "invalid_type", "script"),
        ({"script": "1", "width": 0}, "invalid_value", "width"),
        ({"script": "1", "height": 5000}, "invalid_value", "height"),
        ({"script": "1", "width": 10.5}, "invalid_type", "width"),
        ({"script": "1", "width": True}, "invalid_type", "width"),
        ({"script": "1", "device_scale_factor": 0}, "invalid_value", "device_scale_factor"),
        ({"script": "1", "device_scale_factor": 5}, "invalid_value", "device_scale_factor"),
        ({"script": "1", "width": 4096, "height": 4096, "device_scale_factor": 2}, "invalid_value",
         "device_scale_factor"),
        ({"script": "1", "timeout_seconds": 0}, "invalid_value", "timeout_seconds"),
        ({"script": "1", "timeout_seconds": 1000}, "invalid_value", "timeout_seconds"),
        ({"script": "1", "format": "gif"}, "invalid_value", "format"),
        ({"script": "1", "quality": 80}, "invalid_value", "quality"),
        ({"script": "1", "format": "jpeg", "quality": 101}, "invalid_value", "quality"),
        ({"script": "1", "path": "a\u0000b"}, "invalid_path", "path"),
        ({"script": "1", "response": "xml"}, "invalid_value", "response"),
        ({"script": "1", "colour": "red"}, "unknown_field", "colour"),
    ],
)
def test_bad_input_is_400_naming_the_field(alice, canvas_sandbox, body, code, field):
    assert_error(render(alice, canvas_sandbox, **body), 400, code, field)


def test_unwritable_path_is_400(alice, canvas_sandbox):
    assert_error(render(alice, canvas_sandbox, script="1", path="/proc/nope/x.png"), 400, "invalid_path", "path")
    assert_error(render(alice, canvas_sandbox, script="1", path="/tmp"), 400, "invalid_path", "path")


def test_not_json_is_400(alice, canvas_sandbox):
    response = alice.post(f"/v1/sandboxes/{canvas_sandbox}/canvas/render", content=b"{nope",
                          headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_json")


def test_other_tenant_unknown_and_unauthenticated(bob, server, canvas_sandbox):
    assert_error(render(bob, canvas_sandbox, script=SCRIPT_RECT), 404, "sandbox_not_found", "id")
    assert_error(render(bob, "sbx_00000000", script=SCRIPT_RECT), 404, "sandbox_not_found", "id")
    with server.client(None) as anonymous:
        assert_error(render(anonymous, canvas_sandbox, script=SCRIPT_RECT), 401, "unauthorized", "authorization")


def test_sandbox_without_renderer_is_409(alice, sandbox):
    assert_error(render(alice, sandbox, script=SCRIPT_RECT), 409, "not_canvas_sandbox", "id")
