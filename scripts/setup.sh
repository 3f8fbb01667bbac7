#!/usr/bin/env bash
# Installs everything sandboxd needs on Debian 12 (run as root) and the CLI at .venv/bin/sandboxd.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3 python3-venv ca-certificates curl crun runc runsc mmdebstrap nftables iproute2 procps psmisc util-linux e2fsprogs
  gcc libc6-dev  # gcc: the statx shim for gVisor sandboxes (sandboxd/runtime/gvisor_compat.py)
  qemu-system-x86 linux-image-cloud-amd64 busybox-static  # the `microvm` runtime (runtime/microvm*.py)
  postgresql)  # tests/test_multihost.py starts a private PostgreSQL 15 cluster (control planes sharing a store)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (sandboxd manages namespaces, cgroups and nftables)" >&2
  exit 1
fi

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
# npm installs the agent CLIs (claude, codex); any Node.js with npm will do, so only bring
# Debian's when none is on PATH (a host may already run another Node.js build).
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own Python: it starts in ~10 ms, which the CLI and the guest tooling feel.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.sandboxd-installed
inputs_hash=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs_hash" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
  echo "$inputs_hash" > "$stamp"
fi

echo "setup.sh: ready. The CLI is .venv/bin/sandboxd; to put it on PATH: export PATH=\"$PWD/.venv/bin:\$PATH\""
