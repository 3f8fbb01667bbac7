"""The `microvm` runtime: create → 201 restored from a saved VM state vs cold boot, exec
round trip, idle memory per sandbox, beside a bare QEMU of the same kernel and images.

    .venv/bin/python bench/microvm.py [--restores 8] [--cold 3] [--execs 30] [--idle 3]

One `sandboxd serve --runtime microvm`. Restore: sequential creates of the standard
template (its VM state saved beforehand). Cold boot: the saved state is deleted before each
create (the runtime saves it again in the background; the next round waits for that).
Idle memory: PSS of each QEMU process with `--idle` sandboxes idle. The bare peer, in the
same run: `qemu-system-x86_64` with the same argv sandboxd uses (same kernel, initramfs,
rootfs, disk and guest-code images), started directly in a scratch namespace with no
cgroups, API or network set-up: cold until the guest agent asks for its boot config,
restore until the restored agent has taken it. Prints one JSON document with p50/p95 and
ratios. The accelerator is what the worker probed (TCG on KVM-PVM hosts: KVM cannot be
measured there). Compare ratios, not absolutes: other load on the host moves both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import sandboxd_server, summary  # noqa: E402
from bench.idle_memory import pss_kib  # noqa: E402
from sandboxd.config import DEFAULT_CACHE_DIR  # noqa: E402
from sandboxd.runtime import microvm  # noqa: E402

CACHE = DEFAULT_CACHE_DIR / "microvm"
SNAPSHOT_WAIT_S = 900.0


def _vm_json(data_dir: Path, vm_id: str) -> dict:
    return json.loads((data_dir / "sandboxes" / vm_id / "runtime" / "vm.json").read_text())


def _wait_snapshot(key: str) -> None:
    deadline = time.monotonic() + SNAPSHOT_WAIT_S
    while not (CACHE / "snapshots" / key / "meta.json").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the VM state was not saved")
        time.sleep(0.2)


def _data_dir(server_pid: int) -> Path:
    """The throwaway server's data dir (bench/_harness.py passes it in the environment)."""
    environ = Path(f"/proc/{server_pid}/environ").read_bytes().split(b"\0")
    return Path(next(e for e in environ if e.startswith(b"SANDBOXD_DATA_DIR=")).split(b"=", 1)[1].decode())


def _qemu_pid(vm_id: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64.*/microvm/{vm_id}/"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def bench_api(url: str, key: str, data_dir: Path, args) -> tuple[dict, str]:
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
    body = {"template": "standard", "runtime": "microvm"}

    def create() -> tuple[str, float]:
        start = time.perf_counter()
        response = client.post("/v1/sandboxes", json=body)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        return response.json()["vm_id"], elapsed

    warm, _ = create()  # builds the images (once) and, in the background, the saved state
    shape_key = _vm_json(data_dir, warm)["snapshot"]
    client.delete(f"/v1/sandboxes/{warm}").raise_for_status()
    _wait_snapshot(shape_key)

    restore, exec_true, phases, destroy = [], [], [], []
    for _ in range(args.restores):
        vm_id, elapsed = create()
        restore.append(elapsed)
        info = _vm_json(data_dir, vm_id)
        assert info["started_from"] == "snapshot", info
        phases.append(info["phases_ms"])
        if not exec_true:
            for _ in range(args.execs):
                start = time.perf_counter()
                client.post(f"/v1/sandboxes/{vm_id}/exec", json={"command": "true"}).raise_for_status()
                exec_true.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.delete(f"/v1/sandboxes/{vm_id}").raise_for_status()
        destroy.append(time.perf_counter() - start)

    idle = [create()[0] for _ in range(args.idle)]
    time.sleep(5)  # let them settle
    pss = [pss_kib(_qemu_pid(vm_id)) / 1024 for vm_id in idle]
    for vm_id in idle:
        client.delete(f"/v1/sandboxes/{vm_id}").raise_for_status()

    cold = []
    for _ in range(args.cold):
        shutil.rmtree(CACHE / "snapshots" / shape_key)
        vm_id, elapsed = create()
        assert _vm_json(data_dir, vm_id)["started_from"] == "cold_boot"
        cold.append(elapsed)
        client.delete(f"/v1/sandboxes/{vm_id}").raise_for_status()
        _wait_snapshot(shape_key)  # saved again in the background: never overlaps the next create

    return {
        "create_restore": summary(restore),
        "create_cold_boot": summary(cold),
        "exec_true": summary(exec_true),
        "destroy": summary(destroy),
        "restore_phases_ms_median": {p: sorted(x[p] for x in phases)[len(phases) // 2] for p in phases[0]},
        "idle_qemu_pss_mib": round(sum(pss) / len(pss), 1),
    }, shape_key


async def bench_bare(shape_key: str, cold_runs: int, restore_runs: int) -> dict:
    """QEMU alone with sandboxd's argv: no API, cgroups, NAT or identity beyond the boot config."""
    runtime = await microvm.MicrovmRuntime.create(Path(tempfile.mkdtemp(prefix="bare-qemu-", dir="/run")), CACHE)
    snapshot = CACHE / "snapshots" / shape_key
    meta = json.loads((snapshot / "meta.json").read_text())["shape"]
    shape = microvm.Shape(**{**meta, "nameservers": tuple(meta["nameservers"])})
    rootfs, code = CACHE / shape.rootfs_image, CACHE / shape.code_image
    netns = "sbdbench-bare"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "tuntap", "add", "dev", microvm.TAP, "mode", "tap"], check=True)
    cold, restore, pss = [], [], []
    try:
        for index in range(cold_runs + restore_runs):
            restoring = index >= cold_runs
            run = Path(tempfile.mkdtemp(prefix="bare-vm-", dir="/run"))
            try:
                if restoring:
                    subprocess.run(["cp", "--sparse=always", str(snapshot / "upper.img"), str(run / "disk.img")], check=True)
                else:
                    await microvm._make_upper(run / "disk.img", shape.disk_mib)
                argv = runtime._qemu_argv(shape, rootfs, code, run / "disk.img", run, run / "console.log")
                if restoring:
                    argv += ["-incoming", f"exec:cat {snapshot / 'vm.state'}"]
                start = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    "nsenter", f"--net=/var/run/netns/{netns}", "--", *argv, stderr=asyncio.subprocess.PIPE
                )
                try:
                    if restoring:
                        boot = {"protocol": 1, "vm_id": "bare", "hostname": "bare", "token": "t", "vm": {}}
                        while not (run / "boot.sock").exists():
                            await asyncio.sleep(0.002)
                        await microvm._deliver_boot(run / "boot.sock", boot, run / "console.log")
                        restore.append(time.perf_counter() - start)
                        await asyncio.sleep(5)
                        pss.append(pss_kib(proc.pid) / 1024)
                    else:
                        await microvm._await_boot_prompt(run / "boot.sock", proc, run / "console.log")
                        cold.append(time.perf_counter() - start)
                finally:
                    proc.kill()
                    await proc.wait()
            finally:
                shutil.rmtree(run, ignore_errors=True)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(runtime.runs.parent, ignore_errors=True)
    return {
        "accelerator": runtime.accelerator,
        "boot_cold_until_agent_waits": summary(cold),
        "restore_until_agent_booted": summary(restore),
        "idle_qemu_pss_mib": round(sum(pss) / len(pss), 1) if pss else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--restores", type=int, default=8)
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--execs", type=int, default=30)
    parser.add_argument("--idle", type=int, default=3)
    args = parser.parse_args()
    result: dict = {}
    with sandboxd_server("--runtime", "microvm") as (url, key, pid):
        result["sandboxd"], shape_key = bench_api(url, key, _data_dir(pid), args)
    result["bare_qemu"] = asyncio.run(bench_bare(shape_key, args.cold, args.restores))
    s, b = result["sandboxd"], result["bare_qemu"]
    result["accelerator"] = b["accelerator"]
    result["ratios"] = {
        "restore_over_cold_boot": round(s["create_restore"]["p50_ms"] / s["create_cold_boot"]["p50_ms"], 3),
        "create_restore_over_bare_restore": round(s["create_restore"]["p50_ms"] / b["restore_until_agent_booted"]["p50_ms"], 2),
        "create_cold_over_bare_cold": round(s["create_cold_boot"]["p50_ms"] / b["boot_cold_until_agent_waits"]["p50_ms"], 2),
        "idle_pss_over_bare": round(s["idle_qemu_pss_mib"] / b["idle_qemu_pss_mib"], 2) if b["idle_qemu_pss_mib"] else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
