"""Desktop API latency (the cua template), side by side with the same calls made inside the
sandbox straight to its desktop server (the peer: no API key check, no store lookup, no
proxy hop), in the same run on the same sandbox.

    .venv/bin/python bench/desktop.py [--runs 20] [--parse-runs 5]

Needs the cua template built (`sandboxd template build cua`). Reports p50/p95 per call and
the API/peer ratio; the difference is what the control plane adds. Timings drift on shared
machines: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import sandboxd_server, summary  # noqa: E402

# (name, method, path, query, body)
CALLS = [
    ("screenshot_png", "GET", "/screenshot", {"format": "png"}, None),
    ("screenshot_jpeg", "GET", "/screenshot", {"format": "jpeg"}, None),
    ("cursor", "GET", "/cursor", {}, None),
    ("windows", "GET", "/windows", {}, None),
    ("mouse_move", "POST", "/mouse/move", {}, {"x": 300, "y": 300}),
    ("mouse_click", "POST", "/mouse/click", {}, {"x": 640, "y": 500}),
    ("key_press", "POST", "/keyboard/press", {}, {"keys": "shift"}),
    ("type_10_chars", "POST", "/keyboard/type", {}, {"text": "abcdefghij"}),
]
PARSE = ("parse", "POST", "/parse", {}, {})

# Runs inside the sandbox: the same calls to the desktop server on 127.0.0.1:6090, a new
# connection per call as the control plane makes them.
PEER = r"""
import http.client, json, sys, time, urllib.parse
token = json.load(open("/run/sandboxd-desktop/secrets.json"))["api_token"]
calls, runs = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for name, method, path, query, body in calls:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", 6090)
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"X-Desktop-Token": token, **({"Content-Type": "application/json"} if data else {})}
        conn.request(method, url, body=data, headers=headers)
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 200, (name, response.status)
        samples.append(time.perf_counter() - t0)
    out[name] = samples
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--parse-runs", type=int, default=5)
    args = parser.parse_args()
    with sandboxd_server() as (url, key, _pid):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        t0 = time.perf_counter()
        created = client.post("/v1/sandboxes", json={"template": "cua"})
        create_s = time.perf_counter() - t0
        if created.status_code != 201:
            sys.exit(f"cannot create a cua sandbox (built? `sandboxd template build cua`): {created.text}")
        vm_id = created.json()["vm_id"]
        try:
            base = f"/v1/sandboxes/{vm_id}/desktop"
            put = client.put(f"/v1/sandboxes/{vm_id}/files", params={"path": "/tmp/peer.py"}, content=PEER.encode())
            put.raise_for_status()
            client.post(base + "/parse", json={}).raise_for_status()  # load the OCR models once, for both sides

            def api_samples(call, runs):
                name, method, path, query, body = call
                samples = []
                for _ in range(runs):
                    t = time.perf_counter()
                    response = client.request(method, base + path, params=query, json=body)
                    samples.append(time.perf_counter() - t)
                    response.raise_for_status()
                return samples

            def peer_samples(calls, runs):
                command = f"python3 /tmp/peer.py {shlex.quote(json.dumps(calls))} {runs}"
                result = client.post(f"/v1/sandboxes/{vm_id}/exec", json={"command": command, "timeout_seconds": 600})
                result.raise_for_status()
                return json.loads(result.json()["stdout"])

            report = {"create_to_201_s": round(create_s, 2), "calls": {}}
            peers = {**peer_samples(CALLS, args.runs), **peer_samples([PARSE], args.parse_runs)}
            for call, runs in [(c, args.runs) for c in CALLS] + [(PARSE, args.parse_runs)]:
                api = summary(api_samples(call, runs))
                peer = summary(peers[call[0]])
                report["calls"][call[0]] = {"api": api, "in_sandbox": peer,
                                            "ratio_p50": round(api["p50_ms"] / peer["p50_ms"], 2)}
        finally:
            client.delete(f"/v1/sandboxes/{vm_id}")
            client.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
