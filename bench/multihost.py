"""Creates per second across three workers vs one, and where placement puts them.

One control plane (`serve --no-local-worker`, SQLite) and `sandboxd worker` processes each
in its own network namespace (tests/multihost_helpers.py). Phase 1: one worker registered;
phase 2: three. Each phase sends the same number of creates with the same concurrency
through the API, then destroys them. On a machine where the "hosts" share the same CPUs
the ratio shows the control plane's overhead of spreading, not extra hardware.

    .venv/bin/python bench/multihost.py [--creates 24] [--concurrency 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import summary  # noqa: E402
from tests.multihost_helpers import ControlPlane, WorkerHost  # noqa: E402


async def burst(url: str, key: str, creates: int, concurrency: int, addresses: dict[str, str]) -> dict:
    """`creates` creates, `concurrency` at a time; creates/s, latency, and the spread."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    made: list[dict] = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:

        async def one() -> None:
            async with gate:
                start = time.perf_counter()
                response = await client.post("/v1/sandboxes", json={"template": "standard"})
                latencies.append(time.perf_counter() - start)
                response.raise_for_status()
                made.append(response.json())

        start = time.perf_counter()
        try:
            await asyncio.gather(*(one() for _ in range(creates)))
            elapsed = time.perf_counter() - start
        finally:  # a worker stopped with sandboxes leaves them running
            await asyncio.gather(*(client.delete(f"/v1/sandboxes/{item['vm_id']}") for item in made))
    spread = Counter(addresses[httpx.URL(item["endpoint"]).host] for item in made)
    return {"creates_per_s": round(creates / elapsed, 2), "latency": summary(latencies), "spread": dict(spread)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--creates", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=6)
    args = parser.parse_args()
    cp = ControlPlane(None, {}).start()
    token = cp.create_worker_token("bench")
    key = cp.create_key("bench")
    # room for every create on one worker: the comparison is about speed, never about refusals
    room = max(args.creates, 8)
    workers = [WorkerHost(i, [cp], token, memory_mib=512 * room, vcpus=room).create_netns() for i in (1, 2, 3)]
    try:
        workers[0].start()
        addresses = {w.address: f"worker{w.index}" for w in workers}
        one = asyncio.run(burst(cp.url, key, args.creates, args.concurrency, addresses))
        for worker in workers[1:]:
            worker.start()
        three = asyncio.run(burst(cp.url, key, args.creates, args.concurrency, addresses))
    finally:
        for worker in workers:
            worker.remove()
        cp.stop()
        cp.remove_data()
    print(json.dumps({
        "creates": args.creates, "concurrency": args.concurrency, "one_worker": one, "three_workers": three,
        "ratio_three_vs_one": round(three["creates_per_s"] / one["creates_per_s"], 2),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
