"""Readiness probes that ask the real thing, each a short blocking function for a worker thread.

- PostgreSQL: a protocol StartupMessage; an authentication request back means the server
  accepts connections (a server still starting answers with an error instead).
- Redis: PING answered by +PONG (or -NOAUTH, which also proves it serves).
- Synapse: `/health` answers on the client port (listening) and the process's own metric
  `synapse_replication_tcp_resource_total_connections` is at least 1 (its Redis replication
  subscription is up). /health alone answers before replication is connected.
"""

from __future__ import annotations

import socket
import struct
import urllib.error
import urllib.request

REPLICATION_METRIC = "synapse_replication_tcp_resource_total_connections"


def postgres_accepts(host: str, port: int, user: str, database: str, timeout: float = 1.0) -> bool:
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    body = struct.pack("!I", 196608) + params  # protocol 3.0
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("!I", len(body) + 4) + body)
            reply = sock.recv(1)
    except OSError:
        return False
    return reply == b"R"


def redis_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def http_answers(url: str, timeout: float = 1.0) -> bool:
    """Any HTTP answer at all (a proxy's /health says 503 while a worker is down)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def metric_value(text: str, name: str) -> float | None:
    total = None
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            try:
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return total


def replication_connected(host: str, metrics_port: int, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{metrics_port}/_synapse/metrics",
                                    timeout=timeout) as resp:
            text = resp.read().decode(errors="replace")
    except OSError:
        return False
    value = metric_value(text, REPLICATION_METRIC)
    return value is not None and value >= 1


def synapse_ready(host: str, client_port: int, metrics_port: int) -> bool:
    return http_ok(f"http://{host}:{client_port}/health") and \
        replication_connected(host, metrics_port)
