#!/usr/bin/env python3
"""Record what a real NBD client sends, as a seed for handshake_and_requests.

A tee proxy: listens on LISTEN (a unix socket path), forwards each
connection to UPSTREAM (the unix socket of a real server, e.g. nbdkit),
and writes every byte the *client* sent during that connection to
OUT_PREFIX-<n>.bin. The server's answers are forwarded, not recorded: the
fuzz target replays only the client side against our own server.

usage: capture.py LISTEN UPSTREAM OUT_PREFIX   (stops on SIGTERM/SIGINT)
"""
import os
import select
import signal
import socket
import sys
import threading


def session(client, upstream_path, out_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.connect(upstream_path)
    recorded = bytearray()
    peers = {client: server, server: client}
    open_ends = {client, server}
    try:
        while open_ends:
            ready, _, _ = select.select(list(open_ends), [], [], 30)
            if not ready:
                break
            for s in ready:
                data = s.recv(1 << 20)
                if not data:
                    open_ends.discard(s)
                    try:
                        peers[s].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                if s is client:
                    recorded += data
                peers[s].sendall(data)
    finally:
        client.close()
        server.close()
        with open(out_path, "wb") as f:
            f.write(recorded)


def main():
    listen, upstream, prefix = sys.argv[1:4]
    if os.path.exists(listen):
        os.unlink(listen)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(listen)
    lsock.listen(16)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    n = 0
    while True:
        conn, _ = lsock.accept()
        path = f"{prefix}-{n}.bin"
        n += 1
        threading.Thread(target=session, args=(conn, upstream, path), daemon=True).start()


if __name__ == "__main__":
    main()
