"""The control API: HTTP over a unix socket owned by the daemon (docs/control-api.md).

Every answer is one JSON envelope: {"ok": true, "data": ...} or
{"ok": false, "error": {"code": "...", "message": "one line"}}. Requests are served in their own
threads but run in the loop thread (`CallMsg`), so nothing interleaves with the supervisor's
own decisions; a second state-changing request while one runs gets 409 `busy`.
The socket is mode 0660 (group from the stack file); peers outside root and that group are
refused by the kernel's permission check, and again here with SO_PEERCRED.

  GET  /v1/status                      the stack and a row per container
  GET  /v1/targets                     Prometheus http_sd target groups
  GET  /v1/logs?instance=A&tail=N&follow=1&since=T   container output, "instance | line"
  POST /v1/start | /v1/stop            the stack's containers, in order; the daemon stays
  POST /v1/restart   {"instances": []} all (in order) or only those
  POST /v1/reload                      re-read the stack file and apply the difference
  POST /v1/register  {"user", "password", "admin"}   shared-secret registration on main
"""

from __future__ import annotations

import grp
import json
import os
import socket
import socketserver
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from . import operations
from .errors import ConfigError, SupervisorError
from .loop import CallMsg, Supervisor

CALL_TIMEOUT = 3600.0


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True


class ControlServer:
    def __init__(self, sup: Supervisor, path: Path, group: str | None = None) -> None:
        self.sup = sup
        self.path = path
        self.busy = threading.Lock()
        self.busy_with: str | None = None
        self.closing = False  # set when the daemon's final ordered stop begins
        try:
            self.gid = grp.getgrnam(group).gr_gid if group else None
        except KeyError:
            raise ConfigError(sup.stack.stack_file, "daemon.control_group", f"no group {group!r} "
                              "on this host", "create it (groupadd) or remove the key") from None
        handler = type("Handler", (_Handler,), {"control": self})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                path.unlink()
            self.server = _Server(str(path), handler)
        except OSError as err:
            raise ConfigError(sup.stack.stack_file, "daemon.control_socket",
                              f"cannot create {path}: {err.strerror}",
                              "point it at a writable directory, e.g. under /run") from None
        os.chmod(path, 0o660)
        if self.gid is not None:
            os.chown(path, -1, self.gid)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       name="control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def peer_allowed(self, sock: socket.socket) -> bool:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        if uid in (0, os.geteuid()):
            return True
        if self.gid is None:
            return False
        try:
            import pwd
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            return gid == self.gid
        return gid == self.gid or name in grp.getgrgid(self.gid).gr_mem

    def call(self, func, timeout: float = CALL_TIMEOUT):
        msg = CallMsg(func)
        self.sup.queue.put(msg)
        ok, value = msg.reply.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def run_here(self, name: str, func):
        """Run a state-changing operation in the calling (loop) thread, exclusively."""
        return self._exclusive(name, lambda: func(self.sup))

    def mutate(self, name: str, func):
        """Run a state-changing operation in the loop thread, from a request thread."""
        return self._exclusive(name, lambda: self.call(func))

    def _exclusive(self, name: str, run):
        if self.closing:
            raise operations.OperationError(
                "stopping", "the daemon is stopping the stack and exiting (fix: start it "
                "again, e.g. systemctl start synapse-stack)")
        if not self.busy.acquire(blocking=False):
            raise operations.OperationError(
                "busy", f"the daemon is busy with {self.busy_with} (fix: wait, then retry)")
        self.busy_with = name
        try:
            return run()
        finally:
            self.busy_with = None
            self.busy.release()


class _Handler(BaseHTTPRequestHandler):
    control: ControlServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:  # the daemon logs requests itself
        pass

    def address_string(self) -> str:
        return "unix"

    def _send(self, status: int, payload: dict) -> None:
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None) -> None:
        """Errors raised by http.server itself (bad request line, unknown method) get the
        same JSON envelope as everything else."""
        self.close_connection = True
        names = {400: "bad_request", 404: "not_found", 405: "bad_method", 501: "bad_method",
                 414: "bad_request", 431: "bad_request"}
        text = message or self.responses.get(code, ("error",))[0]
        try:
            self._error(code, names.get(code, "bad_request"), f"{text} (fix: see "
                        "docs/control-api.md for the endpoints)", 2)
        except OSError:
            pass

    def _ok(self, data) -> None:
        self._send(200, {"ok": True, "data": data})

    def _error(self, status: int, code: str, message: str, exit_code: int = 1) -> None:
        self._send(status, {"ok": False, "error": {"code": code, "message": message,
                                                    "exit_code": exit_code}})

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise operations.OperationError("bad_request", "Content-Length is not a number",
                                            2) from None
        if not length:
            return {}
        try:
            data = json.loads(self.rfile.read(length))
        except ValueError:
            raise operations.OperationError("bad_request", "request body is not JSON", 2)
        if not isinstance(data, dict):
            raise operations.OperationError("bad_request", "request body must be an object", 2)
        return data

    def _dispatch(self, method: str) -> None:
        if not self.control.peer_allowed(self.connection):
            self._error(403, "forbidden", "not in the control socket's group", 3)
            return
        url = urlparse(self.path)
        route = ROUTES.get((method, url.path))
        if route is None:
            self._error(404, "not_found", f"no such endpoint: {method} {url.path}", 2)
            return
        try:
            route(self, parse_qs(url.query))
        except operations.OperationError as err:
            status = 409 if err.code == "busy" else 400 if err.exit_code == 2 else 500
            self._error(status, err.code, str(err), err.exit_code)
        except SupervisorError as err:
            self._error(500, "failed", str(err), err.exit_code)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # never kill the server thread
            self._error(500, "internal", f"{type(err).__name__}: {err}")
        self.control.sup.log.info("control_request", method=method, path=url.path)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _bad_method(self) -> None:
        self._error(405, "bad_method", f"{self.command} is not used by this API (fix: GET or "
                    "POST, see docs/control-api.md)", 2)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _bad_method

    # --- endpoints ------------------------------------------------------------------------

    def status(self, query) -> None:
        self._ok(self.control.call(operations.status))

    def targets(self, query) -> None:
        self._ok(self.control.call(operations.metrics_targets))

    def start(self, query) -> None:
        self._ok(self.control.mutate("start", operations.start))

    def stop(self, query) -> None:
        self._ok(self.control.mutate("stop", operations.stop))

    def restart(self, query) -> None:
        instances = self._body().get("instances") or []
        if not isinstance(instances, list) or not all(isinstance(i, str) for i in instances):
            raise operations.OperationError("bad_request", "instances must be a list of names", 2)
        self._ok(self.control.mutate("restart",
                                     lambda s: operations.restart(s, instances)))

    def reload(self, query) -> None:
        self._ok(self.control.mutate("reload", operations.reload))

    def register(self, query) -> None:
        body = self._body()
        user, password = body.get("user"), body.get("password")
        if not isinstance(user, str) or not user or not isinstance(password, str) or \
                not password:
            raise operations.OperationError("bad_request", "user and password are required", 2)
        admin = bool(body.get("admin"))
        self._ok(self.control.call(lambda s: operations.register(s, user, password, admin)))

    def logs(self, query) -> None:
        sup = self.control.sup
        names = [n for v in query.get("instance", []) for n in v.split(",") if n]
        ids = self.control.call(lambda s: {i: r.container_id for i, r in s.records.items()})
        unknown = [n for n in names if n not in ids]
        if unknown:
            raise operations.OperationError("unknown_instance", f"unknown instance "
                                            f"{unknown[0]!r} (fix: use one of {', '.join(ids)})",
                                            2)
        names = names or list(ids)
        tail = (query.get("tail") or ["all"])[0]
        if tail != "all" and not tail.isdigit():
            raise operations.OperationError("bad_request", f"tail={tail!r}: use a number of "
                                            "lines or all", 2)
        tail = int(tail) if tail.isdigit() else "all"
        follow = (query.get("follow") or ["0"])[0] == "1"
        try:
            since = float((query.get("since") or ["0"])[0] or 0) or None
        except ValueError:
            raise operations.OperationError("bad_request", "since: use seconds since the "
                                            "epoch", 2) from None
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Connection", "close")
        self.end_headers()
        width = max(len(n) for n in names)
        lock = threading.Lock()

        def pump(name: str, cid: str) -> None:
            try:
                out = sup.engine.logs(cid, tail=tail, since=since, follow=follow)
                chunks = out if follow else [out]
                buf = b""
                for chunk in chunks:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    with lock:
                        for line in lines:
                            self.wfile.write(f"{name:<{width}} | ".encode() + line + b"\n")
                        self.wfile.flush()
                if buf:
                    with lock:
                        self.wfile.write(f"{name:<{width}} | ".encode() + buf + b"\n")
            except (BrokenPipeError, ConnectionResetError, OSError):
                return

        threads = [threading.Thread(target=pump, args=(n, ids[n]), daemon=True)
                   for n in names if ids[n]]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
        self.close_connection = True


ROUTES = {
    ("GET", "/v1/status"): _Handler.status,
    ("GET", "/v1/targets"): _Handler.targets,
    ("GET", "/v1/logs"): _Handler.logs,
    ("POST", "/v1/start"): _Handler.start,
    ("POST", "/v1/stop"): _Handler.stop,
    ("POST", "/v1/restart"): _Handler.restart,
    ("POST", "/v1/reload"): _Handler.reload,
    ("POST", "/v1/register"): _Handler.register,
}
