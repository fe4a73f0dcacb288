#!/usr/bin/env python3
"""Open N keep-alive connections to HOST:PORT, send one request on each, read its response,
then hold them all idle. Writes "READY <ok> <failed>" to READY_FILE and holds them until
READY_FILE.release exists or HOLD seconds pass. Standard library only."""
import os, select, socket, sys, time

host, port, n, ready_file, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
socks, failed = [], 0
deadline = time.monotonic() + 120
for i in range(n):
    if time.monotonic() > deadline:
        failed += n - i
        break
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(req)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"ok"):
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("closed")
            data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise OSError("status")
        socks.append(s)
    except OSError:
        failed += 1
# still open? (a proxy may have dropped some meanwhile)
poller = select.poll()
for s in socks:
    poller.register(s, select.POLLIN)
r = poller.poll(500)  # readable = closed by the peer (or unexpected bytes)
alive = len(socks) - len(r)
with open(ready_file + ".tmp", "w") as f:
    f.write(f"READY {alive} {failed + len(r)}\n")
os.rename(ready_file + ".tmp", ready_file)
release = ready_file + ".release"
end = time.monotonic() + hold
while time.monotonic() < end and not os.path.exists(release):
    time.sleep(0.1)
