#!/usr/bin/env python3
"""synapse-supervisor/stub:1 -- an ORCHESTRATION-ONLY stand-in for a Synapse process.

It proves nothing about Synapse: it reads no config and serves no Matrix API. It only behaves
like Synapse towards a supervisor: after STUB_DELAY seconds (default 1) it listens, serves
/health (200) on 8008 and /_synapse/metrics on 9000 with the replication metric at 1, then sends
READY=1 to $NOTIFY_SOCKET (a unix datagram socket). SIGTERM: exit 0.
"""
import http.server
import os
import signal
import socket
import sys
import threading
import time

METRICS = (b"# TYPE synapse_replication_tcp_resource_total_connections gauge\n"
           b"synapse_replication_tcp_resource_total_connections 1\n")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        port = self.server.server_address[1]
        body = {(8008, "/health"): b"OK", (9000, "/_synapse/metrics"): METRICS}.get(
            (port, self.path))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def notify(message: bytes) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, "\0" + path[1:] if path.startswith("@") else path)
    except OSError as err:
        print(f"stub: notify failed: {err}", flush=True)


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(float(os.environ.get("STUB_DELAY", "1")))
for port in (8008, 9000):
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
notify(b"READY=1")
print(f"stub: ready ({os.environ.get('SYNAPSE_WORKER_NAME', '?')})", flush=True)
while True:
    time.sleep(3600)
