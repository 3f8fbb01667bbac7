#!/usr/bin/python3
"""tcp-forward LISTEN_PORT TARGET_HOST:TARGET_PORT -- a tiny TCP forwarder (standard library).

The browser template runs it as a service: Chromium's DevTools endpoint only listens on
127.0.0.1:9222 (new headless ignores --remote-debugging-address), while the sandbox's
host_port reaches port 9090. Bytes pass through untouched, so Chromium sees the client's
own Host header and builds webSocketDebuggerUrl for the address the client used.
"""

import socket
import sys
import threading


def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle(client, target):
    try:
        upstream = socket.create_connection(target, timeout=5)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
    t.start()
    pipe(client, upstream)
    t.join()
    client.close()
    upstream.close()


def main():
    port = int(sys.argv[1])
    host, _, tport = sys.argv[2].rpartition(":")
    target = (host, int(tport))
    server = socket.create_server(("0.0.0.0", port), backlog=128, reuse_port=False)
    while True:
        try:
            client, _ = server.accept()
        except InterruptedError:
            continue
        threading.Thread(target=handle, args=(client, target), daemon=True).start()


if __name__ == "__main__":
    main()
