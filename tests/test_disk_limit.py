"""The writable layer's size limit: a sandbox that fills its disk gets ENOSPC, not the host."""

from __future__ import annotations

import glob
import os

import pytest

from tests.helpers import exec_ok, host_leaks, kill_sandbox

# The writable layer is a loop-mounted ext4 image on the host for these runtimes (the
# microVM's is a disk of the VM: tests/test_microvm.py)
pytestmark = pytest.mark.only_runtimes("oci", "gvisor")

LIMIT_MIB = 2048  # the standard template's resources.disk_mib


def _host_free_mib(path: str) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 2**20


def _allocated_mib(path) -> float:
    return os.stat(path).st_blocks * 512 / 2**20


def test_filling_the_disk_gives_enospc_inside_and_spares_the_host(server, alice, sandbox):
    df = exec_ok(alice, sandbox, "df -m --output=size,avail / | tail -1")["output"].split()
    assert abs(int(df[0]) - LIMIT_MIB) < LIMIT_MIB * 0.05, df  # the sandbox sees its limit
    free_before = _host_free_mib(str(server.data_dir))
    fill = exec_ok(alice, sandbox, f"dd if=/dev/zero of=/workspace/big bs=4M count={LIMIT_MIB // 4 + 64} 2>&1",
                   timeout_seconds=300)  # fmt: skip
    assert fill["exit_code"] != 0 and "No space left on device" in fill["output"], fill
    written = exec_ok(alice, sandbox, "stat -c %s /workspace/big")["output"]
    assert int(written) <= LIMIT_MIB * 2**20
    # on the host, the sandbox's writes take at most the limit (its image is sparse)
    image = server.data_dir / "sandboxes" / sandbox / "runtime" / "disk.img"
    assert _allocated_mib(image) <= LIMIT_MIB + 1
    assert free_before - _host_free_mib(str(server.data_dir)) < LIMIT_MIB + 1024  # others run beside us
    topup = exec_ok(alice, sandbox, "dd if=/dev/zero of=/workspace/rest bs=4k 2>&1")  # the last few blocks
    assert topup["exit_code"] != 0 and "No space left on device" in topup["output"], topup
    # an upload into the full disk is a clear 413, and leaves no partial file behind
    upload = alice.put(f"/v1/sandboxes/{sandbox}/files", params={"path": "/workspace/up.bin"},
                       content=b"x" * (8 * 2**20))  # fmt: skip
    assert upload.status_code == 413, upload.text
    assert upload.json()["error"]["code"] == "no_space"
    assert exec_ok(alice, sandbox, "test -e /workspace/up.bin; echo $?")["output"] == "1\n"
    exec_ok(alice, sandbox, "rm /workspace/rest")
    # deleting the file frees the space (inside, and on the host: the image is mounted with discard)
    exec_ok(alice, sandbox, "rm /workspace/big && sync")
    assert exec_ok(alice, sandbox, "echo works > /workspace/after && cat /workspace/after")["output"] == "works\n"
    assert _allocated_mib(image) < 256  # mounted with discard: the host got the space back


def test_destroy_leaves_no_loop_device_or_mount(server, alice):
    vm_id = alice.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    image = server.data_dir / "sandboxes" / vm_id / "runtime" / "disk.img"
    backing = [open(p).read().strip() for p in glob.glob("/sys/block/loop*/loop/backing_file")]
    assert str(image) in backing
    with open("/proc/mounts") as mounts:
        assert any(f"/{vm_id}/runtime/layer" in line for line in mounts)
    assert alice.delete(f"/v1/sandboxes/{vm_id}").status_code == 200
    assert not [leak for leak in host_leaks() if vm_id in leak]
    assert not image.exists()


def test_restart_keeps_survivors_layer_and_reclaims_the_dead(tmp_path):
    from tests.helpers import Server

    def loops() -> set[str]:
        return {open(p).read().strip() for p in glob.glob("/sys/block/loop*/loop/backing_file")}

    srv = Server().start()
    key = srv.create_key("dora")
    try:
        with srv.client(key) as client:
            survivor = client.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
            victim = client.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
            exec_ok(client, survivor, "echo kept > /workspace/state")
        images = {vm: str(srv.data_dir / "sandboxes" / vm / "runtime" / "disk.img") for vm in (survivor, victim)}
        assert set(images.values()) <= loops()
        srv.kill()
        kill_sandbox(victim)  # dies while nobody watches
        srv.start()
        assert images[victim] not in loops() and images[survivor] in loops()
        with srv.client(key) as client:
            assert exec_ok(client, survivor, "cat /workspace/state")["output"] == "kept\n"
            client.delete(f"/v1/sandboxes/{survivor}")
        assert not [leak for leak in host_leaks() if survivor in leak or victim in leak]
    finally:
        srv.kill()
        srv.start()
        srv.destroy_all([key])
        srv.stop()
        srv.remove_data()


def test_disk_mib_in_template_resources():
    import pytest

    from sandboxd.templates.builder import spec_digest
    from sandboxd.templates.spec import TemplateSpecError, load_builtin, loads

    assert load_builtin("standard").resources.disk_mib == LIMIT_MIB
    assert loads('name = "t"').resources.disk_mib == 2048  # the default
    small = loads('name = "t"\n[resources]\ndisk_mib = 100')
    assert small.resources.disk_mib == 100
    assert spec_digest(small) == spec_digest(loads('name = "t"'))  # not a build input: no rebuild
    for bad in ("10", "0", '"big"'):
        with pytest.raises(TemplateSpecError, match="disk_mib"):
            loads(f'name = "t"\n[resources]\ndisk_mib = {bad}')
