"""Ports and preview links: the HTTP/WebSocket proxy per sandbox and port, and access tokens."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.helpers import assert_error, exec_ok

HTTP_PORT = 8000
WS_PORT = 8765

# A test server for inside the sandbox (standard library only; not HTTPServer, whose bind
# does a reverse DNS lookup).
HTTP_SERVER = r'''
import json, socketserver, sys, time
from http.server import BaseHTTPRequestHandler

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status, body, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _any(self):
        body = self._body()
        if self.path.startswith("/redirect"):
            return self._send(302, b"moved", [("Location", "/echo?from=redirect")])
        if self.path.startswith("/teapot"):
            return self._send(418, b"short and stout", [("X-Custom", "yes"), ("Set-Cookie", "a=1; Path=/"),
                                                        ("Set-Cookie", "b=2; Path=/")])
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                chunk = f"chunk{i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(2)
            self.wfile.write(b"0\r\n\r\n")
            return
        echo = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                "body": body.decode(errors="replace")}
        self._send(200, json.dumps(echo).encode(), [("Content-Type", "application/json")])

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("", int(sys.argv[1])), H).serve_forever()
'''

# A minimal WebSocket echo server (RFC 6455 handshake + unfragmented frames).
WS_SERVER = r'''
import base64, hashlib, json, socket, struct, sys, threading

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def serve(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head, buf = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    path = lines[0].split()[1]
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + GUID).encode()).digest()).decode()
    proto = ""
    if "sec-websocket-protocol" in headers:
        proto = "Sec-WebSocket-Protocol: %s\r\n" % headers["sec-websocket-protocol"].split(",")[0].strip()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Accept: %s\r\n%s\r\n" % (accept, proto)).encode())

    def read(n):
        nonlocal buf
        while len(buf) < n:
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out

    def send(op, payload):
        n = len(payload)
        if n < 126:
            size = bytes([n])
        elif n < 65536:
            size = bytes([126]) + struct.pack("!H", n)
        else:
            size = bytes([127]) + struct.pack("!Q", n)
        conn.sendall(bytes([0x80 | op]) + size + payload)

    while True:
        b0, b1 = read(2)
        op, n = b0 & 15, b1 & 127
        if n == 126:
            n = struct.unpack("!H", read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", read(8))[0]
        mask = read(4) if b1 & 0x80 else b"\0\0\0\0"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(read(n)))
        if op == 8:  # close: echo the code back
            send(8, payload[:2])
            conn.close()
            return
        if op == 9:
            send(10, payload)
        elif op == 1 and payload.startswith(b"close:"):
            send(8, struct.pack("!H", int(payload[6:])) + b"bye")
        elif op == 1 and payload == b"request":
            send(1, json.dumps({"path": path, "headers": headers}).encode())
        elif op in (1, 2):
            send(op, payload)

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("", int(sys.argv[1])))
srv.listen(16)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def start_script(client, vm_id: str, name: str, source: str, port: int) -> None:
    encoded = base64.b64encode(source.encode()).decode()
    exec_ok(client, vm_id, f"echo {encoded} | base64 -d > /tmp/{name}.py && "
                           f"(nohup python3 /tmp/{name}.py {port} >/tmp/{name}.log 2>&1 &)")  # fmt: skip
    for _ in range(100):  # until it listens
        out = exec_ok(client, vm_id, f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}))\" "
                                     "2>/dev/null && echo up")["output"]  # fmt: skip
        if out == "up\n":
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name} did not listen on {port}")


@pytest.fixture(scope="module")
def served(server):
    """One sandbox (alice's) running the HTTP test server on 8000 and the WebSocket echo on 8765."""
    with server.client(server.keys["alice"]) as client:
        vm_id = client.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
        try:
            start_script(client, vm_id, "httpd", HTTP_SERVER, HTTP_PORT)
            start_script(client, vm_id, "wsd", WS_SERVER, WS_PORT)
            yield vm_id
        finally:
            client.delete(f"/v1/sandboxes/{vm_id}")


def port_url(vm_id: str, port: int, path: str = "") -> str:
    return f"/v1/sandboxes/{vm_id}/ports/{port}/{path}"


def ws_url(server, vm_id: str, port: int, path: str = "") -> str:
    return server.url.replace("http://", "ws://") + port_url(vm_id, port, path)


# --- HTTP ---------------------------------------------------------------------------------------


def test_get_is_proxied_with_forwarded_headers_and_without_our_key(alice, served):
    response = alice.get(port_url(served, HTTP_PORT, "echo?x=1&y=%20z"), headers={"X-Test": "hello"})
    assert response.status_code == 200, response.text
    echo = response.json()
    assert echo["method"] == "GET" and echo["path"] == "/echo?x=1&y=%20z"
    headers = {k.lower(): v for k, v in echo["headers"].items()}
    assert headers["x-test"] == "hello"
    assert "authorization" not in headers  # our API key never reaches the sandbox
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-host"].startswith("127.0.0.1:")
    assert headers["x-forwarded-prefix"] == f"/v1/sandboxes/{served}/ports/{HTTP_PORT}"
    # without a trailing slash: the sandbox's "/"
    assert alice.get(f"/v1/sandboxes/{served}/ports/{HTTP_PORT}").json()["path"] == "/"


def test_post_body_is_streamed_both_ways(alice, served):
    response = alice.post(port_url(served, HTTP_PORT, "echo"), content=b"payload " * 1000)
    assert response.status_code == 200 and response.json()["body"] == "payload " * 1000

    def chunks():  # no Content-Length: sent chunked, relayed as a stream
        for i in range(5):
            yield f"part{i};".encode()

    response = alice.put(port_url(served, HTTP_PORT, "echo"), content=chunks())
    assert response.json()["method"] == "PUT" and response.json()["body"] == "part0;part1;part2;part3;part4;"


def test_streaming_response_arrives_before_it_ends(alice, served):
    t0 = time.monotonic()
    with alice.stream("GET", port_url(served, HTTP_PORT, "stream")) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines) == "chunk0"
        assert time.monotonic() - t0 < 3  # a buffering proxy would answer only after >= 6 s
        assert list(lines) == ["chunk1", "chunk2"]
    assert time.monotonic() - t0 >= 4


def test_status_headers_and_redirects_pass_through(alice, served):
    response = alice.get(port_url(served, HTTP_PORT, "teapot"))
    assert response.status_code == 418 and response.text == "short and stout"
    assert response.headers["x-custom"] == "yes"
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    response = alice.get(port_url(served, HTTP_PORT, "redirect"), follow_redirects=False)
    assert response.status_code == 302 and response.headers["location"] == "/echo?from=redirect"


def test_nothing_listening_is_502(alice, served):
    assert_error(alice.get(port_url(served, 8001)), 502, "port_unreachable")


@pytest.mark.parametrize("port", ["0", "65536", "abc", "-1"])
def test_bad_port_is_400(alice, served, port):
    assert_error(alice.get(f"/v1/sandboxes/{served}/ports/{port}/"), 400, "invalid_port")


def test_other_tenant_gets_404_and_no_key_401(bob, served, server):
    assert_error(bob.get(port_url(served, HTTP_PORT, "echo")), 404, "sandbox_not_found")
    assert_error(bob.post(f"/v1/sandboxes/{served}/access-token"), 404)
    with server.client(None) as anonymous:
        assert_error(anonymous.get(port_url(served, HTTP_PORT, "echo")), 401)
        assert_error(anonymous.get(port_url("sbx_00000000", HTTP_PORT, "echo")), 401)
        assert_error(anonymous.post(f"/v1/sandboxes/{served}/access-token"), 401)


def test_destroyed_sandbox_is_409(alice):
    vm_id = alice.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    token = alice.post(f"/v1/sandboxes/{vm_id}/access-token").json()["token"]
    alice.delete(f"/v1/sandboxes/{vm_id}")
    assert_error(alice.get(port_url(vm_id, HTTP_PORT, "echo")), 409, "sandbox_not_running")
    assert_error(httpx.get(alice.base_url.join(port_url(vm_id, HTTP_PORT)), headers={"X-Sandbox-Token": token}), 409)
    assert_error(alice.get(port_url("sbx_zzzzzzzz", HTTP_PORT)), 404, "sandbox_not_found")


# --- WebSocket ----------------------------------------------------------------------------------


def test_websocket_echo_text_binary_and_close_codes(server, served):
    auth = {"Authorization": f"Bearer {server.keys['alice']}"}
    with ws_connect(ws_url(server, served, WS_PORT, "chat?room=1"), additional_headers=auth,
                    subprotocols=["echo.v1"]) as ws:  # fmt: skip
        assert ws.subprotocol == "echo.v1"
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=10) == b"\x00\x01binary"
        big = "x" * 200_000
        ws.send(big)
        assert ws.recv(timeout=10) == big
        ws.send("request")
        seen = json.loads(ws.recv(timeout=10))
        assert seen["path"] == "/chat?room=1" and "authorization" not in seen["headers"]
        ws.send("close:4001")  # the sandbox's server closes with 4001
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4001
    # and the client's close code reaches the sandbox (it echoes it back)
    with ws_connect(ws_url(server, served, WS_PORT), additional_headers=auth) as ws:
        ws.close(code=4002)
        assert ws.close_code == 4002


def test_websocket_errors_are_json_http_answers(server, served):
    auth = {"Authorization": f"Bearer {server.keys['alice']}"}
    for url, headers, status in [
        (ws_url(server, served, WS_PORT), {}, 401),
        (ws_url(server, served, WS_PORT), {"Authorization": f"Bearer {server.keys['bob']}"}, 404),
        (ws_url(server, served, 8002), auth, 502),
        (ws_url(server, served, 0), auth, 400),
    ]:
        with pytest.raises(InvalidStatus) as info:
            ws_connect(url, additional_headers=headers, open_timeout=10).close()
        assert info.value.response.status_code == status
        assert "error" in json.loads(info.value.response.body)


# --- access tokens ------------------------------------------------------------------------------


def test_token_via_query_sets_cookie_that_loads_subresources(alice, served, server):
    response = alice.post(f"/v1/sandboxes/{served}/access-token", json={"port": HTTP_PORT})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"token", "expires_at", "preview_url"} and body["token"].startswith("sbt_")
    assert body["preview_url"] == f"{server.url}{port_url(served, HTTP_PORT)}?sandbox_token={body['token']}"
    with httpx.Client() as browser:  # no API key: a browser opening the preview link
        page = browser.get(body["preview_url"].replace("?", "echo?a=1&"))
        assert page.status_code == 200, page.text
        echo = page.json()
        assert echo["path"] == "/echo?a=1"  # the token is not forwarded ...
        assert body["token"] not in json.dumps(echo)  # ... not even as a cookie
        cookie = page.headers["set-cookie"]
        assert f"Path=/v1/sandboxes/{served}/ports/" in cookie and "HttpOnly" in cookie
        # a sub-resource of the page: the cookie alone authorizes it
        sub = browser.get(f"{server.url}{port_url(served, HTTP_PORT, 'echo?sub=1')}", cookies=None)
        assert sub.status_code == 200 and sub.json()["path"] == "/echo?sub=1"
        # the cookie does not leak to the API
        assert_error(browser.get(f"{server.url}/v1/sandboxes/{served}"), 401)
    # the header form works too, and a token can open a WebSocket
    header = {"X-Sandbox-Token": body["token"]}
    assert httpx.get(f"{server.url}{port_url(served, HTTP_PORT, 'echo')}", headers=header).status_code == 200
    with ws_connect(ws_url(server, served, WS_PORT), additional_headers=header) as ws:
        ws.send("via token")
        assert ws.recv(timeout=10) == "via token"


def test_token_never_authorizes_the_api_or_another_sandbox(alice, served, server):
    token = alice.post(f"/v1/sandboxes/{served}/access-token").json()["token"]
    with server.client(token) as with_token_as_key:
        assert_error(with_token_as_key.get("/v1/sandboxes"), 401)
        assert_error(with_token_as_key.post(f"/v1/sandboxes/{served}/exec", json={"command": "id"}), 401)
    other = alice.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    try:
        response = httpx.get(f"{server.url}{port_url(other, HTTP_PORT)}?sandbox_token={token}")
        assert_error(response, 401, "invalid_sandbox_token")
    finally:
        alice.delete(f"/v1/sandboxes/{other}")


def test_token_expiry_and_revocation(alice, served, server):
    url = f"{server.url}{port_url(served, HTTP_PORT, 'echo')}"
    short = alice.post(f"/v1/sandboxes/{served}/access-token", json={"expires_in_seconds": 1}).json()
    assert httpx.get(url, headers={"X-Sandbox-Token": short["token"]}).status_code == 200
    time.sleep(1.5)
    assert_error(httpx.get(url, headers={"X-Sandbox-Token": short["token"]}), 401, "invalid_sandbox_token")

    token = alice.post(f"/v1/sandboxes/{served}/access-token").json()["token"]
    assert httpx.get(url, params={"sandbox_token": token}).status_code == 200
    revoked = alice.delete(f"/v1/sandboxes/{served}/access-token")
    assert revoked.status_code == 200 and revoked.json()["revoked"] >= 1
    assert_error(httpx.get(url, params={"sandbox_token": token}), 401, "invalid_sandbox_token")
    assert_error(httpx.get(url, cookies={"sandboxd_token": token}), 401, "invalid_sandbox_token")


def test_token_request_validation(alice, served):
    path = f"/v1/sandboxes/{served}/access-token"
    assert_error(alice.post(path, json={"expires_in_seconds": 0}), 400, "invalid_value")
    assert_error(alice.post(path, json={"expires_in_seconds": 7201}), 400, "invalid_value")
    assert_error(alice.post(path, json={"port": 70000}), 400, "invalid_value")
    assert_error(alice.post(path, json={"bogus": 1}), 400, "unknown_field")
    assert_error(alice.post(path, content=b"[1]"), 400, "invalid_type")
    expires = alice.post(path, json={"expires_in_seconds": 7200}).json()["expires_at"]
    detail = alice.get(f"/v1/sandboxes/{served}").json()
    assert expires <= detail["expires_at"]  # never past the sandbox's lifetime


def test_token_not_in_server_log(alice, served, server):
    token = alice.post(f"/v1/sandboxes/{served}/access-token").json()["token"]
    httpx.get(f"{server.url}{port_url(served, HTTP_PORT, 'echo')}?sandbox_token={token}")
    httpx.get(f"{server.url}{port_url(served, 8003)}?sandbox_token={token}")  # 502
    assert token not in server.log_path.read_text(errors="replace")


def test_proxy_counts_as_activity(alice, server):
    vm_id = alice.post("/v1/sandboxes", json={"template": "standard", "idle_timeout_seconds": 3}).json()["vm_id"]
    try:
        start_script(alice, vm_id, "httpd", HTTP_SERVER, HTTP_PORT)
        for _ in range(6):  # 6 s of proxy traffic, twice the idle timeout
            assert alice.get(port_url(vm_id, HTTP_PORT, "echo")).status_code == 200
            time.sleep(1)
        assert alice.get(f"/v1/sandboxes/{vm_id}").json()["state"] == "running"
    finally:
        alice.delete(f"/v1/sandboxes/{vm_id}")
