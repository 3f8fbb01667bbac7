#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh), builds the templates the tests use (cached by
# content under /var/cache/sandboxd), and runs the suite once per runtime: everything on
# `oci`, every runtime-dependent test again on `gvisor`, the core API modules on `microvm`
# (tests/conftest.py: SANDBOXD_TEST_RUNTIME). Extra arguments (pytest options) go to every pass.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/sandboxd template build standard
.venv/bin/sandboxd template build browser   # tests/test_browser.py (~1 min the first time)
.venv/bin/sandboxd template build cua       # tests/test_cua.py (~2-4 min the first time)
.venv/bin/sandboxd template build canvas    # tests/test_canvas.py (~3.5 min the first time)
failed=()
.venv/bin/pytest "$@" || failed+=(oci)
SANDBOXD_TEST_RUNTIME=gvisor .venv/bin/pytest "$@" || failed+=(gvisor)
# microVMs boot under TCG where KVM cannot run them (~5 min): every endpoint of the core API,
# files, processes, ports, limits and isolation; the template modules stay on oci and gvisor
SANDBOXD_TEST_RUNTIME=microvm .venv/bin/pytest "$@" tests/test_api.py tests/test_files.py tests/test_processes.py \
  tests/test_isolation.py tests/test_ports.py tests/test_client.py tests/test_lifecycle.py \
  || failed+=(microvm)
if [ ${#failed[@]} -gt 0 ]; then
  echo "tests failed on: ${failed[*]}" >&2
  exit 1
fi
