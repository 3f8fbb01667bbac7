"""Exec streaming latency: time to the first output byte of a streaming (SSE) exec and of
a blocking exec, side by side with `crun exec` on the same template rootfs.

    .venv/bin/python bench/exec_stream.py [--runs 100] [--url URL --key KEY]

The command is `echo x; sleep 0.2`: a streaming exec should deliver `x` long before the
command ends, a blocking one only after it (≥ 200 ms). Starts its own `sandboxd serve`
(temp data dir, the host's template cache) unless --url and --key point at a running one.
Prints one JSON document with p50/p95 and the sandboxd / crun ratios. Timings drift on
shared machines: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import BareCrun, sandboxd_server, summary  # noqa: E402
from sandboxd.config import DEFAULT_CACHE_DIR  # noqa: E402
from sandboxd.templates.builder import TemplateStore  # noqa: E402

COMMAND = "echo x; sleep 0.2"


def bench_sandboxd(url: str, key: str, runs: int) -> dict:
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    vm_id = client.post("/v1/sandboxes", json={"template": "standard"}).raise_for_status().json()["vm_id"]
    sse_first, sse_total, blocking_first, blocking_true = [], [], [], []
    try:
        exec_url = f"/v1/sandboxes/{vm_id}/exec"
        for _ in range(5):  # warm the connection and the agent
            client.post(exec_url, json={"command": "true"}).raise_for_status()
        for _ in range(runs):
            start = time.perf_counter()
            first = None
            with client.stream("POST", exec_url, json={"command": COMMAND},
                               headers={"Accept": "text/event-stream"}) as response:  # fmt: skip
                response.raise_for_status()
                for line in response.iter_lines():
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter() - start
                        assert json.loads(line[5:])["data"] == "x\n", line
            sse_total.append(time.perf_counter() - start)
            sse_first.append(first)
        for _ in range(runs):
            start = time.perf_counter()
            with client.stream("POST", exec_url, json={"command": COMMAND}) as response:
                response.raise_for_status()
                raw = response.iter_raw()
                next(raw)
                blocking_first.append(time.perf_counter() - start)
                for _chunk in raw:  # the rest, so the connection is reused
                    pass
        for _ in range(runs):
            start = time.perf_counter()
            client.post(exec_url, json={"command": "echo x"}).raise_for_status()
            blocking_true.append(time.perf_counter() - start)
    finally:
        client.delete(f"/v1/sandboxes/{vm_id}")
    return {
        "sse_first_output": summary(sse_first),
        "sse_total": summary(sse_total),
        "blocking_first_byte": summary(blocking_first),
        "blocking_echo_round_trip": summary(blocking_true),
    }


def bench_crun(rootfs: Path, runs: int) -> dict:
    bare = BareCrun(rootfs)
    first, total = [], []
    try:
        bare.create("bare-exec")
        try:
            for _ in range(runs):
                f, t = bare.exec_first_output("bare-exec", COMMAND)
                first.append(f)
                total.append(t)
        finally:
            bare.destroy("bare-exec")
    finally:
        bare.close()
    return {"first_output": summary(first), "total": summary(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--key")
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()

    image = TemplateStore(DEFAULT_CACHE_DIR).get("standard")
    if image is None:
        sys.exit("build the template first: sandboxd template build standard")
    server = nullcontext((args.url, args.key, None)) if args.url else sandboxd_server()
    with server as (url, key, _pid):
        ours = bench_sandboxd(url, key, args.runs)
    peer = bench_crun(image.rootfs, args.runs)
    crun_first = peer["first_output"]
    ratios = {
        "sse_first_output_over_crun_first_output": {
            p: round(ours["sse_first_output"][p] / crun_first[p], 2) for p in ("p50_ms", "p95_ms")
        },
        "blocking_first_byte_over_crun_first_output": {
            p: round(ours["blocking_first_byte"][p] / crun_first[p], 2) for p in ("p50_ms", "p95_ms")
        },
        "sse_first_output_over_blocking_first_byte": {
            p: round(ours["sse_first_output"][p] / ours["blocking_first_byte"][p], 2) for p in ("p50_ms", "p95_ms")
        },
    }
    print(json.dumps({"command": COMMAND, "runs": args.runs, "sandboxd": ours, "bare_crun": peer,
                      "ratios": ratios}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
