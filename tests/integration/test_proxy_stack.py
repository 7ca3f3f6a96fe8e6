"""The managed reverse proxy on a real stack: a Matrix client that only knows the proxy port.

Stack: main, two sync workers, a client reader, an event persister, PostgreSQL, Redis and the
nginx proxy, all started by the daemon. Each request of a client flow must land on the process
the routing table (`synapsectl routes`) names, checked in that process's own access log; a
user's syncs stick to one sync worker; killing that worker under a syncing client costs at most
one failed request, and syncing goes on.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import pytest

from supervisor import proxy_config
from supervisor.stackfile import load
from tests.integration.stackrun import StackRun, http_json

WORKERS = {"sync": 2, "client_reader": 1, "event_persister": 1}
SYNC = ("sync-1", "sync-2")


@pytest.fixture(scope="module")
def run(docker_client, images, tmp_path_factory):
    name = f"ssp{uuid.uuid4().hex[:6]}"
    stack = StackRun(tmp_path_factory.mktemp("proxy") / "stack", name, dict(WORKERS),
                     docker_client, restart={"initial_delay": 0.5})
    with stack.serving():
        yield stack


@pytest.fixture(scope="module")
def alice(run, tmp_path_factory):
    pw = tmp_path_factory.mktemp("pw") / "pw"
    pw.write_text("a long enough password\n")
    code, _, err = run.ctl("register", "alice", "--password-file", str(pw))
    assert code == 0, err
    code, login = http_json("POST", f"{run.client_url}/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
        "password": "a long enough password"})
    assert code == 200, login
    return login["access_token"]


def access_log(run, instance: str) -> str:
    return run.containers()[instance].logs().decode(errors="replace")


def test_routes_table_names_the_workers(run):
    code, out, err = run.ctl("routes", "--json")
    assert code == 0, err
    rows = json.loads(out)["routes"]
    sync_rows = [r for r in rows if r["worker_type"] == "sync"]
    assert sync_rows and set(sync_rows[0]["instances"]) == set(SYNC)
    assert sync_rows[0]["sticky"] == "user"


def test_client_flow_through_the_proxy_lands_where_the_table_says(run, alice):
    stack = load(run.stack_file)
    instances = [i.name for i in stack.instances]
    code, room = http_json("POST", f"{run.client_url}/_matrix/client/v3/createRoom",
                           {"name": "routing"}, alice)
    assert code == 200, room
    marker = uuid.uuid4().hex
    send_path = f"/_matrix/client/v3/rooms/{room['room_id']}/send/m.room.message/{marker}"
    code, _ = http_json("PUT", f"{run.client_url}{send_path}",
                        {"msgtype": "m.text", "body": marker}, alice)
    assert code == 200
    code, sync = http_json("GET", f"{run.client_url}/_matrix/client/v3/sync?timeout=0",
                           token=alice)
    assert code == 200
    bodies = [e["content"].get("body") for e in
              sync["rooms"]["join"][room["room_id"]]["timeline"]["events"]]
    assert marker in bodies
    expectations = [
        ("POST", "/_matrix/client/v3/login"),
        ("POST", "/_matrix/client/v3/createRoom"),
        ("PUT", send_path),
        ("GET", "/_matrix/client/v3/sync"),
    ]
    for method, path in expectations:
        want = proxy_config.route_for(stack, method, path)
        expected = {"main"} if want == "main" else {i.name for i in stack.of_type(want)}
        got = {i for i in instances
               if any(f"{method} {path}" in line for line in access_log(run, i).splitlines())}
        assert got and got <= expected, (method, path, want, got)


def test_one_users_syncs_stick_to_one_sync_worker(run, alice):
    before = {i: access_log(run, i).count("GET /_matrix/client/v3/sync") for i in SYNC}
    for _ in range(8):
        code, _ = http_json("GET", f"{run.client_url}/_matrix/client/v3/sync?timeout=0",
                            token=alice)
        assert code == 200
    after = {i: access_log(run, i).count("GET /_matrix/client/v3/sync") for i in SYNC}
    grew = {i for i in SYNC if after[i] > before[i]}
    assert len(grew) == 1 and after[grew.pop()] - max(before.values()) >= 0


def test_killing_the_users_sync_worker_costs_at_most_one_request(run, alice):
    counts = {i: access_log(run, i).count("GET /_matrix/client/v3/sync") for i in SYNC}
    code, _ = http_json("GET", f"{run.client_url}/_matrix/client/v3/sync?timeout=0", token=alice)
    assert code == 200
    victim = next(i for i in SYNC
                  if access_log(run, i).count("GET /_matrix/client/v3/sync") > counts[i])
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def client() -> None:
        since = None
        while not stop.is_set():
            url = f"{run.client_url}/_matrix/client/v3/sync?timeout=2000"
            if since:
                url += f"&since={since}"
            try:
                code, body = http_json("GET", url, token=alice, timeout=30)
            except OSError:
                code, body = 599, {}
            results.append((time.monotonic(), code))
            if code == 200:
                since = body.get("next_batch", since)
            else:
                time.sleep(0.2)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(3)
    t_kill = time.monotonic()
    subprocess.run(["docker", "kill", f"{run.name}-{victim}"], check=True, capture_output=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not run.row(victim)["ready"]:
        time.sleep(0.3)
    time.sleep(4)  # keep syncing after it is back
    stop.set()
    t.join(timeout=40)
    failures = [c for ts, c in results if c >= 500]
    after_kill = [c for ts, c in results if ts > t_kill]
    assert run.row(victim)["restarts"] >= 1
    assert len(failures) <= 1, results
    assert after_kill and after_kill[-1] == 200
    assert sum(1 for c in after_kill if c == 200) >= 3
