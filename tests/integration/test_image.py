"""Integration tests of the images built by image/build (issue "The Synapse image").

Run: .venv/bin/python -m pytest tests/integration/test_image.py
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from .conftest import (
    SYNAPSE_UID,
    chown_tree,
    dir_snapshot,
    http_status,
    published_port,
    wait_healthy,
    wait_http,
    wait_log,
)

pytestmark = pytest.mark.integration

SERVER_NAME = "image-test.local"
PG_PASSWORD = "pg-secret-for-tests"
LOCAL = ("127.0.0.1", None)  # publish on loopback, random host port


def homeserver_yaml(db_host: str, redis_host: str, extra: str = "") -> str:
    return textwrap.dedent(
        f"""\
        server_name: {SERVER_NAME}
        report_stats: false
        signing_key_path: /data/signing.key
        trusted_key_servers: []
        suppress_key_server_warning: true
        macaroon_secret_key: macaroon-secret-for-tests
        form_secret: form-secret-for-tests
        database:
          name: psycopg2
          args:
            user: synapse
            password: {PG_PASSWORD}
            database: synapse
            host: {db_host}
            cp_min: 1
            cp_max: 5
        redis:
          enabled: true
          host: {redis_host}
        """
    ) + extra


def run_to_exit(client, image, labels, timeout=60, **kwargs):
    """Run a container to completion; returns (exit code, stdout, stderr)."""
    container = client.containers.run(image, detach=True, labels=labels, **kwargs)
    try:
        code = container.wait(timeout=timeout)["StatusCode"]
        out = container.logs(stdout=True, stderr=False).decode(errors="replace")
        err = container.logs(stdout=False, stderr=True).decode(errors="replace")
        return code, out, err
    finally:
        container.remove(force=True)


def stop_and_exit_code(container, timeout=20) -> int:
    container.stop(timeout=timeout)
    container.reload()
    return container.attrs["State"]["ExitCode"]


# ---------------------------------------------------------------------------- the images


def test_images_exist_with_expected_config(docker_client, images):
    for key in ("base", "synapse", "synapse_latest", "postgres", "redis"):
        docker_client.images.get(images[key])  # raises if missing
    assert docker_client.images.get(images["synapse"]).id == docker_client.images.get(
        images["synapse_latest"]
    ).id

    syn = docker_client.images.get(images["synapse"]).attrs["Config"]
    assert syn["User"] == "synapse"
    assert not syn.get("Volumes"), "no VOLUME instruction (anonymous volumes leak)"
    assert syn["StopSignal"] == "SIGTERM"
    assert "PYTHONUNBUFFERED=1" in syn["Env"]
    assert set(syn["ExposedPorts"]) == {"8008/tcp", "8448/tcp", "9000/tcp", "9093/tcp"}
    hc = syn["Healthcheck"]
    assert hc["Interval"] == 15 * 10**9 and hc["Timeout"] == 5 * 10**9
    assert hc["StartPeriod"] == 5 * 10**9 and hc["Retries"] >= 1

    pg = docker_client.images.get(images["postgres"]).attrs["Config"]
    assert pg["User"] == "postgres" and pg["StopSignal"] == "SIGINT"
    assert not pg.get("Volumes") and "pg_isready" in pg["Healthcheck"]["Test"]

    rd = docker_client.images.get(images["redis"]).attrs["Config"]
    assert rd["User"] == "redis" and rd["StopSignal"] == "SIGTERM"
    assert not rd.get("Volumes") and "ping" in rd["Healthcheck"]["Test"]


def test_synapse_image_contents(docker_client, images):
    out = docker_client.containers.run(
        images["synapse"],
        entrypoint=["/bin/sh", "-c"],
        command=[
            "id -u; id -g; stat -c '%u:%g %n' /data /conf /synapse_media;"
            " /opt/synapse/bin/python -c 'import synapse, psycopg2, txredisapi, yaml;"
            " print(synapse.__version__)'"
        ],
        network_mode="none",
        remove=True,
    ).decode()
    lines = out.split()
    assert lines[0] == "991" and lines[1] == "991"
    for d in ("/data", "/conf", "/synapse_media"):
        assert f"991:991 {d}" in out
    assert lines[-1] == "1.163.2"


def test_fresh_named_volume_on_media_dir_is_writable(docker_client, images, test_labels, unique_name):
    vol = docker_client.volumes.create(unique_name("media-vol"), labels=test_labels)
    out = docker_client.containers.run(
        images["synapse"],
        entrypoint=["/bin/sh", "-c", "touch /synapse_media/x && stat -c %u /synapse_media"],
        volumes={vol.name: {"bind": "/synapse_media", "mode": "rw"}},
        network_mode="none",
        labels=test_labels,
        remove=True,
    ).decode()
    assert out.strip() == "991"


# ------------------------------------------------------------- a stack: pg, redis, main, worker


@pytest.fixture(scope="module")
def stack(docker_client, images, network, test_labels, unique_name, tmp_path_factory):
    """PostgreSQL (password file, named volume), Redis, main in standalone mode."""
    root = tmp_path_factory.mktemp("image-stack")
    names = {k: unique_name(k) for k in ("db", "redis", "main", "sync")}
    secrets = root / "secrets"
    secrets.mkdir()
    (secrets / "pg_password").write_text(PG_PASSWORD + "\n")
    chown_tree(secrets, 999)
    data = root / "data"
    data.mkdir()
    # Legacy keys Synapse rejects today: the entrypoint must drop them (with a warning).
    legacy = "worker_replication_host: legacy-main\nlisteners:\n  - {port: 9092, type: replication}\n"
    (data / "homeserver.yaml").write_text(homeserver_yaml(names["db"], names["redis"], legacy))
    chown_tree(data)

    pg_vol = docker_client.volumes.create(unique_name("pgdata"), labels=test_labels)
    db = docker_client.containers.run(
        images["postgres"],
        name=names["db"],
        hostname=names["db"],
        detach=True,
        network=network.name,
        labels=test_labels,
        environment={
            "POSTGRES_USER": "synapse",
            "POSTGRES_DB": "synapse",
            "POSTGRES_PASSWORD_FILE": "/run/secrets/pg_password",
        },
        volumes={
            pg_vol.name: {"bind": "/var/lib/postgresql/data", "mode": "rw"},
            str(secrets): {"bind": "/run/secrets", "mode": "ro"},
        },
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
    )
    redis = docker_client.containers.run(
        images["redis"],
        name=names["redis"],
        hostname=names["redis"],
        detach=True,
        network=network.name,
        labels=test_labels,
        cap_drop=["ALL"],
    )
    # Signing key, made with the image itself (entrypoint command `generate-keys`).
    code, out, err = run_to_exit(
        docker_client, images["synapse"], test_labels, command=["generate-keys"],
        volumes={str(data): {"bind": "/data", "mode": "rw"}}, network_mode="none",
    )
    assert code == 0, err
    assert (data / "signing.key").read_text().startswith("ed25519 ")
    wait_log(db, "database system is ready to accept connections", timeout=60)

    start = time.monotonic()
    main = docker_client.containers.run(
        images["synapse"],
        name=names["main"],
        hostname=names["main"],
        detach=True,
        network=network.name,
        labels=test_labels,
        ports={"8008/tcp": LOCAL},
        volumes={str(data): {"bind": "/data", "mode": "ro"}},  # nothing is written to /data
        environment={"SYNAPSE_HOSTNAME": "main-host-tag"},
        read_only=True,
        tmpfs={"/tmp": "rw,nosuid,size=64m"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
    )
    wait_http(f"http://127.0.0.1:{published_port(main)}/health", main, timeout=90)
    main_seconds = time.monotonic() - start
    return {
        "names": names,
        "data": data,
        "db": db,
        "redis": redis,
        "main": main,
        "main_seconds": main_seconds,
        "network": network,
    }


def test_main_health_on_published_port(stack):
    main = stack["main"]
    port = published_port(main)
    wait_http(f"http://127.0.0.1:{port}/health", main, timeout=5)
    wait_http(f"http://127.0.0.1:{port}/_matrix/client/versions", main, timeout=5)
    bindings = main.attrs["NetworkSettings"]["Ports"]["8008/tcp"]
    assert all(b["HostIp"] == "127.0.0.1" for b in bindings)


def test_main_logs_to_stdout_with_hostname(stack):
    main = stack["main"]
    stdout = main.logs(stdout=True, stderr=False).decode()
    stderr = main.logs(stdout=False, stderr=True).decode()
    assert "- main-host-tag - synapse.app.homeserver -" in stdout
    assert "worker_replication_host" in stderr and "replication" in stderr  # dropped, warned


def test_main_runs_as_uid_991_as_pid1(docker_client, stack):
    main = stack["main"]
    top = main.top(ps_args="-o uid,pid,args")
    rows = [dict(zip(top["Titles"], p)) for p in top["Processes"]]
    assert len(rows) == 1, rows  # Synapse exec'd: no wrapper process left
    assert rows[0]["UID"] == str(SYNAPSE_UID)
    status = main.exec_run(["cat", "/proc/1/status"]).output.decode()
    assert f"Uid:\t{SYNAPSE_UID}" in status
    cmdline = main.exec_run(["cat", "/proc/1/cmdline"]).output.decode().split("\0")
    assert cmdline[1:3] == ["-m", "synapse.app.homeserver"]
    # legacy keys present -> a sanitised copy in the temp dir, then the forced file
    assert cmdline[3:7] == ["-c", "/tmp/synapse-conf/homeserver.yaml", "-c", "/tmp/synapse-conf/forced.yaml"]


def test_legacy_worker_connects_and_is_healthy(docker_client, stack, test_labels, images):
    names = stack["names"]
    worker = docker_client.containers.run(
        images["synapse"],
        name=names["sync"],
        hostname=names["sync"],
        detach=True,
        network=stack["network"].name,
        labels=test_labels,
        ports={"8008/tcp": LOCAL},
        volumes={str(stack["data"]): {"bind": "/data", "mode": "ro"}},
        environment={
            "SYNAPSE_WORKER": "synapse.app.synchrotron",
            "SYNAPSE_WORKER_NAME": "sync-1",
            "SYNAPSE_REPLICATION_HOST": names["main"],
            "SYNAPSE_HOSTNAME": "sync-host-tag",
            "SYNAPSE_CPU_AFFINITY": "0",
        },
        read_only=True,
        tmpfs={"/tmp": "rw,nosuid,size=64m"},
        cap_drop=["ALL"],
    )
    stack["sync"] = worker
    port = published_port(worker)
    wait_http(f"http://127.0.0.1:{port}/health", worker, timeout=90)
    wait_log(worker, "REPLICATE successfully sent", timeout=30)
    # the synchrotron serves the client API (its role's resource)
    wait_http(f"http://127.0.0.1:{port}/_matrix/client/versions", worker, timeout=5)
    logs = worker.logs(stdout=True, stderr=False).decode()
    assert "- sync-host-tag - synapse.app.generic_worker -" in logs or "- sync-host-tag -" in logs
    status = worker.exec_run(["cat", "/proc/1/status"]).output.decode()
    assert "Cpus_allowed_list:\t0\n" in status
    assert f"Uid:\t{SYNAPSE_UID}" in status
    cmdline = worker.exec_run(["cat", "/proc/1/cmdline"]).output.decode().split("\0")
    assert cmdline[1:3] == ["-m", "synapse.app.generic_worker"]
    forced = worker.exec_run(["cat", "/tmp/synapse-conf/forced.yaml"]).output.decode()
    assert "worker_name: sync-1" in forced and "worker_app: synapse.app.generic_worker" in forced
    # Docker's own healthcheck (interval 15 s) eventually agrees; main first.
    wait_healthy(stack["main"], timeout=60)


LEGACY_ROLES = {
    # role: (a path its 8008 listener must serve with a non-404 answer, or None = /health only)
    "generic_worker": "/_matrix/client/versions",
    "client_reader": "/_matrix/client/versions",
    "event_creator": "/_matrix/client/versions",
    "frontend_proxy": "/_matrix/client/versions",
    "user_dir": "/_matrix/client/versions",
    "federation_reader": "/_matrix/federation/v1/version",
    "media_repository": "/_matrix/media/v3/config",
    "pusher": None,
    "federation_sender": None,
    "appservice": None,
}


def test_every_legacy_role_starts(docker_client, stack, test_labels, images, unique_name):
    """Synapse accepts the generated config of every legacy role (started in parallel)."""
    workers = {}
    for role in LEGACY_ROLES:
        name = unique_name(role.replace("_", "-"))
        workers[role] = docker_client.containers.run(
            images["synapse"], name=name, hostname=name, detach=True,
            network=stack["network"].name, labels=test_labels, ports={"8008/tcp": LOCAL},
            volumes={str(stack["data"]): {"bind": "/data", "mode": "ro"}},
            environment={"SYNAPSE_WORKER": "synapse.app." + role,
                         "SYNAPSE_WORKER_NAME": role.replace("_", "-") + "-1",
                         "SYNAPSE_REPLICATION_HOST": stack["names"]["main"]},
            read_only=True, tmpfs={"/tmp": "rw,nosuid,size=64m"}, cap_drop=["ALL"],
        )
    try:
        for role, worker in workers.items():
            port = published_port(worker)
            wait_http(f"http://127.0.0.1:{port}/health", worker, timeout=120)
            wait_log(worker, "REPLICATE successfully sent", timeout=60)
            path = LEGACY_ROLES[role]
            if path is None:  # health-only listener: everything else is 404
                assert http_status(f"http://127.0.0.1:{port}/_matrix/client/versions") == 404, role
            else:  # mounted: 200, or 401 for endpoints that need an access token
                assert http_status(f"http://127.0.0.1:{port}{path}") in (200, 401), role
            if role in ("client_reader", "pusher"):  # not federation
                assert http_status(f"http://127.0.0.1:{port}/_matrix/federation/v1/version") == 404
        for role, worker in workers.items():
            assert stop_and_exit_code(worker) == 0, (role, worker.logs(tail=20))
    finally:
        for worker in workers.values():
            worker.remove(force=True)


def test_docker_stop_gives_exit_code_0(stack):
    worker = stack.get("sync")
    if worker is not None:
        assert stop_and_exit_code(worker) == 0, worker.logs(tail=20)
    assert stop_and_exit_code(stack["main"]) == 0, stack["main"].logs(tail=20)
    assert stop_and_exit_code(stack["redis"]) == 0
    assert stop_and_exit_code(stack["db"]) == 0
    assert worker is not None, "the worker test did not run"


# ----------------------------------------------------------------------------- bad input


def make_data(tmp_path: Path, homeserver: bool, key: bool, redis: bool = True) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    if homeserver:
        text = homeserver_yaml("db", "redis")
        if not redis:
            text = text.replace("redis:\n  enabled: true\n  host: redis\n", "")
            assert "redis" not in text
        (data / "homeserver.yaml").write_text(text)
    if key:
        (data / "signing.key").write_text("ed25519 a_test AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")
    chown_tree(data)
    return data


BAD_INPUT = [
    pytest.param(dict(homeserver=False, key=False), {}, "/data/homeserver.yaml", id="no-homeserver-yaml"),
    pytest.param(dict(homeserver=True, key=False), {}, "signing key /data/signing.key", id="no-signing-key"),
    pytest.param(dict(homeserver=True, key=True), {"SYNAPSE_WORKER": "synapse.app.nonsense"},
                 "synapse.app.synchrotron", id="unknown-worker"),
    pytest.param(dict(homeserver=True, key=True), {"SYNAPSE_WORKER": "synapse.app.synchrotron"},
                 "SYNAPSE_REPLICATION_HOST", id="worker-without-replication-host"),
    pytest.param(dict(homeserver=True, key=True, redis=False),
                 {"SYNAPSE_WORKER": "synapse.app.pusher", "SYNAPSE_REPLICATION_HOST": "main"},
                 "SYNAPSE_REDIS_HOST", id="worker-without-redis"),
    pytest.param(dict(homeserver=True, key=True), {"SYNAPSE_CPU_AFFINITY": "zero"},
                 "SYNAPSE_CPU_AFFINITY", id="bad-cpu-affinity"),
]


@pytest.mark.parametrize("files,env,needle", BAD_INPUT)
def test_bad_input_one_line_exit_2_data_untouched(docker_client, images, test_labels, tmp_path,
                                                  files, env, needle):
    data = make_data(tmp_path, **files)
    before = dir_snapshot(data)
    code, out, err = run_to_exit(
        docker_client, images["synapse"], test_labels, environment=env,
        volumes={str(data): {"bind": "/data", "mode": "rw"}}, network_mode="none",
    )
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("entrypoint: error: ") and needle in lines[0], lines[0]
    assert dir_snapshot(data) == before


def test_missing_signing_key_from_config_path(docker_client, images, test_labels, tmp_path):
    data = make_data(tmp_path, homeserver=True, key=False)
    hs = data / "homeserver.yaml"
    hs.write_text(hs.read_text().replace("/data/signing.key", "/data/keys/my.signing.key"))
    code, _, err = run_to_exit(
        docker_client, images["synapse"], test_labels,
        volumes={str(data): {"bind": "/data", "mode": "rw"}}, network_mode="none",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "/data/keys/my.signing.key" in err and "generate-keys" in err
    assert not (data / "keys").exists()


# ------------------------------------------------------------------------- supervisor mode


def test_supervisor_mode_missing_file(docker_client, images, test_labels, tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "shared.yaml").write_text("server_name: x\n")
    chown_tree(conf)
    code, out, err = run_to_exit(
        docker_client, images["synapse"], test_labels,
        environment={"SYNAPSE_CONFIG_FILES": "/conf/shared.yaml:/conf/missing-worker.yaml",
                     "SYNAPSE_WORKER": "synapse.app.generic_worker"},
        volumes={str(conf): {"bind": "/conf", "mode": "ro"}}, network_mode="none",
    )
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "/conf/missing-worker.yaml" in lines[0], err


def test_supervisor_mode_uses_files_as_is(docker_client, images, test_labels, tmp_path, unique_name):
    """Files are passed unchanged, in order, and nothing is generated: the main process runs
    on SQLite from two files, under the hardening the supervisor uses."""
    conf = tmp_path / "conf"
    conf.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    key = docker_client.containers.run(
        images["synapse"], entrypoint=["/opt/synapse/bin/python", "-c"],
        command=["from signedjson.key import generate_signing_key, write_signing_keys; import sys;"
                 " write_signing_keys(sys.stdout, [generate_signing_key('a_sup')])"],
        network_mode="none", remove=True,
    ).decode()
    (conf / "signing.key").write_text(key)
    (conf / "shared.yaml").write_text(textwrap.dedent(
        """\
        server_name: supervisor-mode.local
        report_stats: false
        signing_key_path: /conf/signing.key
        trusted_key_servers: []
        suppress_key_server_warning: true
        macaroon_secret_key: m
        media_store_path: /synapse_media
        database: {name: sqlite3, args: {database: /data/homeserver.db}}
        no_redirect_stdio: true
        """))
    (conf / "main.yaml").write_text(textwrap.dedent(
        """\
        listeners:
          - {port: 8008, type: http, bind_addresses: [0.0.0.0], resources: [{names: [client]}]}
        """))
    chown_tree(conf)
    chown_tree(data)
    container = docker_client.containers.run(
        images["synapse"], name=unique_name("supervisor-mode"), detach=True,
        labels=test_labels, ports={"8008/tcp": LOCAL},
        environment={"SYNAPSE_CONFIG_FILES": "/conf/shared.yaml:/conf/main.yaml",
                     "SYNAPSE_WORKER": "synapse.app.homeserver"},
        volumes={str(conf): {"bind": "/conf", "mode": "ro"},
                 str(data): {"bind": "/data", "mode": "rw"}},
        read_only=True, tmpfs={"/tmp": "rw,noexec,nosuid,size=64m"},
        cap_drop=["ALL"], security_opt=["no-new-privileges"],
    )
    try:
        wait_http(f"http://127.0.0.1:{published_port(container)}/health", container, timeout=90)
        cmdline = container.exec_run(["cat", "/proc/1/cmdline"]).output.decode().split("\0")
        assert cmdline[1:] == ["-m", "synapse.app.homeserver", "-c", "/conf/shared.yaml",
                               "-c", "/conf/main.yaml", ""]
        listing = container.exec_run(["ls", "-A", "/tmp"]).output.decode()
        assert listing.strip() == "", "supervisor mode must not generate files"
        assert stop_and_exit_code(container) == 0
    finally:
        container.remove(force=True)


# -------------------------------------------------------------------------------- postgres


def test_postgres_requires_a_password(docker_client, images, test_labels):
    code, out, err = run_to_exit(docker_client, images["postgres"], test_labels, network_mode="none")
    assert code == 2
    assert "POSTGRES_PASSWORD_FILE" in err and len(err.strip().splitlines()) == 1
