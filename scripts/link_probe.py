"""Measure the bandwidth between two nodes of the emulated cluster over TCP (scripts/cluster.sh).

    scripts/cluster.sh exec n2 python scripts/link_probe.py serve PORT BYTES &     # prints MB/s received
    scripts/cluster.sh exec n1 python scripts/link_probe.py send n2 PORT BYTES

The receiver times from the first byte to the last, so connection set-up and the sender's start do
not count; it prints one JSON line: {"bytes": ..., "seconds": ..., "bits_per_s": ...}.
"""
import json
import socket
import sys
import time

CHUNK = 1 << 20


def serve(port: int, nbytes: int):
    """Accept one connection, read nbytes, print the rate."""
    with socket.create_server(("", port)) as server:
        conn, _ = server.accept()
        with conn:
            got, t0 = 0, None
            while got < nbytes:
                chunk = conn.recv(CHUNK)
                if not chunk:
                    break
                t0 = t0 or time.perf_counter()
                got += len(chunk)
            seconds = time.perf_counter() - t0
            conn.sendall(b"k")
    print(json.dumps({"bytes": got, "seconds": seconds, "bits_per_s": 8 * got / seconds}), flush=True)


def send(host: str, port: int, nbytes: int):
    """Connect (retrying while the receiver starts), send nbytes, wait for the receiver's ack."""
    for _ in range(100):
        try:
            conn = socket.create_connection((host, port), timeout=30)
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit(f"link_probe: no receiver at {host}:{port}")
    block = bytes(CHUNK)
    with conn:
        sent = 0
        while sent < nbytes:
            conn.sendall(block[:min(CHUNK, nbytes - sent)])
            sent += min(CHUNK, nbytes - sent)
        conn.recv(1)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
