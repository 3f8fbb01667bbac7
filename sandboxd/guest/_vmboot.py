"""The boot config of a microVM's agent, delivered over a virtio-serial port.

A microVM (sandboxd/runtime/microvm.py) boots, or is restored from a saved VM state, with
its agent waiting here, before it knows its token. The worker alone holds the host end of
the port (a unix socket in its state directory): it writes one JSON line, the usual boot
config plus ``vm`` (wall clock, entropy, /etc/hosts), and reads back ``ok`` or
``error: ...``. A restored clone shares its RAM with every other clone of the same saved
state, so it must get its own clock, random state and identity here.
Standard library only.
"""

import base64
import fcntl
import os
import random
import struct
import time

AWAITING = b"sandboxd-agent: awaiting boot\n"
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
_POLL_S = 0.01


def await_boot(port_path, parse):
    """Block until the worker sends the boot config; apply the VM parts; return the config.

    ``parse(raw, where)`` validates the config like a boot.json file (SystemExit on error).
    """
    import _files  # noqa: F401 -- warm the agent's imports before a snapshot is taken
    import _procs  # noqa: F401
    import _services  # noqa: F401

    fd = os.open(port_path, os.O_RDWR)
    try:
        os.write(fd, AWAITING)  # blocks until the worker's end is connected
        raw = _read_line(fd)
        try:
            boot = parse(raw, port_path)
            apply_vm_identity(boot.get("vm") or {}, boot.get("hostname"))
        except (SystemExit, OSError, ValueError, TypeError) as exc:
            os.write(fd, b"error: %s\n" % str(exc).encode("utf-8", "replace")[:500])
            raise SystemExit("sandboxd-agent: bad boot config: %s" % exc) from None
        os.write(fd, b"ok\n")
        return boot
    finally:
        os.close(fd)


def _read_line(fd):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:  # the worker's end is not connected (e.g. while the VM state is saved)
            time.sleep(_POLL_S)
            continue
        buf += chunk
    return buf


def apply_vm_identity(vm, hostname):
    if "clock" in vm:
        time.clock_settime(time.CLOCK_REALTIME, float(vm["clock"]))
    if vm.get("entropy"):
        seed = base64.b64decode(vm["entropy"])
        with open("/dev/random", "wb", buffering=0) as rnd:
            fcntl.ioctl(rnd, RNDADDENTROPY, struct.pack("ii", 8 * len(seed), len(seed)) + seed)
            fcntl.ioctl(rnd, RNDRESEEDCRNG)
        random.seed()
    if vm.get("hosts"):
        with open("/etc/hosts", "w") as f:
            f.write(vm["hosts"])
    if hostname:
        with open("/etc/hostname", "w") as f:
            f.write(hostname + "\n")
