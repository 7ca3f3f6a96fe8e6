"""Bad input, refused cleanly: one table, four doors.

Every case is refused with one line on stderr (or, for the raw control API, one JSON error
envelope) that names the file or field, with a non-zero exit code, and Docker's containers,
networks and volumes stay exactly as they were (`docker_objects` before and after).

* the daemon binary itself (`python -m supervisor.daemon --stack bad.yaml`) on broken stack
  files, homeserver.yaml, keys and secrets, and on host conflicts (a published port already
  taken, a second daemon for a running stack);
* `synapsectl` with bad verbs, flags and instances against a running daemon;
* raw HTTP on the control socket: requests synapsectl would never send.

Unit tests (tests/unit/test_bad_input.py) cover the stack-file cases through `synapsectl
validate`; here the same kind of input goes through the real daemon, next to a running stack
that must not notice anything.

A product bug found by this table is marked xfail(strict=True) with the place in the code
until it is fixed (none is open now: see docs/reliability.md for the ones fixed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.stackrun import (REPO, VENV_BIN, StackRun, docker_changes, edit_yaml,
                                        docker_objects, free_port, http_request, raw_control)

DAEMON = [sys.executable, "-m", "supervisor.daemon"]
SYNAPSECTL = [str(VENV_BIN / "synapsectl")]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def running(docker_client, images, tmp_path_factory):
    """A small running stack that every case runs next to (and for CLI/API cases, against)."""
    name = f"sstbr{uuid.uuid4().hex[:6]}"
    run = StackRun(tmp_path_factory.mktemp("badinput") / "stack", name, {"sync": 1},
                   docker_client)
    with run.serving():
        yield run


@pytest.fixture(scope="module")
def template(tmp_path_factory, images) -> Path:
    """A valid, never-started stack directory; each daemon case works on a copy."""
    directory = tmp_path_factory.mktemp("bad-template") / "stack"
    name = f"sstbt{uuid.uuid4().hex[:6]}"
    subprocess.run(SYNAPSECTL + ["init", str(directory), "--server-name", "bad.test", "--name",
                                 name, "--isolated", "--client-port", str(free_port()),
                                 "--federation-port", str(free_port()), "--metrics-port",
                                 str(free_port())], check=True, capture_output=True)
    edit_yaml(directory / "stack.yaml", lambda d: d["daemon"].update(
        control_socket=str(directory / "control.sock")))
    edit_yaml(directory / "stack.yaml", lambda d: d.update(workers={"sync": 1}))
    return directory


@pytest.fixture
def case_dir(template, tmp_path, docker_client) -> Path:
    target = tmp_path / "stack"
    shutil.copytree(template, target)
    edit_yaml(target / "stack.yaml", lambda d: d["daemon"].update(
        control_socket=str(target / "control.sock")))
    name = yaml.safe_load((target / "stack.yaml").read_text())["name"]
    yield target
    # Whatever a buggy daemon might have made for this stack goes, even on failure.
    flt = {"label": f"synapse-supervisor.stack={name}"}
    for c in docker_client.containers.list(all=True, filters=flt):
        c.remove(force=True)
    for n in docker_client.networks.list(filters=flt):
        n.remove()
    for v in docker_client.volumes.list(filters=flt):
        v.remove(force=True)


# ------------------------------------------------------------------- mutations (daemon)


def stack_set(*keys, value):
    def change(d: Path) -> None:
        def apply(data):
            node = data
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = value
        edit_yaml(d / "stack.yaml", apply)
    return change


def stack_drop(*keys):
    def change(d: Path) -> None:
        def apply(data):
            node = data
            for key in keys[:-1]:
                node = node[key]
            del node[keys[-1]]
        edit_yaml(d / "stack.yaml", apply)
    return change


def hs_set(key, value):
    return lambda d: edit_yaml(d / "homeserver.yaml", lambda data: data.__setitem__(key, value))


def hs_drop(key):
    return lambda d: edit_yaml(d / "homeserver.yaml", lambda data: data.pop(key))


def write(name, text):
    return lambda d: (d / name).write_text(text)


def remove(name):
    return lambda d: (d / name).unlink()


def a_regular_file_as_socket_dir(d: Path) -> None:
    (d / "not-a-dir").write_text("x\n")
    stack_set("daemon", "control_socket", value=str(d / "not-a-dir" / "control.sock"))(d)


# (mutation, substrings the one stderr line must contain, exit code)
DAEMON_CASES = [
    pytest.param(write("stack.yaml", "name: x\n  server_name: [oops\n"),
                 ["stack.yaml: line", "malformed YAML", "fix:"], 2, id="stack-malformed-yaml"),
    pytest.param(write("stack.yaml", "- a\n- b\n"), ["stack.yaml", "mapping"], 2,
                 id="stack-not-a-mapping"),
    pytest.param(lambda d: (d / "stack.yaml").unlink(), ["stack.yaml", "not found", "fix:"], 2,
                 id="stack-file-missing"),
    pytest.param(stack_set("workerz", value={"sync": 1}),
                 ["stack.yaml: workerz", "did you mean 'workers'"], 2, id="stack-unknown-key"),
    pytest.param(stack_set("workers", "synk", value=1),
                 ["workers.synk", "did you mean 'sync'"], 2, id="stack-unknown-worker-type"),
    pytest.param(stack_set("workers", "sync", value="two"), ["workers.sync", "integer"], 2,
                 id="stack-worker-count-wrong-type"),
    pytest.param(stack_set("workers", "typing", value=2), ["workers.typing", "only once",
                                                           "fix:"], 2,
                 id="stack-singleton-twice"),
    pytest.param(stack_set("workers", "sync", value={"count": 1, "env": {"X": 1}}),
                 ["workers.sync.env.X", "string"], 2, id="stack-env-not-a-string"),
    pytest.param(stack_set("workers", "sync", value={"count": 1,
                                                     "resources": {"memory": "lots"}}),
                 ["workers.sync.resources.memory", "does not match"], 2,
                 id="stack-memory-malformed"),
    pytest.param(stack_set("restart", "max_attempts", value=0),
                 ["restart.max_attempts", "minimum", "fix:"], 2, id="stack-max-attempts-0"),
    pytest.param(stack_set("restart", "jitter", value=2), ["restart.jitter", "maximum"], 2,
                 id="stack-jitter-above-1"),
    pytest.param(stack_set("publish", "client", value="everywhere"),
                 ["publish.client", "does not match"], 2, id="stack-publish-malformed"),
    pytest.param(stack_set("publish", "synapse_metrics", value={"nope-1": "127.0.0.1:9101"}),
                 ["publish.synapse_metrics.nope-1", "names no instance"], 2,
                 id="stack-metrics-for-unknown-instance"),
    pytest.param(stack_set("postgres", "max_connections", value=20),
                 ["postgres.max_connections", "raise it"], 2, id="stack-max-connections-low"),
    pytest.param(stack_set("postgres", "mode", value="external"), ["postgres.host", "required"],
                 2, id="stack-external-postgres-without-host"),
    pytest.param(stack_set("name", value="My Stack"), ["stack.yaml: name", "does not match"], 2,
                 id="stack-name-not-dns-safe"),
    pytest.param(stack_drop("server_name"), ["stack.yaml: server_name", "required"], 2,
                 id="stack-server-name-missing"),
    pytest.param(stack_set("daemon", "control_group", value="no-such-group-ss"),
                 ["daemon.control_group", "no-such-group-ss", "fix:"], 2,
                 id="daemon-unknown-group"),
    pytest.param(a_regular_file_as_socket_dir, ["daemon.control_socket", "fix:"], 2,
                 id="daemon-socket-dir-is-a-file"),
    pytest.param(stack_set("publish", "client", value="10.255.255.1:8008"),
                 ["stack.yaml: publish.client", "cannot bind"], 2,
                 id="publish-address-not-on-this-host"),
    pytest.param(stack_set("images", "synapse", value="sstest/no-such-image:0"),
                 ["images.synapse", "sstest/no-such-image:0", "fix:"], 2, id="image-missing"),
    # homeserver.yaml, keys and secrets: read by the daemon before it touches anything
    pytest.param(hs_set("server_name", "other.test"), ["homeserver.yaml: server_name",
                                                       "differs", "fix:"], 2,
                 id="hs-server-name-mismatch"),
    pytest.param(hs_drop("report_stats"), ["homeserver.yaml: report_stats", "missing"], 2,
                 id="hs-report-stats-missing"),
    pytest.param(write("homeserver.yaml", "server_name: [x\n"),
                 ["homeserver.yaml: line", "malformed YAML"], 2, id="hs-malformed-yaml"),
    pytest.param(remove("homeserver.yaml"), ["homeserver.yaml", "not found"], 2,
                 id="hs-missing"),
    pytest.param(hs_set("send_federation", False), ["homeserver.yaml: send_federation",
                                                    "nobody would do it"], 2,
                 id="hs-legacy-send-federation"),
    pytest.param(write("bad.test.signing.key", "hello\n"), ["signing.key: line 1",
                                                            "signing key"], 2,
                 id="signing-key-garbage"),
    pytest.param(write("secrets/replication_secret", "\n"), ["replication_secret", "empty"], 2,
                 id="secret-empty"),
    pytest.param(remove("secrets/postgres_password"), ["postgres_password", "not found"], 2,
                 id="secret-missing"),
]


def run_daemon(stack_file: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(DAEMON + ["--stack", str(stack_file)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the daemon did not refuse within {timeout}s; it ran:\n{out[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, "expected one line on stderr, got:\n" + err
    return lines[0]


def stack_name(directory: Path, fallback: str) -> str:
    try:
        return yaml.safe_load((directory / "stack.yaml").read_text())["name"]
    except Exception:
        return fallback


@pytest.mark.parametrize("mutate, expected, code", DAEMON_CASES)
def test_daemon_refuses_bad_input(mutate, expected, code, case_dir, template, running,
                                  docker_client):
    name = stack_name(template, "")
    mutate(case_dir)
    before = docker_objects(docker_client)
    running_before = {i: (c.id, c.attrs["State"]["StartedAt"])
                      for i, c in running.containers().items()}
    proc = run_daemon(case_dir / "stack.yaml")
    line = one_line(proc.stderr)
    assert proc.returncode == code, (proc.returncode, line)
    for needle in expected:
        assert needle in line, (needle, line)
    assert line.startswith("synapse-supervisor: ")
    written = sorted(str(p.relative_to(case_dir)) for p in (case_dir / ".state").rglob("*"))
    assert not (case_dir / ".state").exists(), f"the refused start wrote {written}"
    after = docker_objects(docker_client)
    assert docker_changes(before, after, (name, running.name)) == []
    assert {i: (c.id, c.attrs["State"]["StartedAt"])
            for i, c in running.containers().items()} == running_before


# ---------------------------------------------------------------------- host conflicts


@pytest.mark.parametrize("key", ["publish.client", "daemon.metrics_address"])
def test_port_already_taken(key, case_dir, template, running, docker_client):
    data = yaml.safe_load((case_dir / "stack.yaml").read_text())
    address = data["publish"]["client"] if key == "publish.client" else \
        data["daemon"]["metrics_address"]
    host, _, port = address.rpartition(":")
    before = docker_objects(docker_client)
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen()
        proc = run_daemon(case_dir / "stack.yaml")
    line = one_line(proc.stderr)
    assert proc.returncode == 2, line
    assert f"stack.yaml: {key}: {address} is already in use" in line and "fix:" in line, line
    assert not (case_dir / ".state").exists()
    assert docker_changes(before, docker_objects(docker_client), (data["name"],)) == []


def test_database_volume_made_with_another_password(case_dir, running, docker_client, images):
    """The stack directory re-initialised under the same name (or its secret regenerated)
    next to an existing database volume: PostgreSQL keeps the password the volume was made
    with. The daemon logs in for real, names the password file and the fix, starts nothing
    else, stops PostgreSQL again and keeps the volume."""
    name = yaml.safe_load((case_dir / "stack.yaml").read_text())["name"]
    volume = f"{name}-pgdata"
    docker_client.volumes.create(volume, labels={"synapse-supervisor.stack": name})
    pg = docker_client.containers.run(  # initialise it the way the image does, other password
        "synapse-supervisor/postgres:15", detach=True, network_mode="none",
        environment={"POSTGRES_USER": "synapse", "POSTGRES_PASSWORD": "the old password"},
        volumes={volume: {"bind": "/var/lib/postgresql/data", "mode": "rw"}},
        labels={"synapse-supervisor.test": "pg-init"})
    try:
        deadline = time.monotonic() + 60
        # the entrypoint says so once initdb, the role and the database are done
        while b"postgres-entrypoint: initialised" not in pg.logs() and \
                time.monotonic() < deadline:
            time.sleep(0.3)
        assert b"postgres-entrypoint: initialised" in pg.logs(), pg.logs()[-2000:]
    finally:
        pg.remove(force=True)
    proc = run_daemon(case_dir / "stack.yaml", timeout=180)
    line = one_line(proc.stderr)
    assert proc.returncode == 4, line
    for needle in ("postgres did not become ready", "PostgreSQL rejects the password in",
                   "secrets/postgres_password", f"volume {volume}", "fix:"):
        assert needle in line, (needle, line)
    found = {c.labels["synapse-supervisor.instance"]: c for c in docker_client.containers.list(
        all=True, filters={"label": f"synapse-supervisor.stack={name}"})}
    assert found["postgres"].status == "exited"  # started for the check, stopped again
    assert found["main"].attrs["State"]["StartedAt"].startswith("0001-")  # never started
    assert docker_client.volumes.get(volume).name == volume  # kept


def test_second_daemon_for_a_running_stack_is_refused(running, docker_client):
    before = docker_objects(docker_client)
    state_files = sorted(p.relative_to(running.dir) for p in (running.dir / ".state").rglob("*"))
    proc = run_daemon(running.stack_file)
    line = one_line(proc.stderr)
    assert proc.returncode != 0
    assert f"already runs stack {running.name}" in line and "fix:" in line, line
    assert docker_changes(before, docker_objects(docker_client), (running.name,)) == []
    assert sorted(p.relative_to(running.dir)
                  for p in (running.dir / ".state").rglob("*")) == state_files
    assert running.proc.poll() is None
    assert running.status()["state"] == "ready"


# ----------------------------------------------------------------------------- synapsectl


def ctl_cases():
    # (args, stdin, exit code, substrings of the one stderr line); "{stack}" is the running
    # stack file; every call gets no other --stack.
    s = ["--stack", "{stack}"]
    return [
        pytest.param(["frobnicate"] + s, None, 2, ["frobnicate"], id="ctl-unknown-verb"),
        pytest.param(["status", "--bogus"] + s, None, 2, ["--bogus"], id="ctl-unknown-flag"),
        pytest.param(["register"] + s, None, 2, ["user"], id="ctl-missing-argument"),
        pytest.param(["restart", "nope-1"] + s, None, 2, ["unknown instance 'nope-1'", "fix:"],
                     id="ctl-restart-unknown-instance"),
        pytest.param(["restart", "sync-1", "sync-9"] + s, None, 2,
                     ["unknown instance 'sync-9'", "fix:"], id="ctl-restart-one-unknown"),
        pytest.param(["logs", "nope-1"] + s, None, 2, ["unknown instance 'nope-1'"],
                     id="ctl-logs-unknown-instance"),
        pytest.param(["logs", "main", "--since", "yesterday"] + s, None, 2,
                     ["--since", "yesterday", "fix:"], id="ctl-logs-bad-since"),
        pytest.param(["logs", "main", "--tail", "many"] + s, None, 2, ["--tail", "many"],
                     id="ctl-logs-bad-tail"),
        pytest.param(["register", "bob", "--password-file", "/nonexistent/pw"] + s, None, 2,
                     ["/nonexistent/pw", "fix:"], id="ctl-register-unreadable-password-file"),
        pytest.param(["register", "bob"] + s, "\n", 2, ["password"],
                     id="ctl-register-empty-password"),
        pytest.param(["register", "bad user!"] + s, "pw-123456\n", 1, ["User ID"],
                     id="ctl-register-invalid-user-id"),
        pytest.param(["status", "--socket", "/nonexistent/control.sock"] + s, None, 3,
                     ["no control socket at /nonexistent/control.sock", "fix:"],
                     id="ctl-socket-missing"),
        pytest.param(["status", "--stack", "/nonexistent/stack.yaml"], None, 2,
                     ["/nonexistent/stack.yaml", "not found", "fix:"], id="ctl-stack-missing"),
        pytest.param(["plan", "--show-config", "nope-1"] + s, None, 2,
                     ["unknown instance 'nope-1'", "fix:"], id="ctl-plan-unknown-instance"),
    ]


@pytest.mark.parametrize("args, stdin, code, expected", ctl_cases())
def test_synapsectl_refuses_bad_input(args, stdin, code, expected, running, docker_client):
    args = [a.replace("{stack}", str(running.stack_file)) for a in args]
    before = docker_objects(docker_client)
    proc = subprocess.run(SYNAPSECTL + args, input=stdin or "", capture_output=True, text=True,
                          timeout=300)
    line = one_line(proc.stderr)
    assert proc.returncode == code, (proc.returncode, line)
    assert line.startswith("synapsectl"), line
    for needle in expected:
        assert needle in line, (needle, line)
    assert docker_changes(before, docker_objects(docker_client), (running.name,)) == []
    assert running.status()["state"] == "ready"


def test_daemon_bad_flag_is_one_line(tmp_path):
    proc = subprocess.run(DAEMON + ["--log-format", "loud", "--stack", str(tmp_path / "s.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "--log-format" in one_line(proc.stderr)


def test_reload_with_a_broken_file_is_refused_and_changes_nothing(running, docker_client):
    good = running.stack_file.read_text()
    before = docker_objects(docker_client)
    try:
        running.stack_file.write_text(good.replace("sync: 1", "sync: {count: 1, names: [A]}"))
        proc = subprocess.run(SYNAPSECTL + ["reload", "--stack", str(running.stack_file)],
                              capture_output=True, text=True, timeout=300)
    finally:
        running.stack_file.write_text(good)
    line = one_line(proc.stderr)
    assert proc.returncode == 2, line
    assert "workers.sync.names[0]" in line and "stack.yaml" in line, line
    assert docker_changes(before, docker_objects(docker_client), (running.name,)) == []
    assert running.status()["state"] == "ready"


# ------------------------------------------------------------------- raw control API


def api_cases():
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    return [
        pytest.param("GET", "/v1/nope", None, {}, 404, "not_found", ["/v1/nope"],
                     id="api-unknown-endpoint"),
        pytest.param("GET", "/v1/restart", None, {}, 404, "not_found", ["GET /v1/restart"],
                     id="api-wrong-method-on-endpoint"),
        pytest.param("POST", "/v1/status", b"{}", {}, 404, "not_found", ["POST /v1/status"],
                     id="api-post-to-get-endpoint"),
        pytest.param("PUT", "/v1/status", b"{}", {}, 405, "bad_method", ["PUT", "fix:"],
                     id="api-unsupported-http-method"),
        pytest.param("DELETE", "/v1/status", None, {}, 405, "bad_method", ["DELETE"],
                     id="api-delete"),
        pytest.param("POST", "/v1/restart", b"not json", {}, 400, "bad_request", ["JSON"],
                     id="api-body-not-json"),
        pytest.param("POST", "/v1/restart", j([1, 2]), {}, 400, "bad_request", ["object"],
                     id="api-body-not-an-object"),
        pytest.param("POST", "/v1/restart", j({"instances": "sync-1"}), {}, 400, "bad_request",
                     ["instances"], id="api-restart-instances-not-a-list"),
        pytest.param("POST", "/v1/restart", j({"instances": [1]}), {}, 400, "bad_request",
                     ["instances"], id="api-restart-instances-not-names"),
        pytest.param("POST", "/v1/restart", j({"instances": ["nope-1"]}), {}, 400,
                     "unknown_instance", ["nope-1", "fix:"], id="api-restart-unknown-instance"),
        pytest.param("POST", "/v1/register", j({"user": "bob"}), {}, 400, "bad_request",
                     ["password"], id="api-register-without-password"),
        pytest.param("POST", "/v1/register", j({"user": "bob", "password": 5}), {}, 400,
                     "bad_request", ["password"], id="api-register-password-not-a-string"),
        pytest.param("POST", "/v1/register", j({}), {}, 400, "bad_request", ["user"],
                     id="api-register-empty-body"),
        pytest.param("GET", "/v1/logs?instance=nope-1", None, {}, 400, "unknown_instance",
                     ["nope-1"], id="api-logs-unknown-instance"),
        pytest.param("GET", "/v1/logs?instance=main&since=yesterday", None, {}, 400,
                     "bad_request", ["since"], id="api-logs-bad-since"),
        pytest.param("POST", "/v1/restart", None, {"Content-Length": "lots"}, 400,
                     "bad_request", ["Content-Length"], id="api-bad-content-length"),
    ]


@pytest.mark.parametrize("method, path, body, headers, status, code, expected", api_cases())
def test_control_api_refuses_bad_requests(method, path, body, headers, status, code, expected,
                                          running, docker_client):
    before = docker_objects(docker_client)
    got, envelope, raw = raw_control(running.dir / "control.sock",
                                     http_request(method, path, body, headers))
    assert envelope.get("ok") is False, f"not a JSON error envelope: {got} {raw[:300]!r}"
    err = envelope["error"]
    assert got == status and err["code"] == code, (got, err)
    assert len(err["message"].splitlines()) == 1
    for needle in expected:
        assert needle in err["message"], (needle, err["message"])
    assert err["exit_code"] in (1, 2)
    assert docker_changes(before, docker_objects(docker_client), (running.name,)) == []
    assert running.status()["state"] == "ready"


def test_control_api_malformed_request_line_gets_an_envelope(running):
    """Not HTTP/1.x, so the answer is HTTP/0.9-style (no status line), but still the
    envelope."""
    got, envelope, raw = raw_control(running.dir / "control.sock", b"HELLO\r\n\r\n")
    assert envelope.get("ok") is False, raw[:300]
    assert envelope["error"]["code"] == "bad_request"
    assert len(envelope["error"]["message"].splitlines()) == 1
    assert running.status()["state"] == "ready"


def test_control_api_reload_with_a_broken_file(running, docker_client):
    good = running.stack_file.read_text()
    before = docker_objects(docker_client)
    try:
        running.stack_file.write_text(good.replace("sync: 1", "sync: many"))
        got, envelope, raw = raw_control(running.dir / "control.sock",
                                         http_request("POST", "/v1/reload", b"{}"))
    finally:
        running.stack_file.write_text(good)
    assert got == 400 and envelope.get("ok") is False, raw[:300]
    err = envelope["error"]
    assert err["code"] == "invalid_stack" and err["exit_code"] == 2
    assert "stack.yaml: workers.sync" in err["message"] and "fix:" in err["message"]
    assert docker_changes(before, docker_objects(docker_client), (running.name,)) == []
    assert running.status()["state"] == "ready"
