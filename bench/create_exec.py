"""Create / exec / destroy latency of sandboxd, side by side with bare crun on the same rootfs.

    .venv/bin/python bench/create_exec.py [--sequential 50] [--concurrent 10] [--execs 200]

Starts its own `sandboxd serve` (temp data dir, the host's template cache) unless --url and
--key point at a running one. Prints one JSON document with p50/p95 per phase and the
sandboxd / crun ratios. Timings drift on shared machines: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import BareCrun, api_lifecycle, bare_lifecycle, sandboxd_server, summary  # noqa: E402
from sandboxd.config import DEFAULT_CACHE_DIR  # noqa: E402
from sandboxd.templates.builder import TemplateStore  # noqa: E402

CREATE_BODY = {"template": "standard"}


def bench_sandboxd(url: str, key: str, sequential: int, concurrent: int, execs: int) -> dict:
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    sequential_timings = api_lifecycle(client, CREATE_BODY, sequential, execs)

    async def concurrent_creates() -> tuple[list[float], float]:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as ac:

            async def one() -> tuple[float, str]:
                start = time.perf_counter()
                response = await ac.post("/v1/sandboxes", json=CREATE_BODY)
                response.raise_for_status()
                return time.perf_counter() - start, response.json()["vm_id"]

            wall = time.perf_counter()
            results = await asyncio.gather(*(one() for _ in range(concurrent)))
            wall = time.perf_counter() - wall
            await asyncio.gather(*(ac.delete(f"/v1/sandboxes/{vm_id}") for _, vm_id in results))
            return [latency for latency, _ in results], wall

    concurrent_latencies, wall = asyncio.run(concurrent_creates())
    return {
        "create_sequential": sequential_timings["create"],
        "create_concurrent": summary(concurrent_latencies) | {"wall_ms": round(wall * 1000, 1)},
        "exec_true": sequential_timings["exec_true"],
        "destroy": sequential_timings["destroy"],
    }


def bench_crun(rootfs: Path, sequential: int, execs: int) -> dict:
    timings = bare_lifecycle(BareCrun(rootfs), sequential, execs)
    return {"create_sequential": timings.pop("create"), **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--key")
    parser.add_argument("--sequential", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=10)
    parser.add_argument("--execs", type=int, default=200)
    args = parser.parse_args()

    image = TemplateStore(DEFAULT_CACHE_DIR).get("standard")
    if image is None:
        sys.exit("build the template first: sandboxd template build standard")
    server = nullcontext((args.url, args.key, None)) if args.url else sandboxd_server("--cpu-overcommit", "64")
    with server as (url, key, _pid):
        ours = bench_sandboxd(url, key, args.sequential, args.concurrent, args.execs)
    peer = bench_crun(image.rootfs, args.sequential, args.execs)
    ratios = {
        phase: round(ours[phase]["p50_ms"] / peer[phase]["p50_ms"], 2)
        for phase in ("create_sequential", "exec_true", "destroy")
    }
    print(json.dumps({"sandboxd": ours, "bare_crun": peer, "ratio_p50_sandboxd_over_crun": ratios}, indent=2))


if __name__ == "__main__":
    main()
