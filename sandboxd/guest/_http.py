"""A small HTTP/1.1 server layer for the guest agent (standard library only).

Runs inside the sandbox with the template's own Python: no third-party imports, no
import of the ``sandboxd`` package. One thread serves one connection (keep-alive,
pipelining tolerated). The application is an object with two methods:

* ``check(req) -> handler`` -- called once the request head is parsed and BEFORE the
  body is read (authentication, routing); raise :class:`HTTPError` to refuse.
* ``handler(req) -> Response`` -- called with the body read into ``req.body`` (at most
  MAX_BODY_BYTES), or, for a handler with ``streams_request_body = True``, with
  ``req.stream``, a :class:`BodyReader` the handler reads itself (uploads of any size
  pass through without being held in memory).

A handler may return :class:`Hijack` instead of a Response to take over the raw socket
(protocol upgrades: a PTY session speaks its own framing after a 101 answer).

A :class:`Response` body is ``bytes`` or any iterable of ``bytes``; an iterable is sent
with ``Transfer-Encoding: chunked`` (streaming exec, file downloads, ... later).

Why not h11: it costs ~2 MiB of private memory and ~8 ms of start-up per sandbox (it
pulls in dataclasses/inspect), and the agent only needs the request side of HTTP/1.1.
"""

import json
import socket
import time

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_BODY_BYTES = 8 * 1024 * 1024
REQUEST_TIMEOUT = 30.0  # once a request has started, its head and body must arrive within this
SEND_TIMEOUT = 120.0  # a peer that stops reading a response is dropped after this
RECV_SIZE = 65536
LINGER_SECONDS = 2.0  # how long a closing connection drains what the peer still sends

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 411: "Length Required", 413: "Content Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}

_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HTTPError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with the given status."""

    def __init__(self, status, code, message, close=False):
        Exception.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message
        self.close = close


class Request:
    __slots__ = ("method", "target", "path", "query_string", "version", "headers", "body", "stream", "_query")

    def __init__(self, method, target, version, headers):
        self.method = method
        self.target = target
        path, _, qs = target.partition("?")
        self.path = path
        self.query_string = qs
        self.version = version
        self.headers = headers  # lower-case name -> value (str, latin-1)
        self.body = b""
        self.stream = None  # a BodyReader, for handlers that stream the request body
        self._query = None

    def header(self, name, default=None):
        return self.headers.get(name, default)

    @property
    def query(self):
        """Query parameters, first value wins."""
        if self._query is None:
            q = {}
            if self.query_string:
                from urllib.parse import parse_qsl

                for k, v in parse_qsl(self.query_string, keep_blank_values=True):
                    q.setdefault(k, v)
            self._query = q
        return self._query

    def json(self):
        """The body as a JSON object; an empty body is ``{}``."""
        if not self.body.strip():
            return {}
        try:
            obj = json.loads(self.body)
        except (ValueError, RecursionError):
            raise HTTPError(400, "invalid_json", "request body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise HTTPError(400, "invalid_json", "request body must be a JSON object")
        return obj


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status=200, body=b"", headers=None):
        self.status = status
        self.body = body  # bytes, or an iterable of bytes (sent chunked)
        self.headers = headers or []  # list of (name, value)


def json_response(obj, status=200):
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return Response(status, body, [("Content-Type", "application/json")])


def error_response(status, code, message):
    return json_response({"error": {"code": code, "message": message}}, status)


class Hijack:
    """Returned by a handler to own the connection: ``run(sock, buffered)`` gets the socket
    and any bytes already read past the request; the connection closes when it returns."""

    __slots__ = ("run",)

    def __init__(self, run):
        self.run = run


class BodyReader:
    """A request body read on demand, de-chunked; ``read()`` returns b"" at its end."""

    def __init__(self, conn, length):
        self._conn = conn
        self._chunked = length < 0
        self._left = max(length, 0)  # bytes left in the body, or in the current chunk
        self.done = length == 0

    def read(self, size=RECV_SIZE):
        if self.done:
            return b""
        conn = self._conn
        if self._chunked and self._left == 0:
            self._left = conn._read_chunk_size()
            if self._left == 0:
                self.done = True
                return b""
        if not conn.buf:
            conn._recv()
        take = min(size, self._left, len(conn.buf))
        data = bytes(conn.buf[:take])
        del conn.buf[:take]
        self._left -= take
        if self._left == 0:
            if not self._chunked:
                self.done = True
            elif conn._read_line() != b"":
                raise HTTPError(400, "bad_request", "malformed chunked body", True)
        return data


class Connection:
    """Serves HTTP/1.1 requests on one connected socket until it closes."""

    def __init__(self, sock, app, idle_timeout=300.0, on_error=None):
        self.sock = sock
        self.app = app
        self.idle_timeout = idle_timeout
        self.on_error = on_error
        self.buf = bytearray()

    # -- reading ------------------------------------------------------------------
    def _recv(self):
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise EOFError
        self.buf += data

    def _read_head(self):
        """Returns the head bytes (without the blank line), or None on a clean close."""
        buf = self.buf
        self.sock.settimeout(self.idle_timeout)
        started = False
        while True:
            # Tolerate empty lines before a request (RFC 9112 section 2.2).
            while buf[:2] == b"\r\n":
                del buf[:2]
            while buf[:1] == b"\n":
                del buf[:1]
            if buf:
                if not started:
                    started = True
                    self.sock.settimeout(REQUEST_TIMEOUT)
                end = buf.find(b"\r\n\r\n")
                sep = 4
                lf = buf.find(b"\n\n")
                if lf >= 0 and (end < 0 or lf < end):
                    end, sep = lf, 2
                if end >= 0:
                    if end > MAX_HEAD_BYTES:
                        raise HTTPError(431, "headers_too_large", "request head exceeds %d bytes" % MAX_HEAD_BYTES, True)
                    head = bytes(buf[:end])
                    del buf[: end + sep]
                    return head
                if len(buf) > MAX_HEAD_BYTES:
                    raise HTTPError(431, "headers_too_large", "request head exceeds %d bytes" % MAX_HEAD_BYTES, True)
            try:
                self._recv()
            except EOFError:
                if started:
                    raise
                return None

    def _parse_head(self, head):
        lines = head.split(b"\n")
        parts = lines[0].rstrip(b"\r").split(b" ")
        if len(parts) != 3:
            raise HTTPError(400, "bad_request", "malformed request line", True)
        method, target, version = parts
        if not method or not all(c in _TOKEN_CHARS for c in method):
            raise HTTPError(400, "bad_request", "malformed request method", True)
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if version.startswith(b"HTTP/"):
                raise HTTPError(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are supported", True)
            raise HTTPError(400, "bad_request", "malformed request line", True)
        target = target.decode("latin-1")
        if not target.startswith("/"):
            low = target.lower()
            if low.startswith("http://") or low.startswith("https://"):  # absolute-form
                rest = target.split("://", 1)[1]
                slash = rest.find("/")
                target = rest[slash:] if slash >= 0 else "/"
            else:
                raise HTTPError(400, "bad_request", "request target must be a path", True)
        if len(lines) - 1 > MAX_HEADERS:
            raise HTTPError(431, "headers_too_large", "more than %d header fields" % MAX_HEADERS, True)
        headers = {}
        for raw in lines[1:]:
            raw = raw.rstrip(b"\r")
            if raw[:1] in (b" ", b"\t"):
                raise HTTPError(400, "bad_request", "obsolete header line folding is not supported", True)
            name, sep, value = raw.partition(b":")
            if not sep or not name or not all(c in _TOKEN_CHARS for c in name):
                raise HTTPError(400, "bad_request", "malformed header field", True)
            name = name.decode("ascii").lower()
            value = value.strip(b" \t").decode("latin-1")
            if name in headers:
                if name == "content-length":
                    if headers[name] != value:
                        raise HTTPError(400, "bad_request", "conflicting Content-Length headers", True)
                    continue
                headers[name] = headers[name] + ", " + value
            else:
                headers[name] = value
        return Request(method.decode("ascii"), target, version.decode("ascii"), headers)

    def _body_length(self, req):
        """-1 for chunked, else the Content-Length (0 when absent)."""
        te = req.headers.get("transfer-encoding")
        cl = req.headers.get("content-length")
        if te is not None:
            if cl is not None:
                raise HTTPError(400, "bad_request", "both Transfer-Encoding and Content-Length", True)
            if te.strip().lower() != "chunked":
                raise HTTPError(501, "not_implemented", "unsupported Transfer-Encoding", True)
            return -1
        if cl is None:
            return 0
        if not cl.isdigit() or len(cl) > 18:
            raise HTTPError(400, "bad_request", "invalid Content-Length", True)
        return int(cl)

    def _read_exact(self, n):
        while len(self.buf) < n:
            self._recv()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _read_line(self, limit=4096):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i]).rstrip(b"\r")
                del self.buf[: i + 1]
                return line
            if len(self.buf) > limit:
                raise HTTPError(400, "bad_request", "malformed chunked body", True)
            self._recv()

    def _read_chunk_size(self):
        """Reads a chunk-size line; at the last chunk (0) also reads the trailers."""
        line = self._read_line()
        size_s = line.split(b";", 1)[0].strip()
        try:
            size = int(size_s, 16)
        except ValueError:
            raise HTTPError(400, "bad_request", "malformed chunk size", True) from None
        if size < 0:
            raise HTTPError(400, "bad_request", "malformed chunk size", True)
        if size == 0:
            while self._read_line():  # trailers
                pass
        return size

    def _read_chunked(self):
        out = bytearray()
        while True:
            size = self._read_chunk_size()
            if size == 0:
                return bytes(out)
            if len(out) + size > MAX_BODY_BYTES:
                raise HTTPError(413, "payload_too_large", "request body exceeds %d bytes" % MAX_BODY_BYTES, True)
            out += self._read_exact(size)
            if self._read_line() != b"":
                raise HTTPError(400, "bad_request", "malformed chunked body", True)

    # -- writing ------------------------------------------------------------------
    def _send(self, req, resp, keep_alive):
        version11 = req is None or req.version == "HTTP/1.1"
        lines = ["HTTP/1.1 %d %s" % (resp.status, REASONS.get(resp.status, "Unknown"))]
        for k, v in resp.headers:
            lines.append("%s: %s" % (k, v))
        body = resp.body
        streaming = not isinstance(body, (bytes, bytearray))
        if streaming:
            if version11:
                lines.append("Transfer-Encoding: chunked")
            else:
                keep_alive = False
        else:
            lines.append("Content-Length: %d" % len(body))
        if not keep_alive:
            lines.append("Connection: close")
        elif not version11:
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not streaming:
            if req is not None and req.method == "HEAD":
                body = b""
            self.sock.sendall(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                self.sock.sendall(body)
            return keep_alive
        self.sock.sendall(head)
        try:
            for chunk in body:
                if not chunk:
                    continue
                if version11:
                    self.sock.sendall(b"%x\r\n" % len(chunk) + bytes(chunk) + b"\r\n")
                else:
                    self.sock.sendall(chunk)
            if version11:
                self.sock.sendall(b"0\r\n\r\n")
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return keep_alive

    # -- main loop ------------------------------------------------------------------
    def serve(self):
        try:
            while self._serve_one():
                pass
        except (EOFError, OSError):  # peer went away, timeouts (socket.timeout is an OSError)
            pass
        finally:
            self._lingering_close()

    def _lingering_close(self):
        """Over TCP (gVisor, VMs), closing with unread request bytes sends a reset that can
        destroy the answer still in flight to the peer: half-close first and drain what the
        peer still sends, briefly, as HTTP servers do."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(RECV_SIZE):
                    break
        except OSError:
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    def _serve_one(self):
        req = None
        body_pending = False
        keep_alive = False
        try:
            head = self._read_head()
            if head is None:
                return False
            req = self._parse_head(head)
            conn_tokens = req.headers.get("connection", "").lower()
            if req.version == "HTTP/1.1":
                keep_alive = "close" not in conn_tokens
            else:
                keep_alive = "keep-alive" in conn_tokens
            length = self._body_length(req)
            body_pending = length != 0
            handler = self.app.check(req)
            streams_body = getattr(handler, "streams_request_body", False)
            if length > MAX_BODY_BYTES and not streams_body:
                raise HTTPError(413, "payload_too_large", "request body exceeds %d bytes" % MAX_BODY_BYTES, True)
            if length != 0 and "100-continue" in req.headers.get("expect", "").lower() \
                    and req.version == "HTTP/1.1" and len(self.buf) == 0:
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if streams_body:
                req.stream = BodyReader(self, length)
            elif length != 0:
                req.body = self._read_chunked() if length < 0 else self._read_exact(length)
            body_pending = False
            self.sock.settimeout(None)
            try:
                resp = handler(req)
            except HTTPError as e:
                if streams_body and not req.stream.done:
                    e.close = True  # the rest of the body is still on the wire
                raise
            except Exception as exc:  # never let a handler bug kill the connection silently
                if self.on_error is not None:
                    self.on_error(req, exc)
                resp = error_response(500, "internal_error", "internal error: %s" % type(exc).__name__)
            if isinstance(resp, Hijack):
                buffered = bytes(self.buf)
                self.buf.clear()
                resp.run(self.sock, buffered)
                return False
            if streams_body and not req.stream.done:
                keep_alive = False  # an unread body makes the connection unusable
            self.sock.settimeout(SEND_TIMEOUT)
            return self._send(req, resp, keep_alive)
        except HTTPError as e:
            close = e.close or body_pending or not keep_alive
            try:
                self.sock.settimeout(REQUEST_TIMEOUT)
                self._send(req, error_response(e.status, e.code, e.message), not close)
            except OSError:
                return False
            return not close
