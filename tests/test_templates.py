"""Template specs (fast), the template store's caching/locking logic with a stand-in
mmdebstrap (fast), and one real mmdebstrap build cached under /var/cache/sandboxd-test
(slow the first time, then reused)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sandboxd.runtime.base import Resources
from sandboxd.templates import builder as builder_mod
from sandboxd.templates.builder import TemplateBuildError, TemplateImage, TemplateStore
from sandboxd.templates.spec import (
    TemplateSpec,
    TemplateSpecError,
    list_builtin,
    load_builtin,
    load_file,
    loads,
)

# Does not depend on the sandbox runtime: runs in the default (oci) pass only.
pytestmark = pytest.mark.runtime_independent

MINIMAL = 'name = "tiny"\n'


def spec_of(text: str, tmp_path: Path | None = None) -> TemplateSpec:
    return loads(text, where="test.toml", base_dir=tmp_path)


def bad(text: str, *needles: str, tmp_path: Path | None = None) -> str:
    with pytest.raises(TemplateSpecError) as ei:
        spec_of(text, tmp_path)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    return msg


# --- specs -----------------------------------------------------------------------------------

def test_builtin_standard():
    assert "standard" in list_builtin()
    s = load_builtin("standard")
    assert s.name == "standard" and s.base == "bookworm"
    assert s.description
    assert s.resources == Resources(vcpu=1, cpu_fraction=0.5, memory_mib=512, pids_limit=1024)
    assert s.resources.cpu_quota == 0.5
    for p in ("python3", "ca-certificates", "curl", "procps"):
        assert p in s.packages
    assert s.source is not None and s.source.name == "standard.toml"
    with pytest.raises(TemplateSpecError, match="no builtin template"):
        load_builtin("nope")
    with pytest.raises(TemplateSpecError):
        load_builtin("../etc/passwd")


def test_defaults_and_required_packages():
    s = spec_of(MINIMAL)
    assert s.base == "bookworm" and s.packages == () and s.services == () and s.files == ()
    assert s.resources == Resources(vcpu=1, cpu_fraction=0.5, memory_mib=512, pids_limit=1024)
    assert s.all_packages() == ["python3"]
    s = spec_of(MINIMAL + 'pip_packages = ["requests==2.32.3"]\nnpm_packages = ["@napi-rs/canvas@0.1.65"]\n')
    assert {"python3", "python3-pip", "nodejs", "npm"} <= set(s.all_packages())


def test_full_spec(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "motd").write_text("hello\n")
    text = """
name = "browser"
description = "Chromium headless"
base = "bookworm"
packages = ["chromium", "fonts-liberation"]
build_commands = ["echo built > /etc/built-by-sandboxd"]
env = { CHROME_PATH = "/usr/bin/chromium" }

[resources]
vcpu = 1
cpu_fraction = 1.0
memory_mib = 1024
pids_limit = 2048

[[files]]
src = "files/motd"
dest = "/etc/motd"
mode = "0644"

[[files]]
content = "#!/bin/sh\\necho hi\\n"
dest = "/usr/local/bin/hi"
mode = "0755"

[[services]]
name = "chromium"
command = "chromium --headless --remote-debugging-port=9222"
restart = "always"
env = { DISPLAY = ":99" }
[services.readiness]
tcp_port = 9222
timeout_seconds = 10
"""
    p = tmp_path / "browser.toml"
    p.write_text(text)
    s = load_file(p)
    assert s.source == p
    assert s.resources.memory_mib == 1024 and s.resources.cpu_fraction == 1.0
    assert s.files[0].src == (tmp_path / "files" / "motd").resolve() and s.files[0].mode == 0o644
    assert s.files[1].data() == b"#!/bin/sh\necho hi\n" and s.files[1].mode == 0o755
    svc = s.services[0]
    assert svc.name == "chromium" and svc.restart == "always" and svc.user == "root"
    assert svc.readiness is not None and svc.readiness.tcp_port == 9222 and svc.readiness.timeout_seconds == 10
    assert s.env == {"CHROME_PATH": "/usr/bin/chromium"}
    # image.json keeps the spec; it round-trips (minus files, which live in the rootfs)
    back = builder_mod._spec_from_canonical(json.loads(json.dumps(s.canonical())))
    assert back.services == s.services and back.resources == s.resources and back.env == s.env


@pytest.mark.parametrize("text,needles", [
    ('name = "x"\nbogus = 1\n', ["unknown key", "bogus"]),
    ('name = "x"\npackage = ["curl"]\n', ["unknown key", "package"]),
    ('name = "x"\n[resources]\nmemory = 512\n', ["unknown key", "resources.memory"]),
    ('name = "x"\n[resources]\nvcpu = 0\n', ["resources.vcpu"]),
    ('name = "x"\n[resources]\nvcpu = 1.5\n', ["resources.vcpu", "integer"]),
    ('name = "x"\n[resources]\ncpu_fraction = 0\n', ["resources.cpu_fraction"]),
    ('name = "x"\n[resources]\ncpu_fraction = 1.5\n', ["resources.cpu_fraction"]),
    ('name = "x"\n[resources]\nmemory_mib = "512"\n', ["resources.memory_mib", "integer"]),
    ('name = "x"\n[resources]\nmemory_mib = 16\n', ["resources.memory_mib"]),
    ('name = "x"\n[resources]\npids_limit = true\n', ["resources.pids_limit"]),
    ('name = "x"\nresources = 3\n', ["resources", "table"]),
    ('description = "no name"\n', ["name", "required"]),
    ('name = "Bad Name"\n', ["name"]),
    ('name = 5\n', ["name", "string"]),
    ('name = "x"\nbase = "Bookworm!"\n', ["base"]),
    ('name = "x"\npackages = "curl"\n', ["packages", "list"]),
    ('name = "x"\npackages = ["curl", "curl"]\n', ["packages", "duplicate"]),
    ('name = "x"\npackages = ["curl; rm -rf /"]\n', ["packages[0]"]),
    ('name = "x"\npackages = [1]\n', ["packages[0]"]),
    ('name = "x"\nenv = { "1BAD" = "v" }\n', ["env.1BAD"]),
    ('name = "x"\nenv = { A = 1 }\n', ["env.A"]),
    ('name = "x"\n[[files]]\ndest = "/etc/x"\n', ["files[0]", "src or content"]),
    ('name = "x"\n[[files]]\ncontent = "a"\ndest = "etc/x"\n', ["files[0].dest"]),
    ('name = "x"\n[[files]]\ncontent = "a"\ndest = "/etc/../x"\n', ["files[0].dest"]),
    ('name = "x"\n[[files]]\ncontent = "a"\ndest = "/x"\nmode = "rwx"\n', ["files[0].mode"]),
    ('name = "x"\n[[files]]\ncontent = "a"\ndest = "/x"\nowner = "root"\n', ["files[0].owner"]),
    ('name = "x"\n[[services]]\nname = "s"\n', ["services[0].command", "required"]),
    ('name = "x"\n[[services]]\nname = "s"\ncommand = "c"\nrestart = "sometimes"\n', ["services[0].restart"]),
    ('name = "x"\n[[services]]\nname = "s"\ncommand = "c"\n[services.readiness]\ntcp_port = 1\ncommand = "x"\n',
     ["services[0].readiness", "exactly one"]),
    ('name = "x"\n[[services]]\nname = "s"\ncommand = "c"\n[services.readiness]\ntcp_port = 70000\n',
     ["services[0].readiness.tcp_port"]),
    ('name = "x"\n[[services]]\nname = "s"\ncommand = "c"\n[[services]]\nname = "s"\ncommand = "d"\n',
     ["services[1].name", "duplicates"]),
    ('name = "x"\nthis is not toml\n', ["invalid TOML"]),
])
def test_bad_specs(text, needles):
    msg = bad(text, *needles)
    assert msg.startswith("test.toml: ")


def test_missing_file_src(tmp_path):
    bad('name = "x"\n[[files]]\nsrc = "nope.txt"\ndest = "/x"\n', "files[0].src", "not found", tmp_path=tmp_path)


# --- digests ---------------------------------------------------------------------------------

def test_digest_stability(tmp_path, monkeypatch):
    store = TemplateStore(tmp_path)
    base = 'name = "t"\npackages = ["curl", "procps"]\n[resources]\nmemory_mib = 512\n'
    d1 = store.digest(spec_of(base))
    assert d1 == store.digest(spec_of(base)) and len(d1) == 64
    # order of packages and of the keys does not matter
    assert d1 == store.digest(spec_of('[resources]\nmemory_mib = 512\n'.join(
        ['name = "t"\npackages = ["procps", "curl"]\n', ''])))
    # "python3" is implied, listing it changes nothing
    assert d1 == store.digest(spec_of('name = "t"\npackages = ["procps", "curl", "python3"]\n'))
    # what goes into the image does
    assert d1 != store.digest(spec_of('name = "t"\npackages = ["curl"]\n'))
    assert d1 != store.digest(spec_of(base.replace("512", "1024")))
    assert d1 != store.digest(spec_of('name = "t"\npackages = ["curl", "procps"]\nbuild_commands = ["true"]\n'))
    # file contents are part of it, their host path is not
    (tmp_path / "a").write_text("one")
    (tmp_path / "b").write_text("one")
    f = 'name = "t"\n[[files]]\nsrc = "{}"\ndest = "/etc/f"\n'
    da = store.digest(spec_of(f.format("a"), tmp_path))
    assert da == store.digest(spec_of(f.format("b"), tmp_path))
    (tmp_path / "b").write_text("two")
    assert da != store.digest(spec_of(f.format("b"), tmp_path))
    # the builder version too
    monkeypatch.setattr(builder_mod, "BUILDER_VERSION", "999")
    assert d1 != store.digest(spec_of(base))
    # and the builtin template's digest does not depend on where sandboxd is installed
    assert TemplateStore(tmp_path / "other", mirror="http://x/debian").digest(load_builtin("standard")) \
        == TemplateStore(tmp_path).digest(load_builtin("standard"))


# --- the store, with a stand-in mmdebstrap -----------------------------------------------------

FAKE_MMDEBSTRAP = r"""#!/bin/sh
# stand-in for mmdebstrap: counts calls, makes a rootfs with a python3, optionally fails
echo "$$" >> "$FAKE_COUNTER"
for a; do last3="$prev2 $prev1 $a"; prev2=$prev1; prev1=$a; done
set -- $last3
echo "I: fake mmdebstrap building $1 into $2"
sleep "${FAKE_SLEEP:-0}"
if [ -n "${FAKE_FAIL:-}" ]; then
    echo "E: Unable to locate package ${FAKE_FAIL}"
    echo "E: apt-get install failed"
    exit 1
fi
mkdir -p "$2/usr/bin" "$2/etc"
echo fake > "$2/usr/bin/python3"
head -c 5000 /dev/zero > "$2/etc/blob"
echo "I: success"
"""


@pytest.fixture
def fake_mmdebstrap(tmp_path, monkeypatch):
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    exe = bindir / "mmdebstrap"
    exe.write_text(FAKE_MMDEBSTRAP)
    exe.chmod(0o755)
    counter = tmp_path / "calls"
    counter.write_text("")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_COUNTER", str(counter))
    return lambda: len(counter.read_text().split())


def test_store_build_reuse_and_current(tmp_path, fake_mmdebstrap, monkeypatch):
    store = TemplateStore(tmp_path / "cache")
    spec = spec_of('name = "tiny"\npackages = ["curl"]\n')
    assert store.get("tiny") is None
    lines: list[str] = []
    img = store.build(spec, progress=lines.append)
    assert fake_mmdebstrap() == 1
    assert isinstance(img, TemplateImage)
    assert img.name == "tiny" and img.digest == store.digest(spec)
    assert img.image_name == "tiny@" + img.digest[:12]
    assert img.rootfs == tmp_path / "cache" / "templates" / "tiny" / img.digest / "rootfs"
    assert (img.rootfs / "usr/bin/python3").is_file()
    assert img.size_bytes >= 5000
    assert img.resources == Resources(1, 0.5, 512, 1024)
    assert img.built_at.endswith("Z")
    assert img.spec is not None and img.spec.packages == ("curl", "python3")
    assert any("fake mmdebstrap building bookworm" in ln for ln in lines)
    assert (img.path / "build.log").is_file()
    assert store.get("tiny") == img
    assert [p.name for p in (tmp_path / "cache/templates/tiny").iterdir() if p.name.startswith(".tmp")] == []

    # same digest: reused at once, no second mmdebstrap run
    assert store.build(spec) == img
    assert fake_mmdebstrap() == 1
    assert TemplateStore(tmp_path / "cache").get("tiny") == img  # survives a restart

    # a changed spec builds anew and becomes current; the old build stays on disk
    spec2 = spec_of('name = "tiny"\npackages = ["curl", "jq"]\n')
    img2 = store.build(spec2)
    assert fake_mmdebstrap() == 2 and img2.digest != img.digest
    assert store.get("tiny") == img2 and img.rootfs.is_dir()
    assert [i.digest for i in store.images("tiny")] == [img.digest, img2.digest]

    # a failing build leaves the previous image in service and reports the log's tail
    monkeypatch.setenv("FAKE_FAIL", "no-such-pkg")
    with pytest.raises(TemplateBuildError) as ei:
        store.build(spec_of('name = "tiny"\npackages = ["no-such-pkg"]\n'))
    assert "Unable to locate package no-such-pkg" in str(ei.value)
    assert "Unable to locate package" in ei.value.log_tail
    assert store.get("tiny") == img2
    assert not list((tmp_path / "cache/templates/tiny").glob(".tmp-*"))
    assert (tmp_path / "cache/templates/tiny/last-failed-build.log").is_file()
    monkeypatch.delenv("FAKE_FAIL")

    # force rebuilds the same digest; the superseded tree is kept aside until gc
    img2b = store.build(spec2, force=True)
    assert fake_mmdebstrap() == 4 and img2b.digest == img2.digest and img2b.built_at > img2.built_at
    olds = list((tmp_path / "cache/templates/tiny").glob(".old-*"))
    assert len(olds) == 1

    # gc keeps current and what is asked for, deletes the rest
    assert store.gc(keep_digests={img2.digest, img.digest}) == []
    removed = store.gc(keep_digests=set())
    assert sorted(p.name for p in removed) == sorted([img.digest, olds[0].name])
    assert store.get("tiny") == img2b and img2b.rootfs.is_dir() and not img.rootfs.exists()


def test_store_concurrent_builds_share_one(tmp_path, fake_mmdebstrap, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "1")
    spec = spec_of('name = "tiny"\n')
    results: list[TemplateImage] = []
    errors: list[BaseException] = []

    def go():
        try:
            results.append(TemplateStore(tmp_path / "cache").build(spec))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert fake_mmdebstrap() == 1
    assert len(results) == 3 and results[0] == results[1] == results[2]


def test_store_without_mmdebstrap(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TemplateBuildError, match="mmdebstrap is not installed"):
        TemplateStore(tmp_path / "c").build(spec_of(MINIMAL))


# --- a real build ------------------------------------------------------------------------------

REAL_CACHE = Path("/var/cache/sandboxd-test")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mmdebstrap") is None, reason="needs root and mmdebstrap")
def test_real_build_is_cached(tmp_path):
    src = tmp_path / "greeting"
    src.write_text("hello from the template\n")
    spec = loads(f"""
name = "test-tiny"
description = "smallest template that runs the guest agent"
packages = ["python3"]
build_commands = ["echo built > /etc/sandboxd-built"]
[[files]]
src = "{src}"
dest = "/etc/greeting"
mode = "0640"
[resources]
memory_mib = 256
""", where="tiny.toml", base_dir=tmp_path)
    store = TemplateStore(REAL_CACHE)
    lines: list[str] = []
    t0 = time.monotonic()
    img = store.build(spec, progress=lines.append)
    first = time.monotonic() - t0
    root = img.rootfs
    assert img.name == "test-tiny" and img.resources.memory_mib == 256
    assert store.get("test-tiny") == img
    assert img.size_bytes > 50_000_000

    # the second call is a cache hit: nothing is built, so no build output
    again: list[str] = []
    assert store.build(spec, progress=again.append) == img
    assert again == []

    # what the customize hook promised
    passwd = (root / "etc/passwd").read_text()
    assert "user:x:1000:1000::/home/user:/bin/bash" in passwd
    ws = (root / "workspace").stat()
    assert (ws.st_uid, ws.st_gid, stat.S_IMODE(ws.st_mode)) == (1000, 1000, 0o755)
    assert (root / "home/user").is_dir()
    assert (root / "run/sandboxd").is_dir() and (root / "opt/sandboxd/guest").is_dir()
    assert (root / "etc/hostname").read_text() == "sandbox\n"
    assert list((root / "var/lib/apt/lists").glob("*_Packages")) == []
    assert list((root / "var/cache/apt/archives").glob("*.deb")) == []
    assert not list((root / "usr/share/man").glob("man1/*")) if (root / "usr/share/man").exists() else True
    g = root / "etc/greeting"
    assert g.read_text() == "hello from the template\n" and stat.S_IMODE(g.stat().st_mode) == 0o640
    assert (root / "etc/sandboxd-built").read_text() == "built\n"
    out = subprocess.run(["chroot", str(root), "/usr/bin/python3", "-s", "-B", "-c",
                          "import json, select, socket, subprocess, threading; print('ok')"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "ok\n", out.stderr
    meta = json.loads((img.path / "image.json").read_text())
    assert meta["size_bytes"] == img.size_bytes and meta["digest"] == img.digest
    store.gc(keep_digests={img.digest})  # drop builds of earlier recipes from the test cache
    assert store.get("test-tiny") == img
    if lines:  # built in this run (not a cache hit from an earlier run)
        assert any("sandboxd: creating user" in ln for ln in lines)
        print(f"real build took {first:.1f}s, {img.size_bytes / 1e6:.0f} MB")
