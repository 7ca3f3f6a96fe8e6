"""The daemon on real parts: dockerd, the built images, Synapse, PostgreSQL and Redis.

One stack (main, a sync worker, an event persister, a federation sender, managed PostgreSQL and
Redis) is brought up by `synapse-supervisor` and checked the way an operator would: Docker's own
event order, a message sent through the stack and read back from the sync worker, a killed
worker restarted alone, the daemon killed and adopting its containers, an ordered stop. A decoy
container and network without our labels sit beside it and must never be touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import yaml

from tests.integration.stackrun import (StackRun, edit_yaml, http_json, metric_sum,
                                        metrics_text)

WORKERS = {"sync": 1, "event_persister": 1, "federation_sender": 1}
INFRA = {"postgres", "redis"}
WORKER_NAMES = {"sync-1", "event-persister-1", "federation-sender-1"}
ALL = INFRA | {"main"} | WORKER_NAMES | {"proxy"}


@pytest.fixture(scope="module")
def decoy(docker_client, images, unique_name):
    """A container and a network that are not ours (no stack label)."""
    net = docker_client.networks.create(unique_name("decoy-net"), labels={"decoy": "1"})
    box = docker_client.containers.run(images["base"], ["sleep", "infinity"], detach=True,
                                       name=unique_name("decoy"), labels={"decoy": "1"},
                                       network=net.name)
    box.reload()
    before = (box.id, box.attrs["State"]["StartedAt"], net.id)
    yield before
    box.reload()
    net.reload()
    after = (box.id, box.attrs["State"]["StartedAt"], net.id)
    running = box.status
    box.remove(force=True)
    net.remove()
    assert after == before and running == "running", "the decoy was touched"


AS_TOKEN = f"as-{uuid.uuid4().hex}"
REGISTRATION = "/etc/synapse-extra/appservices/bridge.yaml"


def add_appservice(stack: StackRun) -> None:
    """An application service registration on the host, shown to Synapse by `mounts`."""
    d = stack.dir / "appservices"
    d.mkdir()
    reg = d / "bridge.yaml"
    reg.write_text(yaml.safe_dump({
        "id": "bridge", "url": None, "as_token": AS_TOKEN, "hs_token": uuid.uuid4().hex,
        "sender_localpart": "bridge", "namespaces": {"users": [], "aliases": [], "rooms": []}}))
    os.chown(reg, 991, 991)
    reg.chmod(0o600)
    edit_yaml(stack.stack_file, lambda d: d.update(mounts=[
        {"source": "appservices", "target": "/etc/synapse-extra/appservices"}]))
    edit_yaml(stack.dir / "homeserver.yaml",
              lambda d: d.update(app_service_config_files=[REGISTRATION]))


@pytest.fixture(scope="module")
def run(docker_client, images, tmp_path_factory, decoy):
    name = f"sst{uuid.uuid4().hex[:6]}"
    stack = StackRun(tmp_path_factory.mktemp("daemon") / "stack", name, dict(WORKERS),
                     docker_client)
    add_appservice(stack)
    with stack.serving():
        yield stack


def test_start_order_in_dockers_event_stream(run):
    starts = run.events.of("start")
    first = {}
    for inst, t in starts:
        first.setdefault(inst, t)
    assert set(first) == ALL
    assert max(first[i] for i in INFRA) < first["main"] < min(first[w] for w in WORKER_NAMES)
    assert max(first[w] for w in WORKER_NAMES) < first["proxy"]
    # main was ready (daemon's own log) before any worker was started
    events = run.log_events()
    main_ready = next(e for e in events if e.get("event") == "ready" and e["instance"] == "main")
    worker_starts = [e for e in events if e.get("event") == "starting"
                     and e["instance"] in WORKER_NAMES]
    assert all(e["timestamp"] > main_ready["timestamp"] for e in worker_starts)
    # workers of one tier were started together, not one after another
    spread = max(first[w] for w in WORKER_NAMES) - min(first[w] for w in WORKER_NAMES)
    assert spread < 2.0


def test_every_container_ready_means_listening_and_replicating(run):
    status = run.status()
    assert status["state"] == "ready" and status["ready"] == status["total"] == 7
    for inst in {"main"} | WORKER_NAMES:
        text = metrics_text(run.ip(inst))
        assert metric_sum(text, "synapse_replication_tcp_resource_total_connections") >= 1, inst


def test_a_mounted_appservice_registration_is_read_by_main_and_the_workers(run):
    # main (whoami is not routed to a worker in this stack) knows the application service...
    code, who = http_json("GET", f"{run.client_url}/_matrix/client/v3/account/whoami",
                          token=AS_TOKEN)
    assert code == 200 and who["user_id"] == f"@bridge:{run.name}.test", (code, who)
    # ...and so does the sync worker, asked on its own address: it read the same file (whoami
    # is served by every worker; /sync itself is not for application services in Synapse)
    code, who = http_json("GET", f"http://{run.ip('sync-1')}:8008/_matrix/client/v3/account/"
                          "whoami", token=AS_TOKEN)
    assert code == 200 and who["user_id"] == f"@bridge:{run.name}.test", (code, who)
    code, _ = http_json("GET", f"{run.client_url}/_matrix/client/v3/account/whoami",
                        token="as-not-registered")
    assert code == 401
    for inst, c in run.containers().items():
        found = [m for m in c.attrs["Mounts"] if m["Destination"] ==
                 "/etc/synapse-extra/appservices"]
        if inst in {"main"} | WORKER_NAMES:
            assert len(found) == 1 and found[0]["RW"] is False, (inst, found)
        else:
            assert found == [], inst


def test_message_sent_through_the_stack_arrives_on_the_sync_worker(run, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\n")
    code, out, err = run.ctl("register", "alice", "--password-file", str(pw))
    assert code == 0, err
    assert f"@alice:{run.name}.test" in out
    code, login = http_json("POST", f"{run.client_url}/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
        "password": "correct horse battery"})
    assert code == 200, login
    token = login["access_token"]
    persister_ip = run.ip("event-persister-1")
    before = metric_sum(metrics_text(persister_ip), "synapse_storage_events_persisted_events_total")
    code, room = http_json("POST", f"{run.client_url}/_matrix/client/v3/createRoom",
                           {"name": "ops"}, token)
    assert code == 200, room
    body = f"hello through the workers {uuid.uuid4().hex}"
    code, sent = http_json(
        "PUT", f"{run.client_url}/_matrix/client/v3/rooms/{room['room_id']}/send/m.room.message/t1",
        {"msgtype": "m.text", "body": body}, token)
    assert code == 200, sent
    # the event persister wrote it (main does not persist events in this stack)
    after = metric_sum(metrics_text(persister_ip), "synapse_storage_events_persisted_events_total")
    assert after > before
    assert metric_sum(metrics_text(run.ip("main")),
                      "synapse_storage_events_persisted_events_total") == 0
    # /sync served by the sync worker itself, on its own address
    sync_url = f"http://{run.ip('sync-1')}:8008/_matrix/client/v3/sync?timeout=0"
    deadline = time.monotonic() + 20
    bodies = []
    while time.monotonic() < deadline:
        code, sync = http_json("GET", sync_url, token=token)
        assert code == 200, sync
        timeline = sync["rooms"]["join"].get(room["room_id"], {}).get("timeline", {})
        bodies = [e["content"].get("body") for e in timeline.get("events", [])]
        if body in bodies:
            break
        time.sleep(0.2)
    assert body in bodies
    deadline = time.monotonic() + 15  # Synapse logs a request once it has answered it
    logs = ""
    while time.monotonic() < deadline and "/_matrix/client/v3/sync" not in logs:
        logs = run.containers()["sync-1"].logs().decode(errors="replace")
        time.sleep(0.2)
    assert "/_matrix/client/v3/sync" in logs


def test_killed_worker_is_restarted_alone_and_counted(run):
    before = {i: c.id for i, c in run.containers().items()}
    started = {i: c.attrs["State"]["StartedAt"] for i, c in run.containers().items()}
    t_kill = time.time()
    subprocess.run(["docker", "kill", f"{run.name}-sync-1"], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    row = None
    while time.monotonic() < deadline:
        row = run.row("sync-1")
        if row["ready"] and row["restarts"] == 1:
            break
        time.sleep(0.2)
    assert row and row["ready"] and row["restarts"] == 1, row
    assert "SIGKILL" in row["last_exit_reason"] and row["last_exit_code"] == 137
    after = run.containers()
    assert {i: c.id for i, c in after.items()} == before  # same containers, none recreated
    for inst, c in after.items():
        if inst != "sync-1":
            assert c.attrs["State"]["StartedAt"] == started[inst], f"{inst} was restarted"
    assert [i for i, t in run.events.of("start", since=t_kill)] == ["sync-1"]
    # the daemon's own metrics say so too
    text = urllib.request.urlopen(f"http://127.0.0.1:{run.metrics_port}/metrics").read().decode()
    assert f'synapse_supervisor_container_restarts_total{{instance="sync-1",role="sync",' \
           f'stack="{run.name}"}} 1.0' in text
    assert 'reason="signal 9 (SIGKILL)"' in text
    assert run.status()["state"] == "ready"


def test_daemon_killed_and_restarted_adopts_without_recreating(run):
    before = {i: (c.id, c.attrs["State"]["StartedAt"]) for i, c in run.containers().items()}
    assert run.stop_daemon(signal.SIGKILL) == -signal.SIGKILL
    run.start_daemon()
    status = run.wait_ready(timeout=120)
    assert status["ready"] == 7
    after = {i: (c.id, c.attrs["State"]["StartedAt"]) for i, c in run.containers().items()}
    assert after == before
    adopted = [e for e in run.log_events() if e.get("event") == "converge"][-7:]
    assert {e["action"] for e in adopted} == {"adopt"}


def test_bad_stack_file_exits_2_and_touches_nothing(run, docker_client, tmp_path):
    """A broken copy of the running stack's file: one line, exit 2, none of the stack's
    containers, networks or volumes changed (the comparison is limited to this stack's
    label because other test runs may share the engine)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(run.stack_file.read_text().replace("workers:", "workerz:")
                   .replace("homeserver: homeserver.yaml",
                            f"homeserver: {run.dir / 'homeserver.yaml'}"))
    label = {"label": f"synapse-supervisor.stack={run.name}"}

    def ours():
        return (sorted((c.id, c.status, c.attrs["State"]["StartedAt"])
                       for c in docker_client.containers.list(all=True, filters=label)),
                sorted(n.id for n in docker_client.networks.list(filters=label)),
                sorted(v.name for v in docker_client.volumes.list(filters=label)))

    before = ours()
    proc = subprocess.run([sys.executable, "-m", "supervisor.daemon", "--stack", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "workerz" in lines[0] and "did you mean 'workers'" in lines[0]
    assert ours() == before


def test_control_verbs_refuse_bad_requests(run):
    code, _, err = run.ctl("restart", "nope-1")
    assert code == 2 and "unknown instance 'nope-1'" in err and len(err.strip().splitlines()) == 1
    code, out, err = run.ctl("status", "--socket", "/nonexistent/control.sock")
    assert code == 3 and "daemon not running" in err


def test_logs_follow_shows_a_line_written_after_the_call(run, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "logs",
                             "main", "-f", "--tail", "0", "--stack", str(run.stack_file)],
                            stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        marker = f"marker{uuid.uuid4().hex[:8]}"
        # a request main logs at INFO, with the marker in its path
        http_json("GET", f"{run.client_url}/_matrix/client/v3/profile/%40{marker}%3Ax")
        deadline = time.monotonic() + 20
        seen = ""
        while time.monotonic() < deadline and marker not in seen:
            seen += proc.stdout.readline()
        assert marker in seen
        assert seen.strip().splitlines()[-1].startswith("main |")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_reload_with_a_broken_file_changes_nothing(run):
    good = run.stack_file.read_text()
    before = {i: c.id for i, c in run.containers().items()}
    try:
        run.stack_file.write_text(good.replace("sync: 1", "sync: many"))
        code, out, err = run.ctl("reload")
        assert code == 2, (out, err)
        assert "workers.sync" in err and len(err.strip().splitlines()) == 1
    finally:
        run.stack_file.write_text(good)
    assert {i: c.id for i, c in run.containers().items()} == before
    assert run.status()["state"] == "ready"


def test_reload_adding_a_worker_touches_nothing_else(run):
    before = {i: (c.id, c.attrs["State"]["StartedAt"]) for i, c in run.containers().items()}
    good = run.stack_file.read_text()
    run.stack_file.write_text(good.replace("sync: 1", "sync: 2"))
    code, out, err = run.ctl("reload", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [(c["action"], c["instance"]) for c in result["changes"]] == [("add", "sync-2")]
    after = {i: (c.id, c.attrs["State"]["StartedAt"]) for i, c in run.containers().items()}
    assert {i: v for i, v in after.items() if i != "sync-2"} == before
    assert run.row("sync-2")["ready"]
    deadline = time.monotonic() + 20  # the proxy now routes sync traffic to both
    conf = run.dir / ".state" / "proxy" / "nginx.conf"
    while time.monotonic() < deadline and "sync-2:8008" not in conf.read_text():
        time.sleep(0.2)
    assert "sync-2:8008" in conf.read_text()
    run.stack_file.write_text(good)
    code, out, err = run.ctl("reload", "--json")
    assert code == 0, err
    assert [(c["action"], c["instance"]) for c in json.loads(out)["changes"]] == [
        ("remove", "sync-2")]
    assert "sync-2" not in run.containers()


def test_reload_after_a_mounted_registration_changed_recreates_the_synapse_processes(run):
    reg = run.dir / "appservices" / "bridge.yaml"
    data = yaml.safe_load(reg.read_text())
    new_token = f"as-{uuid.uuid4().hex}"
    data["as_token"] = new_token
    reg.write_text(yaml.safe_dump(data))  # same owner and mode: written in place
    before = {i: c.id for i, c in run.containers().items()}
    code, out, err = run.ctl("reload", "--json")
    assert code == 0, err
    changes = {(c["action"], c["instance"]) for c in json.loads(out)["changes"]}
    assert changes == {("recreate", i) for i in {"main"} | WORKER_NAMES}
    after = {i: c.id for i, c in run.containers().items()}
    for inst in before:  # PostgreSQL, Redis and the proxy kept; every Synapse process new
        assert (after[inst] != before[inst]) == (inst in {"main"} | WORKER_NAMES), inst
    assert run.status()["state"] == "ready"
    for base in (run.client_url, f"http://{run.ip('sync-1')}:8008"):
        code, who = http_json("GET", f"{base}/_matrix/client/v3/account/whoami",
                              token=new_token)
        assert code == 200 and who["user_id"] == f"@bridge:{run.name}.test", (base, code, who)
        code, _ = http_json("GET", f"{base}/_matrix/client/v3/account/whoami", token=AS_TOKEN)
        assert code == 401, base  # the old token is gone everywhere


def test_sigterm_stops_in_reverse_order_and_keeps_volumes(run, docker_client):
    t0 = time.time()
    assert run.stop_daemon(signal.SIGTERM) == 0
    dies = {}
    for inst, t in run.events.of("die", since=t0):
        dies.setdefault(inst, t)
    assert set(dies) == ALL
    assert dies["proxy"] < min(dies[w] for w in WORKER_NAMES)
    assert max(dies[w] for w in WORKER_NAMES) < dies["main"] < min(dies[i] for i in INFRA)
    for inst, c in run.containers().items():
        assert c.status == "exited" and c.attrs["State"]["ExitCode"] == 0, inst
    volumes = {v.name for v in docker_client.volumes.list(
        filters={"label": f"synapse-supervisor.stack={run.name}"})}
    assert volumes == {f"{run.name}-pgdata", f"{run.name}-media"}


def test_destroy_needs_confirmation_then_deletes_only_this_stack(run, docker_client, decoy):
    label = {"label": f"synapse-supervisor.stack={run.name}"}
    code, _, err = run.ctl("destroy")
    assert code == 2 and "--confirm" in err and len(err.strip().splitlines()) == 1
    code, _, err = run.ctl("destroy", "--confirm", "some-other-stack")
    assert code == 2
    assert len(docker_client.volumes.list(filters=label)) == 2  # nothing deleted
    code, out, err = run.ctl("destroy", "--confirm", run.name)
    assert code == 0, err
    assert docker_client.containers.list(all=True, filters=label) == []
    assert docker_client.networks.list(filters=label) == []
    assert docker_client.volumes.list(filters=label) == []
    assert (run.dir / "stack.yaml").exists() and (run.dir / "secrets").is_dir()
