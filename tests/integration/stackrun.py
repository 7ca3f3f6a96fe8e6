"""Helpers for integration tests that run a whole stack through the real daemon.

`StackRun` writes a stack directory with `synapsectl init`, runs `synapse-supervisor` as a
subprocess (JSON logs to a file), records Docker's own event stream for the stack, and talks to
it through `synapsectl` and the Matrix client API, as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import docker
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STACK_LABEL = "synapse-supervisor.stack"


def processes():
    """(pid, argv as a list of bytes) of every process of this host that can be read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[-1] == b"":
            args.pop()
        yield int(entry.name), args


def edit_yaml(path: Path, change) -> None:
    """Load a YAML file, let `change` modify the data in place, write it back."""
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: dict | None = None, token: str | None = None,
              timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw or b"{}")
        except ValueError:
            return err.code, {"raw": raw.decode(errors="replace")}


def metrics_text(ip: str, port: int = 9000) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{ip}:{port}/_synapse/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class EventRecorder:
    """Docker's own event stream for one stack, as (action, instance, time) tuples."""

    def __init__(self, client: docker.DockerClient, stack: str) -> None:
        self.events: list[tuple[str, str, float]] = []
        self._stream = client.api.events(
            decode=True, filters={"type": "container", "label": [f"{STACK_LABEL}={stack}"]})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self._stream:
                attrs = (ev.get("Actor") or {}).get("Attributes") or {}
                self.events.append((ev.get("Action", ""),
                                    attrs.get("synapse-supervisor.instance", ""),
                                    int(ev.get("timeNano", 0)) / 1e9))
        except Exception:
            pass

    def of(self, action: str, since: float = 0.0) -> list[tuple[str, float]]:
        return [(inst, t) for a, inst, t in self.events if a == action and t >= since]

    def close(self) -> None:
        self._stream.close()


class StackRun:
    def __init__(self, directory: Path, name: str, workers: dict[str, int],
                 client: docker.DockerClient, restart: dict | None = None) -> None:
        self.dir = directory
        self.name = name
        self.client = client
        self.client_port = free_port()
        self.metrics_port = free_port()
        self.log_path = directory.parent / f"{name}-daemon.log"
        subprocess.run(
            [str(VENV_BIN / "synapsectl"), "init", str(directory), "--server-name",
             f"{name}.test", "--name", name, "--isolated", "--client-port",
             str(self.client_port), "--federation-port", str(free_port()),
             "--metrics-port", str(self.metrics_port)], check=True, capture_output=True)
        self.stack_file = directory / "stack.yaml"
        data = yaml.safe_load(self.stack_file.read_text())
        data["workers"] = workers
        data["daemon"]["control_socket"] = str(directory / "control.sock")
        data["restart"].update(restart or {})
        self.stack_file.write_text(yaml.safe_dump(data, sort_keys=False))
        hs = yaml.safe_load((directory / "homeserver.yaml").read_text())
        hs["rc_login"] = {"address": {"per_second": 100, "burst_count": 100},
                          "account": {"per_second": 100, "burst_count": 100}}
        hs["rc_message"] = {"per_second": 100, "burst_count": 100}
        (directory / "homeserver.yaml").write_text(yaml.safe_dump(hs, sort_keys=False))
        self.events = EventRecorder(client, name)
        self.proc: subprocess.Popen | None = None

    # --- the daemon -------------------------------------------------------------------

    def start_daemon(self) -> subprocess.Popen:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "synapse-supervisor"), "--stack", str(self.stack_file),
             "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        return self.proc

    @contextlib.contextmanager
    def serving(self):
        """The daemon started and the stack ready for the `with` block; everything of the
        stack removed afterwards (also when the start fails)."""
        try:
            self.start_daemon()
            self.wait_ready()
            yield self
        finally:
            self.cleanup()

    def wait_ready(self, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_tail()}")
            code, out, _ = self.ctl("status", "--json")
            if code in (0, 1) and out:
                last = json.loads(out)
                if last["state"] == "ready":
                    return last
            time.sleep(0.3)
        raise AssertionError(f"stack not ready in {timeout}s: {last}\n{self.log_tail()}")

    def ctl(self, *args: str, stdin: str | None = None, timeout: float = 600):
        proc = subprocess.run([str(VENV_BIN / "synapsectl"), *args, "--stack",
                               str(self.stack_file)], capture_output=True, text=True,
                              input=stdin, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def status(self) -> dict:
        code, out, err = self.ctl("status", "--json")
        assert out, err
        return json.loads(out)

    def row(self, instance: str) -> dict:
        return next(c for c in self.status()["containers"] if c["instance"] == instance)

    def stop_daemon(self, sig=signal.SIGTERM, timeout: float = 120) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        return self.proc.wait(timeout=timeout)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def log_events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    # --- docker views -----------------------------------------------------------------

    def containers(self) -> dict[str, docker.models.containers.Container]:
        found = self.client.containers.list(all=True, filters={"label": f"{STACK_LABEL}={self.name}"})
        return {c.labels["synapse-supervisor.instance"]: c for c in found}

    def ip(self, instance: str) -> str:
        c = self.containers()[instance]
        c.reload()
        return next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.events.close()
        flt = {"label": f"{STACK_LABEL}={self.name}"}
        for c in self.client.containers.list(all=True, filters=flt):
            c.remove(force=True, v=False)
        for n in self.client.networks.list(filters=flt):
            n.remove()
        for v in self.client.volumes.list(filters=flt):
            v.remove(force=True)


def snapshot_docker(client: docker.DockerClient) -> tuple:
    """Everything `docker ps -a`, networks and volumes show, to prove nothing changed."""
    containers = sorted((c.id, c.status, c.attrs["State"].get("StartedAt"))
                        for c in client.containers.list(all=True))
    networks = sorted(n.id for n in client.networks.list())
    volumes = sorted(v.name for v in client.volumes.list())
    return containers, networks, volumes


# --- added for the reliability suite (generic; nothing above changed) ---------------------


class Chat:
    """One user and one room on a running stack, to prove that no message is lost across a
    fault: `send` writes uniquely numbered messages, `missing` reads the whole room back via
    /messages and returns what it did not find. Both retry through transient errors (a
    restarting worker, stale database connections after a PostgreSQL restart) until their
    deadline; a PUT with the same transaction id is idempotent, so a retry never duplicates."""

    PASSWORD = "correct horse battery staple"

    def __init__(self, run: "StackRun", user: str = "alice", timeout: float = 120) -> None:
        self.run = run
        self.user = user
        self.sent: list[str] = []
        self._txn = 0
        pw = run.dir.parent / f"{run.name}-{user}.pw"
        pw.write_text(self.PASSWORD + "\n")
        code, out, err = run.ctl("register", user, "--password-file", str(pw))
        assert code == 0, (out, err)
        code, login = self._retry("POST", "/_matrix/client/v3/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
            "password": self.PASSWORD}, timeout=timeout)
        self.token = login["access_token"]
        code, room = self._retry("POST", "/_matrix/client/v3/createRoom",
                                 {"name": f"{run.name} reliability"}, timeout=timeout)
        self.room = room["room_id"]

    def _retry(self, method: str, path: str, body: dict | None = None,
               timeout: float = 120) -> tuple[int, dict]:
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                code, data = http_json(method, self.run.client_url + path, body,
                                       getattr(self, "token", None), timeout=30)
                if code == 200:
                    return code, data
                last = (code, data)
                if code < 500 and code != 429:
                    raise AssertionError(f"{method} {path}: {code} {data}")
            except (urllib.error.URLError, ConnectionError, OSError) as err:
                last = err
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} {path}: no success in {timeout}s (last {last})")
            time.sleep(0.5)

    def send(self, n: int, tag: str, timeout: float = 120) -> list[str]:
        bodies = []
        for _ in range(n):
            self._txn += 1
            body = f"{tag} #{self._txn} {os.urandom(4).hex()}"
            self._retry("PUT", f"/_matrix/client/v3/rooms/{self.room}/send/m.room.message/"
                        f"t{self._txn}-{os.getpid()}", {"msgtype": "m.text", "body": body},
                        timeout=timeout)
            bodies.append(body)
        self.sent += bodies
        return bodies

    def read_all(self, timeout: float = 120) -> list[str]:
        """Every m.room.message body in the room, oldest first (paginates /messages)."""
        bodies: list[str] = []
        start = None
        while True:
            query = "dir=b&limit=100" + (f"&from={start}" if start else "")
            _, page = self._retry("GET", f"/_matrix/client/v3/rooms/{self.room}/messages?"
                                  + query, timeout=timeout)
            bodies += [e["content"].get("body") for e in page.get("chunk", [])
                       if e.get("type") == "m.room.message"]
            if not page.get("chunk") or not page.get("end"):
                return bodies[::-1]
            start = page["end"]

    def missing(self, timeout: float = 120) -> list[str]:
        """Messages sent but not readable; polls until none is missing or the deadline
        (a restarted worker may take a moment to catch up on replication)."""
        deadline = time.monotonic() + timeout
        while True:
            found = set(self.read_all(timeout=max(5.0, deadline - time.monotonic())))
            lost = [b for b in self.sent if b not in found]
            if not lost or time.monotonic() > deadline:
                return lost
            time.sleep(1.0)


def docker_objects(client: docker.DockerClient) -> dict[str, tuple]:
    """Like `snapshot_docker`, keyed by id, with names and stack labels, so that a difference
    can be attributed: {id: (kind, name, stack label, status, StartedAt)}."""
    out: dict[str, tuple] = {}
    api = client.api
    for summary in api.containers(all=True):
        try:  # other sessions remove containers meanwhile: skip what vanished
            c = api.inspect_container(summary["Id"])
        except docker.errors.NotFound:
            continue
        out[c["Id"]] = ("container", c["Name"].lstrip("/"),
                        (c["Config"].get("Labels") or {}).get(STACK_LABEL, ""),
                        c["State"].get("Status"), c["State"].get("StartedAt"))
    for n in api.networks():
        out[n["Id"]] = ("network", n["Name"], (n.get("Labels") or {}).get(STACK_LABEL, ""),
                        "", "")
    for v in api.volumes().get("Volumes") or []:
        out["volume:" + v["Name"]] = ("volume", v["Name"],
                                      (v.get("Labels") or {}).get(STACK_LABEL, ""), "", "")
    return out


def docker_changes(before: dict[str, tuple], after: dict[str, tuple],
                   stacks: tuple[str, ...] = ()) -> list[str]:
    """What differs between two `docker_objects` views. With `stacks`, only objects of those
    stacks (by label or by the `<stack>-` name prefix the daemon uses) count: concurrent test
    sessions on the same engine create and remove their own objects meanwhile."""
    def ours(entry: tuple) -> bool:
        if not stacks:
            return True
        _, name, label, _, _ = entry
        return label in stacks or any(name.startswith(f"{s}-") for s in stacks)

    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new or not ours(old or new):
            continue
        if old is None:
            changes.append(f"created {new[0]} {new[1]}")
        elif new is None:
            changes.append(f"removed {old[0]} {old[1]}")
        else:
            changes.append(f"changed {old[0]} {old[1]}: {old[3:]} -> {new[3:]}")
    return changes


def raw_control(path: str | Path, request: bytes, timeout: float = 60) -> tuple[int, dict, bytes]:
    """Send raw bytes to a control socket; returns (HTTP status, parsed JSON body or {},
    raw body). For requests synapsectl would never send."""
    import re
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    try:
        sock.sendall(request)
        data = b""
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and m and len(body) >= int(m.group(1)):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    if data.startswith(b"HTTP/"):
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
    else:  # an HTTP/0.9-style answer (to a request line that is not HTTP/1.x): body only
        status, body = 0, data
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {}
    return status, parsed if isinstance(parsed, dict) else {}, body


def http_request(method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request as bytes (for `raw_control`)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def daemon_metrics(run: "StackRun") -> str:
    """The daemon's own Prometheus text (daemon.metrics_address)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{run.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample whose labels include `labels`, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None
