"""Shared bench plumbing: a throwaway `sandboxd serve`, percentiles, and a bare-crun peer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from sandboxd.runtime.oci import enter_legacy_cgroup_view, host_is_cgroup_hybrid


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(samples: list[float]) -> dict:
    return {
        "n": len(samples),
        "p50_ms": round(percentile(samples, 50) * 1000, 2),
        "p95_ms": round(percentile(samples, 95) * 1000, 2),
        "mean_ms": round(statistics.fmean(samples) * 1000, 2),
    }


@contextmanager
def sandboxd_server(*extra: str):
    """Start `sandboxd serve` on a free port with a temp data dir; yield (url, api_key, pid)."""
    data_dir = Path(tempfile.mkdtemp(prefix="sbd-bench-", dir="/tmp"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, SANDBOXD_DATA_DIR=str(data_dir))
    log = open(data_dir.with_suffix(".log"), "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "serve", "--listen", f"127.0.0.1:{port}", *extra],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise TimeoutError("server did not start")
        key = subprocess.run(
            [sys.executable, "-m", "sandboxd", "keys", "create", "--user", "bench"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        yield url, key, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.with_suffix(".log").unlink(missing_ok=True)


class BareCrun:
    """The peer: crun itself on the same rootfs (read-only, no overlay, no network set-up),
    with `sleep infinity` as init and `crun exec` for commands."""

    def __init__(self, rootfs: Path):
        self.rootfs = rootfs
        self.root = Path(tempfile.mkdtemp(prefix="bare-crun-", dir="/run"))
        self.preexec = enter_legacy_cgroup_view if host_is_cgroup_hybrid() else None
        spec_dir = self.root / "spec"
        spec_dir.mkdir()
        subprocess.run(["crun", "spec"], cwd=spec_dir, check=True)
        self.config = json.loads((spec_dir / "config.json").read_text())
        self.config["root"] = {"path": str(self.rootfs), "readonly": True}
        self.config["process"]["args"] = ["sleep", "infinity"]
        self.config["process"]["terminal"] = False

    def _crun(self, *args: str, cwd: Path | None = None) -> None:
        subprocess.run(
            ["crun", "--root", str(self.root / "state"), *args],
            cwd=cwd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=self.preexec,
        )  # fmt: skip

    def create(self, name: str) -> None:
        bundle = self.root / name
        bundle.mkdir()
        config = dict(self.config, linux=dict(self.config["linux"], cgroupsPath="/" + name))
        (bundle / "config.json").write_text(json.dumps(config))
        self._crun("run", "-d", "--bundle", str(bundle), name, cwd=bundle)

    def exec(self, name: str) -> None:
        self._crun("exec", name, "true")

    def exec_first_output(self, name: str, command: str) -> tuple[float, float]:
        """`crun exec NAME sh -c COMMAND`: seconds to its first byte of stdout, and to its end."""
        start = time.perf_counter()
        process = subprocess.Popen(
            ["crun", "--root", str(self.root / "state"), "exec", name, "/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=self.preexec,
        )  # fmt: skip
        first = process.stdout.read(1)
        first_at = time.perf_counter() - start
        process.stdout.read()
        process.wait()
        if not first or process.returncode != 0:
            raise RuntimeError(f"crun exec failed ({process.returncode})")
        return first_at, time.perf_counter() - start

    def destroy(self, name: str) -> None:
        self._crun("delete", "--force", name)
        shutil.rmtree(self.root / name)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def bare_lifecycle(bare, sequential: int, execs: int) -> dict:
    """create / exec `true` / destroy timings of a bare runtime peer (BareCrun or alike)."""
    create, destroy, exec_true = [], [], []
    try:
        for index in range(sequential):
            name = f"bare{index:06d}"  # fixed width: runsc matches IDs by prefix
            start = time.perf_counter()
            bare.create(name)
            create.append(time.perf_counter() - start)
            if not exec_true:
                for _ in range(execs):
                    start = time.perf_counter()
                    bare.exec(name)
                    exec_true.append(time.perf_counter() - start)
            start = time.perf_counter()
            bare.destroy(name)
            destroy.append(time.perf_counter() - start)
    finally:
        bare.close()
    return {"create": summary(create), "exec_true": summary(exec_true), "destroy": summary(destroy)}


def api_lifecycle(client: httpx.Client, create_body: dict, sequential: int, execs: int) -> dict:
    """create → 201 / exec `true` / destroy timings through the API, one sandbox at a time
    (the execs run in the first sandbox)."""
    create, destroy, exec_true = [], [], []
    for _ in range(sequential):
        start = time.perf_counter()
        response = client.post("/v1/sandboxes", json=create_body)
        create.append(time.perf_counter() - start)
        response.raise_for_status()
        vm_id = response.json()["vm_id"]
        if not exec_true:
            for _ in range(execs):
                start = time.perf_counter()
                client.post(f"/v1/sandboxes/{vm_id}/exec", json={"command": "true"}).raise_for_status()
                exec_true.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.delete(f"/v1/sandboxes/{vm_id}").raise_for_status()
        destroy.append(time.perf_counter() - start)
    return {"create": summary(create), "exec_true": summary(exec_true), "destroy": summary(destroy)}
