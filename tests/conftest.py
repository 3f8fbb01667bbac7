from __future__ import annotations

import os
import socket
import threading

import pytest

from tests.helpers import TEST_RUNTIME, Server, host_leaks


def pytest_collection_modifyitems(config, items):
    """One suite, one pass per runtime (SANDBOXD_TEST_RUNTIME): tests that do not depend on
    the runtime run in the oci pass only; `only_runtimes` confines a test to some runtimes."""
    for item in items:
        only = item.get_closest_marker("only_runtimes")
        if only is not None and TEST_RUNTIME not in only.args:
            item.add_marker(pytest.mark.skip(reason=f"only for runtimes {', '.join(only.args)}"))
        elif TEST_RUNTIME != "oci" and item.get_closest_marker("runtime_independent"):
            item.add_marker(pytest.mark.skip(reason="runtime independent: covered by the oci pass"))


@pytest.fixture(scope="session")
def server():
    """The suite's main server: SQLite, one local worker (crun)."""
    srv = Server().start()
    srv.keys = {"alice": srv.create_key("alice"), "bob": srv.create_key("bob")}
    yield srv
    srv.destroy_all(list(srv.keys.values()))
    srv.stop()
    srv.remove_data()


@pytest.fixture
def alice(server):
    with server.client(server.keys["alice"]) as client:
        yield client


@pytest.fixture
def bob(server):
    with server.client(server.keys["bob"]) as client:
        yield client


@pytest.fixture
def sandbox(alice):
    """A fresh standard sandbox, destroyed after the test."""
    response = alice.post("/v1/sandboxes", json={"template": "standard"})
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    yield vm_id
    alice.delete(f"/v1/sandboxes/{vm_id}")


@pytest.fixture(scope="session", autouse=True)
def leak_check():
    """Runs last: after every server has stopped, nothing of any sandbox may remain."""
    before = host_leaks()
    yield
    if os.environ.get("SANDBOXD_SKIP_LEAK_CHECK"):  # only for partial runs beside another one
        return
    leaks = [leak for leak in host_leaks() if leak not in before]
    assert not leaks, "left on the host:\n" + "\n".join(leaks)


@pytest.fixture
def host_listener():
    """A TCP service on every host address, as a worker or database on the host would be."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], accepted
    listener.close()
    for conn in accepted:
        conn.close()


@pytest.fixture
def host_unix_listener(tmp_path):
    """A unix socket service on the host, as a container engine or database socket would be."""
    path = tmp_path / "host-service.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    listener.settimeout(0.2)
    yield path, listener
    listener.close()
