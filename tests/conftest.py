from __future__ import annotations

import os
import socket
import threading

import pytest

from tests.helpers import Server, host_leaks


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
