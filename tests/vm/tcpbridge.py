"""qemu user-mode networking's `guestfwd=...-cmd:` end: relay one guest connection (on fd 0) to a TCP
address on this machine's loopback. qemu starts one per connection the guest opens, so a re-login after
a target restart gets a fresh one. Usage: tcpbridge.py 127.0.0.1 PORT"""

from __future__ import annotations

import selectors
import socket
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    if not host.startswith("127."):
        return 2  # loopback only
    guest = socket.socket(fileno=0)
    try:
        upstream = socket.create_connection((host, port), timeout=5)
    except OSError:
        return 1  # nothing listens (the filer is down): the guest sees the connection close
    upstream.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(guest, selectors.EVENT_READ, upstream)
    sel.register(upstream, selectors.EVENT_READ, guest)
    while True:
        for key, _ in sel.select():
            try:
                data = key.fileobj.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                return 0
            try:
                key.data.sendall(data)
            except OSError:
                return 0


if __name__ == "__main__":
    sys.exit(main())
