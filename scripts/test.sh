#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh), builds the templates the tests use (cached by
# content under /var/cache/sandboxd), and runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/sandboxd template build standard
.venv/bin/sandboxd template build browser   # tests/test_browser.py (~1 min the first time)
.venv/bin/sandboxd template build cua       # tests/test_cua.py (~2-4 min the first time)
.venv/bin/sandboxd template build canvas    # tests/test_canvas.py (~3.5 min the first time)
exec .venv/bin/pytest "$@"
