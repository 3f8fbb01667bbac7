"""The Files API end to end: real server, real sandboxes, every operation and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import socket
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import assert_error, exec_ok, guest_agent, wait_for


def B(vm_id: str) -> str:
    return f"/v1/sandboxes/{vm_id}/files"


def sh(client, vm_id, command) -> str:
    result = exec_ok(client, vm_id, command)
    assert result["exit_code"] == 0, result
    return result["stdout"]


def agent_status(server, vm_id) -> dict:
    """Asks the sandbox's guest agent directly (the worker's view of it)."""
    with guest_agent(server, vm_id) as agent:
        return agent.get("/status").json()


def make_tar(members) -> bytes:
    """members: (name, kind, payload) with kind file|dir|symlink|hardlink|fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if kind == "file":
                info.size = len(payload)
                info.mode = 0o640
                tar.addfile(info, io.BytesIO(payload))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o750
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info)
    return buf.getvalue()


# --- single files -----------------------------------------------------------------------


def test_upload_download_binary_round_trip_with_mode_and_parents(alice, sandbox):
    data = os.urandom(5 * 1024 * 1024 + 123) + bytes(range(256)) + b"\0\r\n\xff"
    r = alice.put(B(sandbox), params={"path": "deep/er/blob.bin", "parents": "true", "mode": "0600"}, content=data)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["path"] == "/workspace/deep/er/blob.bin" and info["type"] == "file"
    assert info["size"] == len(data) and info["mode"] == "0600"
    assert sh(alice, sandbox, "sha256sum deep/er/blob.bin").split()[0] == hashlib.sha256(data).hexdigest()
    assert sh(alice, sandbox, "stat -c %a deep/er/blob.bin").strip() == "600"

    r = alice.get(B(sandbox), params={"path": "/workspace/deep/er/blob.bin"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-file-size"] == str(len(data)) and r.headers["x-file-mode"] == "0600"
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(data).hexdigest()

    # streamed upload of a generator (chunked, no length), replacing the file: keeps its mode
    r = alice.put(B(sandbox), params={"path": "deep/er/blob.bin"}, content=(bytes([i]) * 65536 for i in range(40)))
    assert r.status_code == 201, r.text
    assert r.json()["size"] == 40 * 65536 and r.json()["mode"] == "0600"
    # empty file, default mode 0644
    r = alice.put(B(sandbox), params={"path": "empty"}, content=b"")
    assert r.status_code == 201 and r.json()["size"] == 0 and r.json()["mode"] == "0644"
    assert alice.get(B(sandbox), params={"path": "empty"}).content == b""


def test_upload_errors(alice, sandbox):
    sh(alice, sandbox, "mkdir -p dir && echo x > file")
    assert_error(alice.put(B(sandbox), params={"path": "no/such/dir/f"}, content=b"x"), 404, "file_not_found", "path")
    assert_error(alice.put(B(sandbox), params={"path": "dir"}, content=b"x"), 400, "is_a_directory", "path")
    # refused before the body is read: still a clean JSON answer with 32 MiB on the wire
    big = (b"b" * 1024 * 1024 for _ in range(32))
    assert_error(alice.put(B(sandbox), params={"path": "no/such/dir/f"}, content=big), 404, "file_not_found", "path")
    assert_error(alice.put(B(sandbox), params={"path": "file/sub"}, content=b"x"), 400, "not_a_directory", "path")
    assert_error(alice.put(B(sandbox), params={"path": "file/sub", "parents": "true"}, content=b"x"), 400,
                 "not_a_directory", "path")
    assert_error(alice.put(B(sandbox), params={"path": "file", "overwrite": "false"}, content=b"y"), 409,
                 "file_exists", "path")
    assert sh(alice, sandbox, "cat file") == "x\n"
    # a refused upload leaves no temporary file behind
    assert ".sandboxd-upload" not in sh(alice, sandbox, "ls -a . dir")


def test_download_errors(alice, sandbox):
    sh(alice, sandbox, "mkdir -p dir && mkfifo fifo")
    assert_error(alice.get(B(sandbox), params={"path": "missing.txt"}), 404, "file_not_found", "path")
    assert_error(alice.get(B(sandbox), params={"path": "dir"}), 400, "is_a_directory", "path")
    assert_error(alice.get(B(sandbox), params={"path": "fifo"}), 400, "not_a_regular_file", "path")
    assert_error(alice.get(B(sandbox)), 400, "missing_field", "path")


@pytest.mark.only_runtimes("oci")  # gVisor ignores /dev's size; tests/test_disk_limit.py fills a real layer
def test_no_space_is_413(alice, sandbox):
    # /dev is a 64 KiB tmpfs inside every sandbox: ENOSPC without filling the real disk
    r = alice.put(B(sandbox), params={"path": "/dev/fill"}, content=b"z" * (1024 * 1024))
    assert_error(r, 413, "no_space", "path")
    assert "fill" not in sh(alice, sandbox, "ls -a /dev")


# --- metadata -----------------------------------------------------------------------------


def test_list_stat_and_depth(alice, sandbox):
    sh(alice, sandbox, "mkdir -p t/a/b/c && echo hi > t/a/f && echo 12345 > t/a/b/g && ln -s a/f t/link && chmod 700 t/a")
    r = alice.get(B(sandbox) + "/list", params={"path": "t"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "/workspace/t" and body["truncated"] is False
    entries = {e["name"]: e for e in body["entries"]}
    assert set(entries) == {"a", "link"}
    assert entries["a"]["type"] == "dir" and entries["a"]["mode"] == "0700"
    assert entries["link"]["type"] == "symlink" and entries["link"]["target"] == "a/f"
    for e in body["entries"]:
        assert set(e) >= {"name", "path", "type", "size", "mode", "mtime"}
    names2 = {e["name"] for e in alice.get(B(sandbox) + "/list", params={"path": "t", "depth": 2}).json()["entries"]}
    assert names2 == {"a", "link", "a/f", "a/b"}
    names9 = {e["name"] for e in alice.get(B(sandbox) + "/list", params={"path": "t", "depth": 9}).json()["entries"]}
    assert names9 == {"a", "link", "a/f", "a/b", "a/b/g", "a/b/c"}
    # default path is /workspace
    assert "t" in {e["name"] for e in alice.get(B(sandbox) + "/list").json()["entries"]}

    st = alice.get(B(sandbox) + "/stat", params={"path": "t/a/b/g"}).json()
    assert st["type"] == "file" and st["size"] == 6 and st["name"] == "g" and st["mtime"].endswith("Z")
    assert alice.get(B(sandbox) + "/stat", params={"path": "t/link"}).json()["type"] == "symlink"

    assert_error(alice.get(B(sandbox) + "/list", params={"path": "t/a/f"}), 400, "not_a_directory", "path")
    assert_error(alice.get(B(sandbox) + "/list", params={"path": "nope"}), 404, "file_not_found", "path")
    assert_error(alice.get(B(sandbox) + "/stat", params={"path": "nope"}), 404, "file_not_found", "path")
    for depth in ("0", "65", "x", "-1", "1.5"):
        assert_error(alice.get(B(sandbox) + "/list", params={"path": "t", "depth": depth}), 400, "invalid_value",
                     "depth")


def test_mkdir_remove_rename(alice, sandbox):
    f = B(sandbox)
    r = alice.post(f + "/mkdir", json={"path": "m1", "mode": "0750"})
    assert r.status_code == 201 and r.json()["type"] == "dir" and r.json()["mode"] == "0750", r.text
    assert_error(alice.post(f + "/mkdir", json={"path": "m1"}), 409, "file_exists", "path")
    assert alice.post(f + "/mkdir", json={"path": "m1", "exist_ok": True}).status_code == 201
    assert_error(alice.post(f + "/mkdir", json={"path": "x/y/z"}), 404, "file_not_found", "path")
    assert alice.post(f + "/mkdir", json={"path": "x/y/z", "parents": True}).status_code == 201
    assert sh(alice, sandbox, "test -d x/y/z && echo ok") == "ok\n"
    alice.put(f, params={"path": "x/file"}, content=b"data")
    assert_error(alice.post(f + "/mkdir", json={"path": "x/file/sub"}), 400, "not_a_directory", "path")

    # rename
    r = alice.post(f + "/rename", json={"from": "x/file", "to": "x/renamed"})
    assert r.status_code == 200 and r.json()["path"] == "/workspace/x/renamed", r.text
    assert alice.get(f, params={"path": "x/renamed"}).content == b"data"
    alice.put(f, params={"path": "other"}, content=b"other")
    assert_error(alice.post(f + "/rename", json={"from": "other", "to": "x/renamed"}), 409, "file_exists", "to")
    assert alice.post(f + "/rename", json={"from": "other", "to": "x/renamed", "overwrite": True}).status_code == 200
    assert alice.get(f, params={"path": "x/renamed"}).content == b"other"
    assert_error(alice.post(f + "/rename", json={"from": "gone", "to": "g2"}), 404, "file_not_found", "from")
    assert_error(alice.post(f + "/rename", json={"from": "x/renamed", "to": "nodir/g2"}), 404, "file_not_found", "to")
    assert_error(alice.post(f + "/rename", json={"from": "x", "to": "x/y/inside"}), 400, "invalid_path", "to")

    # remove
    assert_error(alice.post(f + "/remove", json={"path": "x"}), 409, "directory_not_empty", "path")
    assert alice.post(f + "/remove", json={"path": "x/renamed"}).json() == {"path": "/workspace/x/renamed",
                                                                           "removed": True}
    assert alice.post(f + "/remove", json={"path": "x", "recursive": True}).status_code == 200
    assert alice.post(f + "/remove", json={"path": "m1"}).status_code == 200
    assert_error(alice.post(f + "/remove", json={"path": "x"}), 404, "file_not_found", "path")
    assert_error(alice.post(f + "/remove", json={"path": "/", "recursive": True}), 400, "invalid_path", "path")
    assert sh(alice, sandbox, "ls -a") == ".\n..\n"
    # removing a symlink to a directory removes the link, never the target's content
    sh(alice, sandbox, "mkdir keep && touch keep/k && ln -s keep ln")
    assert alice.post(f + "/remove", json={"path": "ln", "recursive": True}).status_code == 200
    assert sh(alice, sandbox, "ls keep") == "k\n"


# --- tar ----------------------------------------------------------------------------------


def test_tar_upload_and_download(alice, sandbox):
    payload = os.urandom(300_000)
    tar = make_tar([
        ("proj", "dir", None),
        ("proj/src/main.py", "file", b"print('hi')\n"),
        ("./proj/data.bin", "file", payload),
        ("proj/link", "symlink", "src/main.py"),
        ("proj/hard", "hardlink", "proj/data.bin"),
    ])
    r = alice.post(B(sandbox) + "/upload-tar", params={"path": "up", "parents": "true"}, content=tar)
    assert r.status_code == 201, r.text
    assert r.json() == {"path": "/workspace/up", "files": 2, "dirs": 1, "links": 2, "bytes": 300_012}
    assert sh(alice, sandbox, "cat up/proj/link") == "print('hi')\n"
    assert sh(alice, sandbox, "sha256sum up/proj/hard").split()[0] == hashlib.sha256(payload).hexdigest()
    assert sh(alice, sandbox, "stat -c %a up/proj/data.bin").strip() == "640"

    # compressed too, streamed from a generator
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as t:
        info = tarfile.TarInfo("z.txt")
        info.size = 3
        t.addfile(info, io.BytesIO(b"zzz"))
    raw = gz.getvalue()
    r = alice.post(B(sandbox) + "/upload-tar", params={"path": "up"}, content=(raw[i:i + 7] for i in range(0, len(raw), 7)))
    assert r.status_code == 201, r.text
    assert sh(alice, sandbox, "cat up/z.txt") == "zzz"

    r = alice.get(B(sandbox) + "/download-tar", params={"path": "up"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as t:
        members = {m.name: m for m in t.getmembers()}
        assert set(members) == {"proj", "proj/src", "proj/src/main.py", "proj/data.bin", "proj/link", "proj/hard",
                                "z.txt"}
        assert members["proj/link"].issym() and members["proj/link"].linkname == "src/main.py"
        assert hashlib.sha256(t.extractfile("proj/data.bin").read()).digest() == hashlib.sha256(payload).digest()
        assert t.extractfile("proj/src/main.py").read() == b"print('hi')\n"

    assert_error(alice.get(B(sandbox) + "/download-tar", params={"path": "up/z.txt"}), 400, "not_a_directory", "path")
    assert_error(alice.get(B(sandbox) + "/download-tar", params={"path": "nope"}), 404, "file_not_found", "path")
    assert_error(alice.post(B(sandbox) + "/upload-tar", params={"path": "nope"}, content=tar), 404, "file_not_found",
                 "path")
    assert_error(alice.post(B(sandbox) + "/upload-tar", params={"path": "up"}, content=b"not a tar at all" * 100),
                 400, "invalid_tar", "body")


@pytest.mark.parametrize(
    "members",
    [
        [("/etc/evil", "file", b"x")],
        [("../evil", "file", b"x")],
        [("a/../../evil", "file", b"x")],
        [("ok", "file", b"fine"), ("esc", "symlink", "/")],
        [("esc", "symlink", "../../..")],
        [("hl", "hardlink", "/etc/passwd")],
        [("hl", "hardlink", "../outside")],
        [("dev", "chr", None)],
        [("pipe", "fifo", None)],
    ],
    ids=["absolute", "dotdot", "inner-dotdot", "symlink-abs", "symlink-up", "hardlink-abs", "hardlink-up",
         "device", "fifo"],
)
def test_tar_refuses_members_that_escape(alice, sandbox, members):
    sh(alice, sandbox, "mkdir -p /workspace/t/in && echo outside > /workspace/outside")
    r = alice.post(B(sandbox) + "/upload-tar", params={"path": "t/in"}, content=make_tar(members))
    assert_error(r, 400, "unsafe_tar_member", "body")
    assert sh(alice, sandbox, "ls -A /workspace/t/in; cat /workspace/outside; test -e /etc/evil || echo clean") in (
        "outside\nclean\n", "ok\noutside\nclean\n")


def test_tar_refuses_to_write_through_a_planted_symlink(alice, sandbox):
    sh(alice, sandbox, "mkdir -p t && ln -s / t/evil")
    r = alice.post(B(sandbox) + "/upload-tar", params={"path": "t"}, content=make_tar([("evil/etc/pwned", "file", b"x")]))
    assert_error(r, 400, "unsafe_tar_member", "body")
    assert sh(alice, sandbox, "test -e /etc/pwned || echo clean") == "clean\n"


# --- escapes ------------------------------------------------------------------------------


@pytest.fixture
def host_marker():
    secret = "host-secret-" + secrets.token_hex(8)
    path = Path("/tmp") / f"sandboxd-host-marker-{secrets.token_hex(4)}"
    path.write_text(secret)
    yield path, secret
    path.unlink(missing_ok=True)


def test_paths_never_reach_the_host(alice, sandbox, host_marker):
    marker, secret = host_marker
    f = B(sandbox)
    # 1. absolute and ../ paths resolve inside the sandbox's own root
    assert_error(alice.get(f, params={"path": str(marker)}), 404, "file_not_found", "path")
    assert_error(alice.get(f, params={"path": "../../../../../.." + str(marker)}), 404, "file_not_found", "path")
    passwd = alice.get(f, params={"path": "../../etc/passwd"})
    assert passwd.status_code == 200
    assert passwd.text == sh(alice, sandbox, "cat /etc/passwd")
    # 2. a symlink the sandbox plants to / leads to the SANDBOX's root
    # (`/.`, not `/`: the same root on Linux, and Debian's 2022 gVisor drops whatever follows
    # a link whose target is exactly "/")
    sh(alice, sandbox, f"ln -s /. /tmp/host && ln -s /tmp /workspace/tmplink && echo {sandbox} > /etc/whose-root")
    whose_root = alice.get(f, params={"path": "/tmp/host/etc/whose-root"})
    assert whose_root.status_code == 200, whose_root.text
    assert whose_root.text.strip() == sandbox and not Path("/etc/whose-root").exists()
    for path in (f"/tmp/host{marker}", f"/tmp/host/../../..{marker}", f"tmplink/host{marker}",
                 f"/proc/1/root{marker}", f"/proc/self/root{marker}"):
        assert_error(alice.get(f, params={"path": path}), 404, "file_not_found", "path")
        assert_error(alice.get(f + "/stat", params={"path": path}), 404, "file_not_found", "path")
    listing = alice.get(f + "/list", params={"path": "/tmp/host/tmp"}).json()
    assert marker.name not in {e["name"] for e in listing["entries"]}
    # 3. writes through the link, with ../ or absolute: they land inside the sandbox
    for path in (f"/tmp/host{marker}", f"../..{marker}", str(marker)):
        assert alice.put(f, params={"path": path}, content=b"pwned").status_code == 201
        assert marker.read_text() == secret
    assert sh(alice, sandbox, f"cat {marker}") == "pwned"
    assert alice.post(f + "/remove", json={"path": f"/tmp/host{marker}"}).status_code == 200
    assert marker.read_text() == secret
    assert alice.post(f + "/rename", json={"from": "/etc/hostname", "to": f"/tmp/host{marker}"}).status_code in (
        200, 400, 403)  # done, cross-device (a bind mount under gVisor), or busy
    assert marker.read_text() == secret
    tar = alice.get(f + "/download-tar", params={"path": "/tmp/host/tmp"})
    assert secret.encode() not in tar.content


def test_another_sandbox_is_unreachable(alice, sandbox):
    other = alice.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    try:
        alice.put(B(other), params={"path": "/workspace/theirs"}, content=b"other sandbox")
        assert_error(alice.get(B(sandbox), params={"path": "/workspace/theirs"}), 404, "file_not_found", "path")
        assert alice.get(B(other), params={"path": "/workspace/theirs"}).content == b"other sandbox"
    finally:
        alice.delete(f"/v1/sandboxes/{other}")


def test_other_tenant_gets_404(alice, bob, sandbox):
    alice.put(B(sandbox), params={"path": "mine"}, content=b"alice's")
    f = B(sandbox)
    for response in (
        bob.get(f, params={"path": "mine"}),
        bob.put(f, params={"path": "mine"}, content=b"bob's"),
        bob.get(f + "/list", params={"path": "."}),
        bob.get(f + "/stat", params={"path": "mine"}),
        bob.post(f + "/mkdir", json={"path": "d"}),
        bob.post(f + "/remove", json={"path": "mine"}),
        bob.post(f + "/rename", json={"from": "mine", "to": "x"}),
        bob.post(f + "/upload-tar", params={"path": "."}, content=make_tar([("b", "file", b"b")])),
        bob.get(f + "/download-tar", params={"path": "."}),
        bob.get(f + "/watch", params={"path": "."}),
    ):
        assert_error(response, 404, "sandbox_not_found", "id")
    assert alice.get(f, params={"path": "mine"}).content == b"alice's"


# --- bad input ----------------------------------------------------------------------------


def test_bad_inputs_are_4xx_json(alice, sandbox, server):
    f = B(sandbox)
    long_path = "a/" * 3000
    cases = [
        (alice.get(f, params={"path": "x\0y"}), 400, "invalid_path", "path"),
        (alice.get(f, params={"path": long_path}), 400, "invalid_path", "path"),
        (alice.get(f + "/stat", params={"path": ""}), 400, "missing_field", "path"),
        (alice.get(f + "/stat", params={"path": "x" * 300}), 400, "invalid_path", "path"),  # ENAMETOOLONG
        (alice.put(f, params={"path": "m", "mode": "999"}, content=b""), 400, "invalid_value", "mode"),
        (alice.put(f, params={"path": "m", "mode": "rw-r--r--"}, content=b""), 400, "invalid_value", "mode"),
        (alice.put(f, params={"path": "m", "mode": "17777"}, content=b""), 400, "invalid_value", "mode"),
        (alice.put(f, params={"path": "m", "parents": "maybe"}, content=b""), 400, "invalid_value", "parents"),
        (alice.put(f, content=b"x"), 400, "missing_field", "path"),
        (alice.get(f + "/watch", params={"path": ".", "recursive": "2"}), 400, "invalid_value", "recursive"),
        (alice.post(f + "/mkdir", content=b"{not json"), 400, "invalid_json", None),
        (alice.post(f + "/mkdir", json=["path"]), 400, "invalid_type", None),
        (alice.post(f + "/mkdir", json={}), 400, "missing_field", "path"),
        (alice.post(f + "/mkdir", json={"path": 5}), 400, "invalid_type", "path"),
        (alice.post(f + "/mkdir", json={"path": "d", "parents": "yes"}), 400, "invalid_type", "parents"),
        (alice.post(f + "/mkdir", json={"path": "d", "mode": 755}), 400, "invalid_type", "mode"),
        (alice.post(f + "/mkdir", json={"path": "d", "mode": "8"}), 400, "invalid_value", "mode"),
        (alice.post(f + "/mkdir", json={"path": "d", "bogus": 1}), 400, "unknown_field", "bogus"),
        (alice.post(f + "/mkdir", json={"path": long_path}), 400, "invalid_path", "path"),
        (alice.post(f + "/remove", json={"path": ["a"]}), 400, "invalid_type", "path"),
        (alice.post(f + "/remove", json={"path": "a", "recursive": 1}), 400, "invalid_type", "recursive"),
        (alice.post(f + "/rename", json={"from": "a"}), 400, "missing_field", "to"),
        (alice.post(f + "/rename", json={"to": "a"}), 400, "missing_field", "from"),
        (alice.post(f + "/rename", json={"from": "a\0", "to": "b"}), 400, "invalid_path", "from"),
        (alice.post(f + "/mkdir", json={"path": "d", "meta": "x" * (2 * 1024 * 1024)}), 413, None, None),
        (alice.get("/v1/sandboxes/sbx_nonexist/files", params={"path": "a"}), 404, "sandbox_not_found", "id"),
        (alice.get("/v1/sandboxes/not-an-id/files/list"), 404, "sandbox_not_found", "id"),
    ]
    for response, status, code, field in cases:
        assert_error(response, status, code, field)
    with server.client(None) as anonymous:
        r = anonymous.get(f + "/stat", params={"path": "."})
        assert_error(r, 401, "unauthorized", "authorization")
        assert r.headers["www-authenticate"] == "Bearer"
    with server.client("sk-wrong") as wrong:
        assert_error(wrong.put(f, params={"path": "x"}, content=b"x"), 401, "unauthorized", "authorization")
    assert_error(alice.request("PATCH", f, params={"path": "x"}), 405, "method_not_allowed")


def test_destroyed_sandbox_is_409(alice):
    vm_id = alice.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    alice.delete(f"/v1/sandboxes/{vm_id}")
    assert_error(alice.get(B(vm_id) + "/stat", params={"path": "."}), 409, "sandbox_not_running", "id")
    assert_error(alice.put(B(vm_id), params={"path": "x"}, content=b"x"), 409, "sandbox_not_running", "id")


# --- watch --------------------------------------------------------------------------------


def read_events(lines, want: int, timeout: float = 15.0) -> list[tuple[str, dict]]:
    events, kind = [], None
    deadline = time.monotonic() + timeout
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind:
            events.append((kind, json.loads(line[6:])))
            kind = None
            if len(events) >= want:
                return events
        assert time.monotonic() < deadline, events
    return events


def test_watch_streams_created_modified_removed(alice, sandbox, server):
    f = B(sandbox)
    alice.post(f + "/mkdir", json={"path": "w/sub", "parents": True})
    with httpx.Client(base_url=server.url, headers=alice.headers, timeout=30) as watcher:
        with watcher.stream("GET", f + "/watch", params={"path": "w", "recursive": "true"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = resp.iter_lines()
            assert read_events(lines, 1)[0][0] == "ready"
            assert agent_status(server, sandbox)["file_watches"] == 1
            alice.put(f, params={"path": "w/new.txt"}, content=b"one")
            sh(alice, sandbox, "echo more >> w/new.txt")
            alice.put(f, params={"path": "w/sub/deep.txt"}, content=b"deep")
            alice.post(f + "/remove", json={"path": "w/new.txt"})
            events = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not any(
                    k == "removed" and e["path"] == "/workspace/w/new.txt" for k, e in events):
                events += read_events(lines, 1)
            seen = {(k, e["path"]) for k, e in events}
            assert ("created", "/workspace/w/new.txt") in seen, events
            assert ("modified", "/workspace/w/new.txt") in seen, events
            assert ("created", "/workspace/w/sub/deep.txt") in seen, events
            assert ("removed", "/workspace/w/new.txt") in seen, events
            assert all(isinstance(e["is_dir"], bool) for _, e in events)
    # the client went away: the agent closes the watch within a heartbeat or two
    wait_for(lambda: agent_status(server, sandbox)["file_watches"] == 0, timeout=10)
    assert_error(alice.get(f + "/watch", params={"path": "w/sub/deep.txt"}), 400, "not_a_directory", "path")
    assert_error(alice.get(f + "/watch", params={"path": "nope"}), 404, "file_not_found", "path")


# --- disconnects --------------------------------------------------------------------------


def test_client_disconnect_mid_download_leaves_nothing_stuck(alice, sandbox, server):
    sh(alice, sandbox, "head -c 300M /dev/zero > big.bin")
    with httpx.Client(base_url=server.url, headers=alice.headers, timeout=30) as client:
        with client.stream("GET", B(sandbox), params={"path": "big.bin"}) as resp:
            assert resp.status_code == 200
            chunks = resp.iter_raw()  # not a for/break: that would close the stream at once
            got = 0
            while got < 4 * 1024 * 1024:
                got += len(next(chunks))
            assert agent_status(server, sandbox)["file_transfers"] == 1
            assert "big.bin" in sh(alice, sandbox, "ls -l /proc/1/fd")
    wait_for(lambda: agent_status(server, sandbox)["file_transfers"] == 0, timeout=30)
    assert "big.bin" not in sh(alice, sandbox, "ls -l /proc/1/fd")
    # and the same for a tar download
    with httpx.Client(base_url=server.url, headers=alice.headers, timeout=30) as client:
        with client.stream("GET", B(sandbox) + "/download-tar", params={"path": "."}) as resp:
            next(resp.iter_raw())
    wait_for(lambda: agent_status(server, sandbox)["file_transfers"] == 0, timeout=30)
    assert "big.bin" not in sh(alice, sandbox, "ls -l /proc/1/fd")


def test_client_disconnect_mid_upload_leaves_no_partial_file(alice, sandbox, server):
    key = alice.headers["authorization"]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall((f"PUT {B(sandbox)}?path=partial.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n"
                      f"Content-Length: {100 * 1024 * 1024}\r\n\r\n").encode())
        for _ in range(32):
            sock.sendall(b"p" * 65536)
        wait_for(lambda: agent_status(server, sandbox)["file_transfers"] == 1, timeout=10)
    wait_for(lambda: agent_status(server, sandbox)["file_transfers"] == 0, timeout=30)
    listing = sh(alice, sandbox, "ls -a /workspace")
    assert "partial" not in listing, listing


def test_files_are_in_the_openapi_schema(alice):
    paths = alice.get("/openapi.json").json()["paths"]
    base = "/v1/sandboxes/{vm_id}/files"
    assert {"get", "put"} <= set(paths[base])
    for sub in ("list", "stat", "mkdir", "remove", "rename", "upload-tar", "download-tar", "watch"):
        assert base + "/" + sub in paths
    put = paths[base]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]
    assert "404" in put["responses"] and "413" in put["responses"]


def test_watch_keeps_sandbox_alive_only_while_connected(alice, server):
    vm_id = alice.post("/v1/sandboxes", json={"template": "standard", "idle_timeout_seconds": 2}).json()["vm_id"]
    try:
        with httpx.Client(base_url=server.url, headers=alice.headers, timeout=30) as watcher:
            with watcher.stream("GET", B(vm_id) + "/watch", params={"path": "."}) as resp:
                lines = resp.iter_lines()
                assert read_events(lines, 1)[0][0] == "ready"
                deadline = time.monotonic() + 5
                for _line in lines:  # pings arrive each second; read them for 5 s
                    if time.monotonic() > deadline:
                        break
                assert alice.get(f"/v1/sandboxes/{vm_id}").json()["state"] == "running"
        wait_for(lambda: alice.get(f"/v1/sandboxes/{vm_id}").json()["state"] == "destroyed", timeout=20)
        assert alice.get(f"/v1/sandboxes/{vm_id}").json()["reason"] == "idle_timeout"
    finally:
        alice.delete(f"/v1/sandboxes/{vm_id}")
