"""Readiness probes that ask the real thing, each a short blocking function for a worker thread.

- PostgreSQL: a protocol StartupMessage; an authentication request back means the server
  accepts connections (a server still starting answers with an error instead). With the
  password known (managed PostgreSQL), the probe logs in for real (SCRAM-SHA-256, as the
  image's pg_hba.conf asks) and tells a rejected password apart from "not ready yet".
- Redis: PING answered by +PONG (or -NOAUTH, which also proves it serves).
- Synapse: `/health` answers on the client port (listening) and the process's own metric
  `synapse_replication_tcp_resource_total_connections` is at least 1 (its Redis replication
  subscription is up). /health alone answers before replication is connected.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
import urllib.error
import urllib.request

REPLICATION_METRIC = "synapse_replication_tcp_resource_total_connections"


def _startup_message(user: str, database: str) -> bytes:
    """PostgreSQL's StartupMessage, protocol 3.0."""
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    body = struct.pack("!I", 196608) + params
    return struct.pack("!I", len(body) + 4) + body


def postgres_accepts(host: str, port: int, user: str, database: str, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_startup_message(user, database))
            reply = sock.recv(1)
    except OSError:
        return False
    return reply == b"R"


NOT_READY, LOGGED_IN, PASSWORD_REJECTED, REFUSED = (
    "not ready", "logged in", "password rejected", "refused")
# After a successful authentication: errors that no restart of PostgreSQL will fix.
LASTING_SQLSTATES = ("3D000", "28000", "42501")  # no such database, role may not log in, ...


def _pg_message(sock: socket.socket) -> tuple[bytes, bytes]:
    head = _recv_exact(sock, 5)
    length = struct.unpack("!I", head[1:])[0]
    return head[:1], _recv_exact(sock, length - 4)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _pg_send(sock: socket.socket, kind: bytes, body: bytes) -> None:
    sock.sendall(kind + struct.pack("!I", len(body) + 4) + body)


def _pg_error(body: bytes) -> tuple[str, str]:
    """(SQLSTATE, message) of an ErrorResponse."""
    fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
    return fields.get(b"C", ""), fields.get(b"M", "")


def postgres_login(host: str, port: int, user: str, database: str, password: str,
                   timeout: float = 2.0) -> tuple[str, str]:
    """Log in as `user` to `database` and wait for the session to be ready for queries.
    (LOGGED_IN, ""), (PASSWORD_REJECTED, message) for SQLSTATE 28P01, (REFUSED, message) for a
    lasting refusal after authentication (no such database, role may not log in), or
    (NOT_READY, "") for no answer, a server starting up, or anything else."""
    if not password.isascii():  # SCRAM wants SASLprep of such passwords: only ask "accepting?"
        ok = postgres_accepts(host, port, user, database, timeout)
        return (LOGGED_IN if ok else NOT_READY), ""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_startup_message(user, database))
            nonce = base64.b64encode(os.urandom(18)).decode()
            client_first_bare = f"n=,r={nonce}"
            salted = auth_message = None
            authenticated = False
            while True:
                kind, msg = _pg_message(sock)
                if kind == b"E":
                    code, text = _pg_error(msg)
                    if code == "28P01":
                        return PASSWORD_REJECTED, text
                    if authenticated and code in LASTING_SQLSTATES:
                        return REFUSED, text
                    return NOT_READY, ""
                if kind == b"Z":  # ReadyForQuery: the session is usable
                    _pg_send(sock, b"X", b"")  # Terminate, so the server logs no reset
                    return LOGGED_IN, ""
                if kind != b"R":
                    continue  # ParameterStatus, BackendKeyData, NoticeResponse
                step = struct.unpack("!I", msg[:4])[0]
                if step == 0:  # AuthenticationOk; the session starts next
                    authenticated = True
                elif step == 3:  # cleartext password
                    _pg_send(sock, b"p", password.encode() + b"\0")
                elif step == 5:  # MD5
                    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + msg[4:8]).hexdigest()
                    _pg_send(sock, b"p", b"md5" + outer.encode() + b"\0")
                elif step == 10:  # SASL: start SCRAM-SHA-256
                    first = f"n,,{client_first_bare}".encode()
                    _pg_send(sock, b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first))
                             + first)
                elif step == 11:  # SASL continue: the server's first message
                    server_first = msg[4:].decode()
                    attrs = dict(item.split("=", 1) for item in server_first.split(","))
                    if not attrs["r"].startswith(nonce):
                        return NOT_READY, ""
                    salted = hashlib.pbkdf2_hmac("sha256", password.encode(),
                                                 base64.b64decode(attrs["s"]), int(attrs["i"]))
                    final_bare = f"c=biws,r={attrs['r']}"
                    auth_message = f"{client_first_bare},{server_first},{final_bare}".encode()
                    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
                    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message,
                                         "sha256").digest()
                    proof = bytes(a ^ b for a, b in zip(client_key, signature))
                    _pg_send(sock, b"p", f"{final_bare},p={base64.b64encode(proof).decode()}"
                             .encode())
                elif step == 12:  # SASL final: the server proves it knows the password too
                    if salted is None or auth_message is None:
                        return NOT_READY, ""
                    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
                    expected = base64.b64encode(hmac.new(server_key, auth_message,
                                                         "sha256").digest()).decode()
                    if msg[4:].decode() != f"v={expected}":
                        return NOT_READY, ""
                else:
                    return NOT_READY, ""
    except (OSError, ValueError, KeyError):
        return NOT_READY, ""


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
