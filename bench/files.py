"""Files API throughput and memory: a 1 GiB upload and download through the API, side by side
with plain peers on the same host, with the RSS of `sandboxd serve` and of the guest agent.

    .venv/bin/python bench/files.py [--size-mib 1024]

Rows (MB/s, 1 MB = 10^6 bytes):
  api_upload_httpx / api_download_httpx  Python httpx client, data generated on the fly
  api_upload_curl  / api_download_curl   curl -T FILE / curl -o /dev/null through the API
  peer_static_download_curl              curl from `python3 -m http.server` on loopback (same file)
  peer_dd_in_sandbox                     `dd` writing the same amount to /workspace inside the sandbox
  peer_cat_pipe_in_sandbox               `cat dd.bin | cat > /dev/null` inside the sandbox (read ceiling)
RSS: serve's VmRSS sampled every 20 ms (baseline, peak per transfer, VmHWM) and the agent's.
Prints one JSON document with ratios (API / peer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import sandboxd_server  # noqa: E402

MB = 1_000_000
CHUNK = 1024 * 1024


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples VmRSS of some pids every 20 ms; `peak_mib(name)` since the last reset."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.peaks = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks[name], _status_kib(pid, "VmRSS"))

    def reset(self) -> dict[str, float]:
        now = {name: round(_status_kib(pid, "VmRSS") / 1024, 1) for name, pid in self.pids.items()}
        self.peaks = {name: 0 for name in self.pids}
        return now

    def peak_mib(self) -> dict[str, float]:
        return {name: round(kib / 1024, 1) for name, kib in self.peaks.items()}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def agent_pid(vm_id: str) -> int:
    for controller in ("memory", "pids", "cpu,cpuacct", "unified"):
        procs = Path(f"/sys/fs/cgroup/{controller}/{vm_id}/cgroup.procs")
        if procs.exists():
            for pid in procs.read_text().split():
                try:
                    if b"agent.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return int(pid)
                except OSError:
                    continue
    raise RuntimeError(f"no guest agent found for {vm_id}")


def generated(total: int, digest):
    """1 MiB pieces of pseudo-random data made on the fly (a block re-keyed per piece)."""
    block = bytearray(os.urandom(CHUNK))
    sent = 0
    i = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        block[:8] = i.to_bytes(8, "little")
        piece = bytes(block[:n])
        digest.update(piece)
        sent += n
        i += 1
        yield piece


def timed(label: str, size: int, fn, sampler: RssSampler, results: dict) -> None:
    before = sampler.reset()
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    results[label] = {
        "seconds": round(elapsed, 2),
        "mb_per_s": round(size / elapsed / MB, 1),
        "rss_before_mib": before,
        "rss_peak_mib": sampler.peak_mib(),
    }
    print(f"{label}: {results[label]['mb_per_s']} MB/s, peak RSS {results[label]['rss_peak_mib']}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    results: dict = {}
    work = Path(tempfile.mkdtemp(prefix="bench-files-", dir="/tmp"))
    big = work / "big.bin"
    with open(big, "wb") as f:  # the peers' file (curl -T, http.server), written piecewise
        for piece in generated(size, hashlib.sha256()):
            f.write(piece)
    static = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0", "-d", str(work)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = static.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N ..."
        static_port = int(line.split(" port ")[1].split()[0])
        with sandboxd_server() as (url, key, serve_pid):
            auth = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=url, headers=auth, timeout=600) as client:
                vm_id = client.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
                files = f"/v1/sandboxes/{vm_id}/files"
                sampler = RssSampler({"serve": serve_pid, "agent": agent_pid(vm_id)})
                try:
                    def sh(command: str) -> str:
                        r = client.post(f"/v1/sandboxes/{vm_id}/exec", json={"command": command, "timeout_seconds": 600})
                        out = r.json()
                        assert out["exit_code"] == 0, out
                        return out["stdout"]

                    # warm-up (imports, pools, allocator arenas), so the baseline is the steady state
                    warm = hashlib.sha256()
                    client.put(files, params={"path": "warm.bin"}, content=generated(16 * CHUNK, warm))
                    with client.stream("GET", files, params={"path": "warm.bin"}) as r:
                        for _ in r.iter_raw(CHUNK):
                            pass
                    sh("rm -f warm.bin")
                    time.sleep(0.5)

                    # --- through the API, Python client
                    up_digest = hashlib.sha256()

                    def httpx_upload():
                        r = client.put(files, params={"path": "up.bin"}, content=generated(size, up_digest))
                        assert r.status_code == 201, r.text

                    timed("api_upload_httpx", size, httpx_upload, sampler, results)
                    assert sh("sha256sum up.bin").split()[0] == up_digest.hexdigest(), "upload corrupted"

                    def httpx_download():
                        digest = hashlib.sha256()
                        n = 0
                        with client.stream("GET", files, params={"path": "up.bin"}) as r:
                            for piece in r.iter_raw(CHUNK):
                                n += len(piece)
                                digest.update(piece)
                        assert n == size and digest.hexdigest() == up_digest.hexdigest(), "download corrupted"

                    timed("api_download_httpx", size, httpx_download, sampler, results)
                    sh("rm -f up.bin")

                    # --- through the API, curl (the same client as the static-server peer)
                    curl = ["curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {key}", "-o", "/dev/null"]
                    timed("api_upload_curl", size, lambda: subprocess.run(
                        [*curl, "-T", str(big), f"{url}{files}?path=curl.bin"], check=True), sampler, results)
                    timed("api_download_curl", size, lambda: subprocess.run(
                        [*curl, f"{url}{files}?path=curl.bin"], check=True), sampler, results)

                    # --- peers
                    timed("peer_static_download_curl", size, lambda: subprocess.run(
                        ["curl", "-sS", "--fail", "-o", "/dev/null", f"http://127.0.0.1:{static_port}/big.bin"],
                        check=True), sampler, results)
                    sh("rm -f curl.bin && sync")  # the writable layer is 2 GiB: make room for dd
                    timed("peer_dd_in_sandbox", size, lambda: sh(
                        f"dd if=/dev/zero of=/workspace/dd.bin bs=1M count={args.size_mib} 2>/dev/null"),
                        sampler, results)
                    timed("peer_cat_pipe_in_sandbox", size, lambda: sh("cat dd.bin | cat > /dev/null"),
                          sampler, results)
                    serve_hwm = round(_status_kib(serve_pid, "VmHWM") / 1024, 1)
                    agent_hwm = round(_status_kib(sampler.pids["agent"], "VmHWM") / 1024, 1)
                finally:
                    sampler.stop()
                    client.delete(f"/v1/sandboxes/{vm_id}")
    finally:
        static.terminate()
        static.wait()
        big.unlink(missing_ok=True)
        work.rmdir()

    def ratio(a: str, b: str) -> float:
        return round(results[a]["mb_per_s"] / results[b]["mb_per_s"], 2)

    serve_base = results["api_upload_httpx"]["rss_before_mib"]["serve"]
    serve_peak = max(r["rss_peak_mib"]["serve"] for k, r in results.items() if k.startswith("api_"))
    agent_base = results["api_upload_httpx"]["rss_before_mib"]["agent"]
    agent_peak = max(r["rss_peak_mib"]["agent"] for k, r in results.items() if k.startswith("api_"))
    print(json.dumps({
        "size_mib": args.size_mib,
        "results": results,
        "ratios": {
            "api_download_curl / static_download_curl": ratio("api_download_curl", "peer_static_download_curl"),
            "api_upload_curl / dd_in_sandbox": ratio("api_upload_curl", "peer_dd_in_sandbox"),
            "api_download_curl / cat_pipe_in_sandbox": ratio("api_download_curl", "peer_cat_pipe_in_sandbox"),
            "api_upload_httpx / api_upload_curl": ratio("api_upload_httpx", "api_upload_curl"),
        },
        "rss_mib": {
            "serve_baseline": serve_base, "serve_peak_during_api_transfers": serve_peak,
            "serve_growth": round(serve_peak - serve_base, 1), "serve_vmhwm": serve_hwm,
            "agent_baseline": agent_base, "agent_peak_during_api_transfers": agent_peak,
            "agent_growth": round(agent_peak - agent_base, 1), "agent_vmhwm": agent_hwm,
        },
    }, indent=2))


if __name__ == "__main__":
    main()
