"""Create / exec / destroy latency per runtime (oci vs gvisor), each beside its bare peer.

    .venv/bin/python bench/runtimes.py [--sequential 15] [--execs 50]

One `sandboxd serve` (gvisor offered when runsc is installed); for each runtime,
sequential create → `exec true` × execs (first sandbox only) → destroy through the API.
Peers, in the same run: bare `crun` and bare `runsc run` (the platform the worker probed,
`--network=none`) on the same rootfs with `sleep infinity` as init and `<binary> exec
true` for commands. Prints one JSON document with p50/p95 and ratios (gvisor / oci, and
sandboxd / bare per runtime). Compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import BareCrun, api_lifecycle, bare_lifecycle, sandboxd_server  # noqa: E402
from sandboxd.config import DEFAULT_CACHE_DIR  # noqa: E402
from sandboxd.runtime.gvisor import hide_proc_sys_net, probe_platform, runsc_path  # noqa: E402
from sandboxd.templates.builder import TemplateStore  # noqa: E402


class BareRunsc(BareCrun):
    """`runsc run -detach` on the same rootfs; no network (`--network=none`)."""

    def __init__(self, rootfs: Path, platform: str):
        super().__init__(rootfs)
        self.flags = [f"--platform={platform}", "--network=none"]
        self.preexec = hide_proc_sys_net
        self.config["linux"]["namespaces"] = [
            ns for ns in self.config["linux"]["namespaces"] if ns["type"] != "network"
        ]

    def _crun(self, *args: str, cwd: Path | None = None) -> None:
        subprocess.run(
            ["runsc", *self.flags, "--root", str(self.root / "state"), *("--detach" if a == "-d" else a for a in args)],
            cwd=cwd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=self.preexec,
        )  # fmt: skip


def bench_api(url: str, key: str, runtime: str, sequential: int, execs: int) -> dict:
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    return api_lifecycle(client, {"template": "standard", "runtime": runtime}, sequential, execs)


def _ratios(a: dict, b: dict) -> dict:
    return {phase: round(a[phase]["p50_ms"] / b[phase]["p50_ms"], 2) for phase in a if b[phase]["p50_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequential", type=int, default=15)
    parser.add_argument("--execs", type=int, default=50)
    args = parser.parse_args()
    image = TemplateStore(DEFAULT_CACHE_DIR).get("standard")
    if image is None:
        sys.exit("build the standard template first: sandboxd template build standard")
    platform = asyncio.run(probe_platform()) if runsc_path() else None
    runtimes = ["oci"] + (["gvisor"] if platform else [])
    result: dict = {"gvisor_platform": platform, "sandboxd": {}, "bare": {}}
    with sandboxd_server() as (url, key, _pid):
        for runtime in runtimes:
            result["sandboxd"][runtime] = bench_api(url, key, runtime, args.sequential, args.execs)
    result["bare"]["crun"] = bare_lifecycle(BareCrun(image.rootfs), args.sequential, args.execs)
    if platform:
        result["bare"]["runsc"] = bare_lifecycle(BareRunsc(image.rootfs, platform), args.sequential, args.execs)
        result["ratio_gvisor_over_oci"] = _ratios(result["sandboxd"]["gvisor"], result["sandboxd"]["oci"])
        result["ratio_gvisor_over_bare_runsc"] = _ratios(result["sandboxd"]["gvisor"], result["bare"]["runsc"])
    result["ratio_oci_over_bare_crun"] = _ratios(result["sandboxd"]["oci"], result["bare"]["crun"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
