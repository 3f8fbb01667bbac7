"""Idle memory per sandbox (PSS of host-side processes + everything inside), N sandboxes.

    .venv/bin/python bench/idle_memory.py [--count 100]

PSS splits shared pages (the template's python3 and libc, mapped by every sandbox from the
same lower layer) fairly among the processes that map them. Host-side cost is the growth of
the `sandboxd serve` process. The peer is bare crun running `sleep infinity` per container.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import BareCrun, sandboxd_server  # noqa: E402
from sandboxd.config import DEFAULT_CACHE_DIR  # noqa: E402
from sandboxd.templates.builder import TemplateStore  # noqa: E402


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cgroup_pids(name: str) -> list[int]:
    pids = []
    for procs in glob.glob(f"/sys/fs/cgroup/memory/{name}/cgroup.procs"):
        pids += [int(line) for line in Path(procs).read_text().split()]
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    image = TemplateStore(DEFAULT_CACHE_DIR).get("standard")
    if image is None:
        sys.exit("build the template first: sandboxd template build standard")

    with sandboxd_server("--cpu-overcommit", "128", "--memory-overcommit", "8") as (url, key, server_pid):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        client.get("/v1/sandboxes")
        server_before = pss_kib(server_pid)
        ids = []
        for _ in range(args.count):
            response = client.post("/v1/sandboxes", json={"template": "standard", "idle_timeout_seconds": 3600})
            response.raise_for_status()
            ids.append(response.json()["vm_id"])
        time.sleep(2)  # let every agent settle into idle
        inside = sum(pss_kib(pid) for vm_id in ids for pid in cgroup_pids(vm_id))
        server_growth = max(0, pss_kib(server_pid) - server_before)
        for vm_id in ids:
            client.delete(f"/v1/sandboxes/{vm_id}")

    bare = BareCrun(image.rootfs)
    try:
        names = [f"bare{index:06d}" for index in range(args.count)]
        for name in names:
            bare.create(name)
        time.sleep(1)
        peer_inside = sum(pss_kib(pid) for name in names for pid in cgroup_pids(name))
        for name in names:
            bare.destroy(name)
    finally:
        bare.close()

    ours_mib = (inside + server_growth) / args.count / 1024
    peer_mib = peer_inside / args.count / 1024
    print(json.dumps({
        "count": args.count,
        "sandboxd_per_sandbox_mib": round(ours_mib, 2),
        "sandboxd_inside_per_sandbox_mib": round(inside / args.count / 1024, 2),
        "sandboxd_host_side_per_sandbox_mib": round(server_growth / args.count / 1024, 2),
        "bare_crun_sleep_per_container_mib": round(peer_mib, 2),
        "ratio": round(ours_mib / peer_mib, 1) if peer_mib else None,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
