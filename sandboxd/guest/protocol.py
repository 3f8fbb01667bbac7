"""Guest-agent protocol constants, shared by the agent (inside the sandbox) and the worker.

Standard library only: this file is imported by the agent with the sandbox's own Python.
Bump PROTOCOL_VERSION on any incompatible change; the worker checks it at connect.
"""

PROTOCOL_VERSION = 1

GUEST_RUN_DIR = "/run/sandboxd"  # read-write, shared with the worker: socket, boot config
GUEST_CODE_DIR = "/opt/sandboxd/guest"  # read-only: this package's guest code
SOCKET_NAME = "agent.sock"
BOOT_CONFIG_NAME = "boot.json"  # written by the worker, read and deleted by the agent at start

WORKSPACE_DIR = "/workspace"

# The sandbox's init process: the guest agent, run by the template's own Python.
AGENT_ARGV = ["/usr/bin/python3", "-s", "-B", f"{GUEST_CODE_DIR}/agent.py"]
