"""Create → ready (201) latency per template, side by side with a bare peer; image sizes; and
canvas render latency.

    .venv/bin/python bench/templates.py [--runs 5] [--templates standard,browser,cua,canvas] [--renders 10]

A template that is not built (or out of date) is skipped, with a note saying so: build it with
`sandboxd template build NAME`. The peers run on the same rootfs, in the same run:
  * standard: bare crun (`sleep infinity` as init, read-only rootfs, no overlay, no network set-up);
  * browser, canvas, cua: bare crun running headless Chromium on the template's rootfs in the
    host's network namespace, timed until CDP's /json/version answers. (cua's desktop also
    starts Xvfb and a window manager, which this peer does not.)
Image sizes: `du` of the built rootfs (disk usage, and the apparent size).
Canvas: end-to-end POST /canvas/render p50 (800×600 script and HTML) and the renderer's own time.
Timings drift on shared machines: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import BareCrun, sandboxd_server, summary  # noqa: E402
from sandboxd.config import DEFAULT_CACHE_DIR  # noqa: E402
from sandboxd.templates.builder import TemplateStore  # noqa: E402
from sandboxd.templates.spec import load_builtin  # noqa: E402

TEMPLATES = ("standard", "browser", "cua", "canvas")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run", "--no-default-browser-check",
    "--user-data-dir=/tmp/chromium",
]  # fmt: skip  (the browser template's own flags)
RENDER_SCRIPT = """
const gradient = ctx.createLinearGradient(0, 0, width, height);
gradient.addColorStop(0, "#1e3cc8"); gradient.addColorStop(1, "#dc143c");
ctx.fillStyle = gradient; ctx.fillRect(0, 0, width, height);
for (let i = 0; i < 200; i++) {
  ctx.beginPath(); ctx.arc((i * 37) % width, (i * 53) % height, 5 + (i % 20), 0, 2 * Math.PI);
  ctx.fillStyle = `hsla(${i * 7}, 80%, 60%, 0.6)`; ctx.fill();
}
ctx.fillStyle = "white"; ctx.font = "bold 48px DejaVu Sans"; ctx.fillText("sandboxd canvas", 40, 100);
"""
RENDER_HTML = f"""<!doctype html><html><body style="margin:0"><canvas id="c" width="800" height="600"></canvas>
<script>const ctx = document.getElementById("c").getContext("2d"); const width = 800, height = 600;
{RENDER_SCRIPT}</script></body></html>"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BareChromium(BareCrun):
    """The browser-like templates' peer: crun itself starting Chromium on the same rootfs, in the
    host's network namespace (so the host polls CDP directly), with a tmpfs /tmp."""

    def __init__(self, rootfs: Path):
        super().__init__(rootfs)
        self.port = free_port()
        process = self.config["process"]
        process["args"] = ["chromium", *CHROMIUM_FLAGS, f"--remote-debugging-port={self.port}", "about:blank"]
        process["env"] = [*process["env"], "HOME=/tmp"]
        linux = self.config["linux"]
        linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
        self.config["mounts"] = [*self.config["mounts"],
                                 {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}]

    def create(self, name: str) -> None:
        super().create(name)
        url = f"http://127.0.0.1:{self.port}/json/version"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        raise TimeoutError("bare Chromium's CDP did not answer in 60 s")


def built_templates(names: list[str]) -> tuple[dict, dict]:
    """The images that are built and up to date, and why the others are skipped."""
    store = TemplateStore(DEFAULT_CACHE_DIR)
    images, skipped = {}, {}
    for name in names:
        image = store.get(name)
        try:
            current = store.digest(load_builtin(name))
        except ValueError as exc:
            skipped[name] = f"no template file: {exc}"
            continue
        if image is None:
            skipped[name] = f"not built: run `sandboxd template build {name}`"
        elif image.digest != current:
            skipped[name] = f"built image is out of date: run `sandboxd template build {name}`"
        else:
            images[name] = image
    return images, skipped


def image_size(rootfs: Path) -> dict:
    def du(*flags: str) -> int:
        out = subprocess.run(["du", "-s", "--block-size=1", *flags, str(rootfs)], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[0])

    return {"disk_mib": round(du() / 2**20), "apparent_mib": round(du("--apparent-size") / 2**20)}


def api_creates(client: httpx.Client, template: str, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        response = client.post("/v1/sandboxes", json={"template": template})
        samples.append(time.perf_counter() - start)
        response.raise_for_status()
        client.delete(f"/v1/sandboxes/{response.json()['vm_id']}").raise_for_status()
    return samples


def peer_creates(template: str, rootfs: Path, runs: int) -> tuple[str, list[float]]:
    peer = BareCrun(rootfs) if template == "standard" else BareChromium(rootfs)
    label = "bare crun (sleep infinity)" if template == "standard" else "bare crun + headless Chromium until CDP answers"
    samples = []
    try:
        for index in range(runs):
            name = f"bench{index:06d}"
            start = time.perf_counter()
            peer.create(name)
            samples.append(time.perf_counter() - start)
            peer.destroy(name)
    finally:
        peer.close()
    return label, samples


def canvas_renders(client: httpx.Client, renders: int) -> dict:
    vm_id = client.post("/v1/sandboxes", json={"template": "canvas"}).raise_for_status().json()["vm_id"]
    out = {}
    try:
        for kind, body in (("script_800x600", {"script": RENDER_SCRIPT}), ("html_800x600", {"html": RENDER_HTML})):
            total, inner = [], []
            for _ in range(renders):
                start = time.perf_counter()
                response = client.post(f"/v1/sandboxes/{vm_id}/canvas/render", json={**body, "width": 800,
                                                                                      "height": 600})
                total.append(time.perf_counter() - start)
                response.raise_for_status()
                inner.append(int(response.headers["x-render-duration-ms"]) / 1000)
            out[kind] = {"api": summary(total), "renderer_itself": summary(inner)}
    finally:
        client.delete(f"/v1/sandboxes/{vm_id}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="creates per template (and peer starts)")
    parser.add_argument("--templates", default=",".join(TEMPLATES))
    parser.add_argument("--renders", type=int, default=10, help="canvas renders of each kind (0: none)")
    args = parser.parse_args()

    images, skipped = built_templates([name.strip() for name in args.templates.split(",") if name.strip()])
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    results: dict = {}
    with sandboxd_server("--cpu-overcommit", "64") as (url, key, _pid):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        if images:
            api_creates(client, next(iter(images)), 1)  # warm-up: a server's first create fills its caches
        for name, image in images.items():
            results[name] = {"create_to_ready": summary(api_creates(client, name, args.runs))}
        if "canvas" in images and args.renders > 0:
            results["canvas"]["renders"] = canvas_renders(client, args.renders)
    for name, image in images.items():
        label, samples = peer_creates(name, image.rootfs, args.runs)
        ours = results[name]["create_to_ready"]
        results[name]["peer"] = {"what": label, **summary(samples)}
        results[name]["ratio_p50_sandboxd_over_peer"] = round(ours["p50_ms"] / results[name]["peer"]["p50_ms"], 2)
        results[name]["image"] = {"name": image.image_name, **image_size(image.rootfs)}
    print(json.dumps({"templates": results, "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
