"""Integration tests of the nginx reverse-proxy image with configs from supervisor/proxy_config.

Fake upstreams (the base image running a tiny Python server that answers with its own name)
stand in for main and the workers under their real network aliases; the proxy runs hardened
the way the daemon will run it (read-only root, tmpfs /tmp, no capabilities, uid 101, the config
DIRECTORY bind-mounted read-only) and is reached on 127.0.0.1.

Run: .venv/bin/python -m pytest tests/integration/test_proxy_image.py
"""

from __future__ import annotations

import base64
import json
import os
import random
import string
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from supervisor import proxy_config as pc
from supervisor import stackfile

from .conftest import published_port, wait_healthy, wait_http

pytestmark = pytest.mark.integration

WORKERS = {"sync": 2, "client_reader": 1, "event_creator": 1, "federation_reader": 2,
           "media_repository": 1, "typing": 1, "event_persister": 1}
UPSTREAMS = ["main", "sync-1", "sync-2", "client-reader-1", "event-creator-1",
             "federation-reader-1", "federation-reader-2", "media-repository-1", "typing-1"]

# Answers every request with its name, the port it was reached on, and what it received.
FAKE_SERVER = r"""
import http.server, json, os, re, socketserver, threading, time
NAME = os.environ["NAME"]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        delay = re.search(r"[?&]sleep=([0-9.]+)", self.path)
        if delay:  # a long-poll stand-in
            time.sleep(float(delay.group(1)))
        body = json.dumps({"name": NAME, "port": self.server.server_address[1],
                           "method": self.command, "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = answer
    def log_message(self, *args):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
for port in (8008, 8448):
    threading.Thread(target=S(("0.0.0.0", port), H).serve_forever, daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""


def request(url: str, method: str = "GET", headers: dict | None = None,
            body: bytes | None = None, timeout: float = 10) -> tuple[int, dict, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def who(url: str, method: str = "GET", headers: dict | None = None) -> dict:
    status, _, body = request(url, method, headers,
                              body=b"{}" if method in ("POST", "PUT") else None)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


class Proxy:
    """One proxy container and its mounted config directory."""

    def __init__(self, container, conf_dir: Path, stack):
        self.container = container
        self.conf_dir = conf_dir
        self.stack = stack
        self.client = f"http://127.0.0.1:{published_port(container, '8008/tcp')}"
        self.federation = f"http://127.0.0.1:{published_port(container, '8448/tcp')}"

    def url(self, path: str) -> str:
        base = self.federation if pc.server_of_path(path) == pc.FEDERATION else self.client
        return base + path

    def write(self, text: str) -> None:
        """Replace nginx.conf atomically, as the daemon will (write + rename in the dir)."""
        tmp = self.conf_dir / ".nginx.conf.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.conf_dir / pc.CONFIG_FILE)

    def render(self, down=frozenset()) -> None:
        self.write(pc.render_nginx(self.stack, frozenset(down)))

    def nginx_t(self) -> tuple[int, str]:
        code, out = self.container.exec_run(list(pc.TEST_COMMAND))
        return code, out.decode(errors="replace")

    def reload(self) -> None:
        self.container.kill(signal=pc.RELOAD_SIGNAL)

    def wait_health(self, status: int, timeout: float = 15) -> None:
        wait_http(self.client + "/health", self.container, timeout=timeout, status=status)


def start_proxy(client, images, network, test_labels, unique_name, conf_dir: Path, stack,
                suffix: str) -> Proxy:
    container = client.containers.run(
        images["nginx"], command=list(pc.COMMAND), name=unique_name(suffix), detach=True,
        network=network.name, labels=test_labels, user=pc.CONTAINER_USER, read_only=True,
        tmpfs=pc.TMPFS,
        cap_drop=["ALL"], security_opt=["no-new-privileges"],
        volumes={str(conf_dir): {"bind": pc.CONFIG_DIR, "mode": "ro"}},
        ports={"8008/tcp": ("127.0.0.1", None), "8448/tcp": ("127.0.0.1", None)})
    proxy = Proxy(container, conf_dir, stack)
    wait_http(proxy.client + "/health", container, timeout=30)
    return proxy


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("proxy-stack")
    (directory / "stack.yaml").write_text(json.dumps({
        "name": "proxytest", "server_name": "proxy-test.local",
        "homeserver": "homeserver.yaml", "signing_key": "proxy-test.local.signing.key",
        "workers": WORKERS}))
    stack = stackfile.load(directory / "stack.yaml")
    names = [i.name for i in stack.instances if i.type in ("main", *pc.PRECEDENCE)]
    assert sorted(names) == sorted(UPSTREAMS)
    return stack


@pytest.fixture(scope="module")
def upstreams(docker_client, images, network, test_labels, unique_name):
    """A fake process per routed instance, reachable under the instance name."""
    api = docker_client.api
    containers = []
    for alias in UPSTREAMS:
        created = api.create_container(
            images["base"], command=["python3", "-c", FAKE_SERVER], name=unique_name(alias),
            environment={"NAME": alias}, labels=test_labels, user="65534:65534",
            host_config=api.create_host_config(network_mode=network.name, read_only=True,
                                               cap_drop=["ALL"]),
            networking_config=api.create_networking_config(
                {network.name: api.create_endpoint_config(aliases=[alias])}))
        api.start(created["Id"])
        containers.append(docker_client.containers.get(created["Id"]))
    deadline = time.monotonic() + 30
    for c in containers:
        while b"listening" not in c.logs():
            c.reload()
            assert c.status == "running", c.logs().decode(errors="replace")
            assert time.monotonic() < deadline, f"{c.name} did not start"
            time.sleep(0.1)
    return containers


@pytest.fixture(scope="module")
def proxy(docker_client, images, network, test_labels, unique_name, upstreams, stack,
          tmp_path_factory) -> Proxy:
    conf_dir = tmp_path_factory.mktemp("proxy-conf")
    os.chmod(conf_dir, 0o755)
    (conf_dir / pc.CONFIG_FILE).write_text(pc.render_nginx(stack))
    os.chmod(conf_dir / pc.CONFIG_FILE, 0o644)
    return start_proxy(docker_client, images, network, test_labels, unique_name, conf_dir,
                       stack, "proxy")


def token(localpart: str) -> str:
    b64 = base64.urlsafe_b64encode(localpart.encode()).decode().rstrip("=")
    rand = "".join(random.choices(string.ascii_letters, k=20))
    return f"syt_{b64}_{rand}_{''.join(random.choices(string.ascii_letters, k=6))}"


# --- the image --------------------------------------------------------------------------------


def test_nginx_t_passes(proxy):
    code, out = proxy.nginx_t()
    assert code == 0, out
    assert "test is successful" in out


def test_runs_as_non_root(proxy):
    assert proxy.container.attrs["Config"]["User"] in ("101:101", "")
    code, out = proxy.container.exec_run(["id", "-u"])
    assert (code, out.decode().strip()) == (0, "101")
    code, status = proxy.container.exec_run(["cat", "/proc/1/status"])
    uid_line = next(line for line in status.decode().splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["101"] * 4, uid_line
    # every nginx process (master and workers) runs as 101
    code, ps = proxy.container.exec_run(["sh", "-c", "for p in /proc/[0-9]*; do "
                                         "grep -H '^Uid:' $p/status; done"])
    uids = {line.split()[1] for line in ps.decode().splitlines()}
    assert uids == {"101"}, ps.decode()


def test_image_contract(docker_client, images):
    config = docker_client.images.get(images["nginx"]).attrs["Config"]
    assert config["User"] == f"{pc.PROXY_UID}:{pc.PROXY_UID}"
    assert config["StopSignal"] == pc.STOP_SIGNAL
    assert set(config["ExposedPorts"]) == {"8008/tcp", "8448/tcp"}
    assert config["Cmd"] == list(pc.COMMAND)
    assert config["Healthcheck"]["Test"][0] == "CMD"


def test_docker_health_is_healthy(proxy):
    wait_healthy(proxy.container, timeout=30)


# --- routing ----------------------------------------------------------------------------------

SAMPLES = [
    ("GET", "/_matrix/client/v3/sync?timeout=0"),
    ("GET", "/_matrix/client/v3/rooms/!r:proxy-test.local/messages?dir=b"),
    ("GET", "/_matrix/client/versions"),
    ("PUT", "/_matrix/client/v3/rooms/!r:proxy-test.local/send/m.room.message/t1"),
    ("PUT", "/_matrix/client/v3/rooms/!r:proxy-test.local/typing/@u:proxy-test.local"),
    ("GET", "/_matrix/media/v3/download/proxy-test.local/abc"),
    ("GET", "/_matrix/client/v1/media/download/proxy-test.local/abc"),
    ("GET", "/_matrix/federation/v1/media/download/abc"),
    ("PUT", "/_matrix/federation/v1/send/1700000000"),
    ("GET", "/_matrix/federation/v1/event/$ev"),
    ("POST", "/_matrix/key/v2/query"),
    ("GET", "/_matrix/key/v2/server"),
    ("GET", "/_matrix/client/v3/login/sso/redirect"),
    ("GET", "/_synapse/admin/v1/server_version"),
    ("GET", "/.well-known/matrix/client"),
    ("GET", "/some/unknown/path"),
]


@pytest.mark.parametrize("method,path", SAMPLES, ids=[f"{m} {p}" for m, p in SAMPLES])
def test_requests_land_where_the_table_says(proxy, stack, method, path):
    decision = pc.resolve(stack, method, path)
    got = who(proxy.url(path), method)
    assert got["name"] in decision.target.instances, (path, decision.target, got["name"])
    expected_port = 8448 if decision.target.upstream in (
        "main_federation", "federation_reader", "federation_reader_by_source_ip") else 8008
    assert got["port"] == expected_port
    # the request line reaches the upstream unchanged (no URI part in proxy_pass)
    assert got["path"] == path


def test_legacy_media_on_the_federation_port_goes_to_the_media_worker(proxy):
    got = who(proxy.federation + "/_matrix/media/v3/download/proxy-test.local/abc")
    assert (got["name"], got["port"]) == ("media-repository-1", 8008)


def test_raw_uri_is_passed_unchanged(proxy):
    """Percent-encoding and double slashes survive: federation signatures cover the raw URI."""
    path = "/_matrix/federation/v1/send/txn%2F1%3Aa?x=%2F//"
    got = who(proxy.federation + path, "PUT")
    assert got["path"] == path and got["name"].startswith("federation-reader-")
    path = "/_matrix/client/v3/rooms/%21r%3Aproxy-test.local/messages?from=a%2Fb"
    got = who(proxy.client + path)
    assert got["path"] == path and got["name"] == "client-reader-1"


def test_forwarded_headers_and_keepalive(proxy):
    got = who(proxy.client + "/_matrix/client/versions",
              headers={"Host": "matrix.proxy-test.local", "X-Forwarded-For": "6.6.6.6"})
    h = got["headers"]
    assert h["host"] == "matrix.proxy-test.local"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-for"] != "6.6.6.6"  # replaced by the real peer, not appended to
    assert "," not in h["x-forwarded-for"]
    assert "connection" not in h  # HTTP/1.1 keepalive to upstreams


def test_uploads_stream_and_the_body_limit_holds(proxy):
    status, _, body = request(proxy.client + "/_matrix/media/v3/upload?filename=a.bin", "POST",
                              headers={"Content-Type": "application/octet-stream"},
                              body=os.urandom(8 * 1024 * 1024))
    assert status == 200 and json.loads(body)["name"] == "media-repository-1"
    status, _, _ = request(proxy.client + "/_matrix/media/v3/upload", "POST",
                           body=b"x" * (51 * 1024 * 1024))
    assert status == 413


def test_client_port_does_not_serve_federation_workers(proxy):
    # federation paths on 8008 go to main's client listener, never to a federation reader
    got = who(proxy.client + "/_matrix/federation/v1/send/1", "PUT")
    assert (got["name"], got["port"]) == ("main", 8008)


def test_replication_is_never_exposed(proxy):
    status, _, body = request(proxy.client + "/_synapse/replication/send_event/x", "POST",
                              body=b"{}")
    assert status == 404 and json.loads(body)["errcode"] == "M_UNRECOGNIZED"


def test_sync_sticks_to_one_instance_per_user(proxy):
    seen: dict[str, set[str]] = {}
    for n in range(16):
        user = f"user{n}"
        for _device in range(2):  # two devices: two tokens with the same localpart
            t = token(user)
            for _ in range(2):
                got = who(proxy.client + "/_matrix/client/v3/sync",
                          headers={"Authorization": f"Bearer {t}"})
                seen.setdefault(user, set()).add(got["name"])
            got = who(proxy.client + f"/_matrix/client/v3/sync?access_token={t}&timeout=0")
            seen[user].add(got["name"])
    assert all(len(names) == 1 for names in seen.values()), seen
    # 16 users over two instances: both get some (chance of failure 2**-15)
    assert set().union(*seen.values()) == {"sync-1", "sync-2"}


def test_federation_send_sticks_to_the_source_others_round_robin(proxy):
    sends = {who(proxy.federation + f"/_matrix/federation/v1/send/{n}", "PUT")["name"]
             for n in range(8)}
    assert len(sends) == 1
    reads = {who(proxy.federation + f"/_matrix/federation/v1/event/$e{n}")["name"]
             for n in range(8)}
    assert reads == {"federation-reader-1", "federation-reader-2"}


def test_health_is_ok(proxy):
    status, headers, body = request(proxy.client + "/health")
    assert (status, body) == (200, b"OK")
    status, _, body = request(proxy.federation + "/health")
    assert (status, body) == (200, b"OK")


# --- reloads -----------------------------------------------------------------------------------


def test_reload_switches_routing_without_restarting(proxy, stack):
    proxy.container.reload()
    started = proxy.container.attrs["State"]["StartedAt"]
    pid = proxy.container.attrs["State"]["Pid"]
    down = {"client-reader-1", "media-repository-1", "typing-1", "sync-1"}
    try:
        proxy.render(down)
        code, out = proxy.nginx_t()
        assert code == 0, out
        t0 = time.monotonic()
        proxy.reload()
        proxy.wait_health(503)
        reload_seconds = time.monotonic() - t0
        status, _, body = request(proxy.client + "/health")
        assert body.decode() == "down: client-reader-1, media-repository-1, sync-1, typing-1"

        # client_reader down: main serves its routes
        assert pc.route_for(stack, "GET", "/_matrix/client/versions", down) == "main"
        assert who(proxy.client + "/_matrix/client/versions")["name"] == "main"
        # one of two sync workers down: every user on the other one
        names = {who(proxy.client + "/_matrix/client/v3/sync",
                     headers={"Authorization": f"Bearer {token(f'u{n}')}"})["name"]
                 for n in range(8)}
        assert names == {"sync-2"}
        # media down: 503, a Matrix error, Retry-After
        path = "/_matrix/media/v3/download/proxy-test.local/abc"
        assert pc.route_for(stack, "GET", path, down) == "503"
        status, headers, body = request(proxy.client + path)
        assert status == 503
        assert headers.get("Retry-After") == "5"
        assert headers.get("Content-Type", "").startswith("application/json")
        err = json.loads(body)
        assert err["errcode"] == "M_UNKNOWN" and "media_repository" in err["error"]
        status, _, _ = request(proxy.federation + "/_matrix/federation/v1/media/download/x")
        assert status == 503
        # typing writer down: writes get 503 (main would answer 500)
        status, _, body = request(proxy.client + "/_matrix/client/v3/rooms/!r:x/typing/@u:x",
                                  "PUT", body=b"{}")
        assert status == 503 and "typing" in json.loads(body)["error"]
        # ... reads fall back to main
        assert who(proxy.client + "/_matrix/client/v3/rooms/!r:x/typing/@u:x")["name"] == "main"

        proxy.container.reload()
        assert proxy.container.attrs["State"]["StartedAt"] == started
        assert proxy.container.attrs["State"]["Pid"] == pid
        assert reload_seconds < 10
    finally:
        proxy.render()
        proxy.reload()
    proxy.wait_health(200)
    assert who(proxy.client + "/_matrix/client/versions")["name"] == "client-reader-1"


def test_nginx_s_reload_in_the_container_works_too(proxy):
    proxy.render({"typing-1"})
    code, out = proxy.container.exec_run(["nginx", "-s", "reload"])
    assert code == 0, out
    proxy.wait_health(503)
    proxy.render()
    code, out = proxy.container.exec_run(["nginx", "-s", "reload"])
    assert code == 0, out
    proxy.wait_health(200)


def test_invalid_config_fails_nginx_t_and_the_proxy_keeps_serving(proxy):
    good = (proxy.conf_dir / pc.CONFIG_FILE).read_text()
    try:
        proxy.write(good.replace("proxy_http_version 1.1;", "proxy_http_version 1.1"))
        code, out = proxy.nginx_t()
        assert code != 0 and "emerg" in out, out
        since = time.time()
        proxy.reload()  # nginx refuses the new config and keeps the old one
        deadline = time.monotonic() + 10
        while b"emerg" not in proxy.container.logs(since=int(since) - 1):
            assert time.monotonic() < deadline, "no error logged for the refused reload"
            time.sleep(0.1)
        proxy.container.reload()
        assert proxy.container.status == "running"
        assert request(proxy.client + "/health")[0] == 200
        assert who(proxy.client + "/_matrix/client/versions")["name"] == "client-reader-1"
    finally:
        proxy.write(good)


def test_admin_api_restriction(proxy, stack):
    path = "/_synapse/admin/v1/server_version"
    try:
        for allow in (("192.0.2.0/24",), ()):
            proxy.write(pc.render_nginx(stack, settings=pc.ProxySettings(admin_allow=allow)))
            code, out = proxy.nginx_t()
            assert code == 0, out
            proxy.reload()
            deadline = time.monotonic() + 10
            while request(proxy.client + path)[0] != 403:
                assert time.monotonic() < deadline, "admin API still reachable"
                time.sleep(0.1)
            status, _, body = request(proxy.client + "/_synapse/admin/v1/media/x/y")
            assert status == 403 and json.loads(body)["errcode"] == "M_FORBIDDEN"
            assert who(proxy.client + "/_matrix/client/versions")["name"] == "client-reader-1"
    finally:
        proxy.render()
        proxy.reload()
    deadline = time.monotonic() + 10
    while request(proxy.client + path)[0] != 200:
        assert time.monotonic() < deadline, "admin API not restored"
        time.sleep(0.1)
    assert who(proxy.client + path)["name"] == "main"


def test_unresolvable_upstream_fails_nginx_t(proxy, stack, tmp_path):
    """Why the daemon must list every instance without a running container in `down`."""
    directory = tmp_path / "bigger"
    directory.mkdir()
    data = {"name": "proxytest", "server_name": "proxy-test.local",
            "homeserver": "homeserver.yaml", "signing_key": "k", "workers": {**WORKERS,
                                                                             "sync": 3}}
    (directory / "stack.yaml").write_text(json.dumps(data))
    bigger = stackfile.load(directory / "stack.yaml")
    good = (proxy.conf_dir / pc.CONFIG_FILE).read_text()
    try:
        proxy.write(pc.render_nginx(bigger))
        code, out = proxy.nginx_t()
        assert code != 0 and "host not found in upstream" in out and "sync-3" in out, out
        proxy.write(pc.render_nginx(bigger, down={"sync-3"}))
        code, out = proxy.nginx_t()
        assert code == 0, out
    finally:
        proxy.write(good)


# --- stop ---------------------------------------------------------------------------------------


def test_graceful_stop_finishes_in_flight_requests(docker_client, images, network,
                                                   test_labels, unique_name, upstreams, stack,
                                                   tmp_path):
    """docker stop sends SIGQUIT: nginx stops accepting, lets a running long-poll finish,
    then exits 0 (SIGTERM would cut it)."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    os.chmod(conf_dir, 0o755)
    (conf_dir / pc.CONFIG_FILE).write_text(pc.render_nginx(stack))
    os.chmod(conf_dir / pc.CONFIG_FILE, 0o644)
    proxy = start_proxy(docker_client, images, network, test_labels, unique_name, conf_dir,
                        stack, "proxy-stop")
    result: dict = {}

    def long_poll():
        result["answer"] = request(proxy.client + "/_matrix/client/v3/sync?sleep=3", timeout=20)

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(1)  # the request is in flight
    t0 = time.monotonic()
    proxy.container.stop(timeout=15)
    seconds = time.monotonic() - t0
    poller.join(20)
    status, _, body = result["answer"]
    assert status == 200 and json.loads(body)["name"].startswith("sync-")
    proxy.container.reload()
    assert proxy.container.attrs["State"]["ExitCode"] == 0
    assert 1 < seconds < 10, seconds  # waited for the request, not for the stop timeout
    proxy.container.remove(force=True)
