"""Nothing leaked: what the running stack exposes, who may read its secrets, what its
containers may do, and who may talk to the daemon.

One stack with limits set in the stack file runs under the real daemon, next to a decoy
container and network that are not ours (no stack label): they must never be touched. Checked:

* port bindings of every container (Docker's view and the docker-proxy processes): only what
  the stack file publishes, only on 127.0.0.1; never replication (9093) or metrics (9000);
  the daemon's own listeners on loopback only;
* file modes: `synapsectl init`'s secrets, signing key and homeserver.yaml 0600, the stack
  directory not world-readable, the state directory's rendered configs 0600 owned by uid 991
  (PostgreSQL's password by 999), the control socket 0660;
* Synapse containers run as uid 991 with no capabilities, no-new-privileges and a read-only
  root filesystem (seen in the kernel's view of the running process, not only in the
  container config), with the memory and pids limits from the stack file;
* the control API refuses a non-root user outside the socket's group: by the directory, by the
  socket's mode, and (socket made world-writable for the test) by the daemon's SO_PEERCRED check.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.stackrun import StackRun, docker_changes, docker_objects, processes

SYNAPSE_UID = 991
POSTGRES_UID = 999
LIMITS = {
    "main": {"memory": "1g", "pids": 512},
    "sync": {"memory": "512m", "pids": 256, "cpus": 1.5},
    "postgres": {"memory": "768m", "pids": 300},
    "redis": {"memory": "128m", "pids": 64},
}
BYTES = {"1g": 1 << 30, "512m": 512 << 20, "768m": 768 << 20, "128m": 128 << 20}
SYNAPSE = ("main", "sync-1", "event-persister-1")


@pytest.fixture(scope="module")
def decoy(docker_client, images, unique_name):
    """A container and a network without our labels, present during the whole run."""
    net = docker_client.networks.create(unique_name(f"secdecoy-{uuid.uuid4().hex[:4]}"),
                                        labels={"decoy": "1"})
    box = docker_client.containers.run(images["base"], ["sleep", "infinity"], detach=True,
                                       name=unique_name(f"secdecoy-{uuid.uuid4().hex[:4]}"),
                                       labels={"decoy": "1"}, network=net.name)
    before = decoy_view({"container": box, "network": net})
    yield {"container": box, "network": net, "before": before}
    box.remove(force=True)
    net.remove()


def decoy_view(decoy) -> tuple:
    box, net = decoy["container"], decoy["network"]
    box.reload()
    net.reload()
    return (box.id, box.status, box.attrs["State"]["StartedAt"], net.id,
            sorted(net.attrs["Containers"] or {}))


@pytest.fixture(scope="module")
def secured(docker_client, images, tmp_path_factory, decoy):
    name = f"ssts{uuid.uuid4().hex[:6]}"
    run = StackRun(tmp_path_factory.mktemp("security") / "stack", name,
                   {"sync": {"count": 1, "resources": LIMITS["sync"]}, "event_persister": 1},
                   docker_client)
    data = yaml.safe_load(run.stack_file.read_text())
    data["main"] = {"resources": LIMITS["main"]}
    data["postgres"]["resources"] = LIMITS["postgres"]
    data["redis"]["resources"] = LIMITS["redis"]
    run.stack_file.write_text(yaml.safe_dump(data, sort_keys=False))
    run.federation_port = int(data["publish"]["federation"].rsplit(":", 1)[1])
    with run.serving():
        yield run


# ---------------------------------------------------------------------------- ports


def publisher(run) -> str:
    """Who publishes the client and federation ports: the managed proxy, else main."""
    return "proxy" if "proxy" in run.containers() else "main"


def test_only_what_the_stack_file_publishes_and_only_on_loopback(secured):
    who = publisher(secured)
    expected = {(who, "8008/tcp"): secured.client_port,
                (who, "8448/tcp"): secured.federation_port}
    seen = {}
    for inst, c in secured.containers().items():
        c.reload()
        for source in (c.attrs["HostConfig"].get("PortBindings") or {},
                       c.attrs["NetworkSettings"].get("Ports") or {}):
            for port, bindings in source.items():
                for b in bindings or []:
                    assert b["HostIp"] == "127.0.0.1", (inst, port, b)
                    assert not port.startswith(("9093/", "9000/")), (inst, port, b)
                    seen[(inst, port)] = int(b["HostPort"])
    assert seen == expected


def test_docker_proxy_listens_on_loopback_only(secured):
    ips = {secured.ip(i) for i in secured.containers()}
    proxies = []
    for _, args in processes():
        if not args or not args[0].endswith(b"docker-proxy"):
            continue
        opts = dict(zip([a.decode() for a in args[1::2]], [a.decode() for a in args[2::2]]))
        if opts.get("-container-ip") in ips:
            proxies.append(opts)
    assert {(p["-host-ip"], int(p["-host-port"]), p["-container-port"]) for p in proxies} == {
        ("127.0.0.1", secured.client_port, "8008"),
        ("127.0.0.1", secured.federation_port, "8448")}


def test_the_daemon_listens_on_loopback_only(secured):
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    mine = [line.split() for line in out.splitlines() if f"pid={secured.proc.pid}," in line]
    assert mine, "the daemon's metrics listener was not found"
    for fields in mine:
        assert fields[3].startswith("127.0.0.1:"), fields
    assert any(f[3] == f"127.0.0.1:{secured.metrics_port}" for f in mine)


# ----------------------------------------------------------------------------- files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_init_secrets_are_private(secured):
    d = secured.dir
    assert mode(d) & 0o007 == 0, oct(mode(d))
    assert mode(d / "secrets") == 0o700
    secrets = list((d / "secrets").iterdir())
    assert {p.name for p in secrets} >= {"replication_secret", "postgres_password"}
    for p in secrets:
        assert mode(p) == 0o600, (p, oct(mode(p)))
    key = next(d.glob("*.signing.key"))
    assert mode(key) == 0o600
    assert mode(d / "homeserver.yaml") == 0o600
    assert mode(d / "stack.yaml") & 0o007 == 0


def test_state_directory_is_private_and_owned_by_the_container_users(secured):
    state = secured.dir / ".state"
    # 0700, or 0711 (traversable for prometheus-targets.json, never listable or writable)
    assert mode(state) & 0o066 == 0 and mode(state) & 0o700 == 0o700, oct(mode(state))
    conf = state / "conf"
    files = [p for p in conf.rglob("*") if p.is_file()]
    assert any(p.name == "signing.key" for p in files) and any(p.name == "shared.yaml"
                                                                 for p in files)
    for p in [conf, *conf.rglob("*")]:
        st = p.lstat()
        assert st.st_uid == SYNAPSE_UID, (p, st.st_uid)
        assert mode(p) == (0o700 if p.is_dir() else 0o600), (p, oct(mode(p)))
    pw = state / "postgres" / "postgres_password"
    assert pw.lstat().st_uid == POSTGRES_UID and mode(pw) == 0o600
    assert mode(state / "postgres") == 0o700
    for p in state.rglob("*"):
        assert mode(p) & 0o007 == 0 or p.name == "prometheus-targets.json", \
            (p, oct(mode(p)))


def test_control_socket_is_0660(secured):
    sock = secured.dir / "control.sock"
    st = sock.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert mode(sock) == 0o660 and st.st_uid == 0


# ------------------------------------------------------------------------- containers


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@pytest.mark.parametrize("instance", SYNAPSE)
def test_synapse_runs_unprivileged_and_confined(secured, instance):
    c = secured.containers()[instance]
    c.reload()
    cfg, host = c.attrs["Config"], c.attrs["HostConfig"]
    assert cfg["User"] == f"{SYNAPSE_UID}:{SYNAPSE_UID}"
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert "no-new-privileges" in (host.get("SecurityOpt") or [])
    assert host["ReadonlyRootfs"] is True
    assert host["Privileged"] is False
    assert host["NetworkMode"] == f"{secured.name}-net"
    for m in c.attrs["Mounts"]:
        assert "docker.sock" not in m["Source"], m
        if m["Destination"] == "/conf":
            assert m["RW"] is False, m
    # the kernel's view of the running process, not only the configuration
    st = proc_status(c.attrs["State"]["Pid"])
    assert st["Uid"].split() == [str(SYNAPSE_UID)] * 4, st["Uid"]
    assert st["Gid"].split() == [str(SYNAPSE_UID)] * 4, st["Gid"]
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    probe = c.exec_run(["sh", "-c", "touch /probe 2>&1; echo rc=$?"], user=f"{SYNAPSE_UID}")
    assert b"Read-only file system" in probe.output, probe.output


@pytest.mark.parametrize("instance, limits", [("main", LIMITS["main"]),
                                              ("sync-1", LIMITS["sync"]),
                                              ("postgres", LIMITS["postgres"]),
                                              ("redis", LIMITS["redis"])])
def test_limits_from_the_stack_file_are_applied(secured, instance, limits):
    host = secured.containers()[instance].attrs["HostConfig"]
    assert host["Memory"] == BYTES[limits["memory"]], host["Memory"]
    assert host["PidsLimit"] == limits["pids"]
    if "cpus" in limits:
        assert host["NanoCpus"] == int(limits["cpus"] * 1e9)


@pytest.mark.parametrize("instance, uid", [("postgres", POSTGRES_UID), ("redis", None),
                                           ("proxy", None)])
def test_infrastructure_does_not_run_as_root(secured, instance, uid):
    if instance not in secured.containers():
        pytest.skip(f"this stack runs no {instance}")
    c = secured.containers()[instance]
    st = proc_status(c.attrs["State"]["Pid"])
    uids = set(st["Uid"].split())
    assert "0" not in uids, st["Uid"]
    if uid is not None:
        assert uids == {str(uid)}
    assert c.attrs["HostConfig"]["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in c.attrs["HostConfig"]["SecurityOpt"]
    assert st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0
    if instance != publisher(secured):
        assert not (c.attrs["HostConfig"].get("PortBindings") or {})


# -------------------------------------------------------------------- control API


@pytest.fixture
def outsider():
    """A throwaway system user in no group of ours."""
    name = f"sst{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
s.sendall(b"GET /v1/status HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode(errors="replace"))
"""


def as_user(user, path: Path) -> str:
    proc = subprocess.run(["runuser", "-u", user.pw_name, "--", "/usr/bin/python3", "-c",
                           CONNECT, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_control_api_refuses_a_user_outside_the_group(secured, outsider):
    sock = secured.dir / "control.sock"
    # 1. by the path: the stack directory is not searchable for others
    assert as_user(outsider, sock).strip() == "EACCES"
    # 2. by the socket's own mode (0660 root): a hard link in a directory anyone may enter
    open_dir = Path(tempfile.mkdtemp(prefix="sstsec-", dir=tempfile.gettempdir()))
    os.chmod(open_dir, 0o755)
    link = open_dir / "control.sock"
    try:
        os.link(sock, link)
    except OSError as err:
        shutil.rmtree(open_dir)
        pytest.skip(f"cannot hard-link the socket into {open_dir}: {err}")
    try:
        for parent in link.parents:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                pytest.skip(f"{parent} is not searchable by others; cannot isolate the "
                            "socket's mode")
        assert as_user(outsider, link).strip() == "EACCES"
        # 3. by the daemon itself (SO_PEERCRED) when the file mode would let it through
        os.chmod(link, 0o666)
        try:
            answer = as_user(outsider, link)
        finally:
            os.chmod(link, 0o660)
        assert answer.startswith("HTTP/1.") and " 403 " in answer.splitlines()[0], answer
        assert '"code": "forbidden"' in answer and '"ok": false' in answer
        assert '"containers"' not in answer
    finally:
        shutil.rmtree(open_dir)
    assert mode(sock) == 0o660
    assert secured.status()["state"] == "ready"


# ------------------------------------------------------------------------ the decoy


def test_decoy_container_and_network_were_never_touched(secured, decoy, docker_client):
    assert decoy_view(decoy) == decoy["before"]
    # and nothing of the stack sits on the decoy's network or vice versa
    net = decoy["network"]
    net.reload()
    assert set(net.attrs["Containers"] or {}) == {decoy["container"].id}
    stack_net = docker_client.networks.get(f"{secured.name}-net")
    assert decoy["container"].id not in (stack_net.attrs["Containers"] or {})


def test_stopping_the_stack_leaves_the_decoy_alone(secured, decoy, docker_client):
    before = docker_objects(docker_client)
    assert secured.stop_daemon() == 0
    changes = docker_changes(before, docker_objects(docker_client))
    decoy_names = {decoy["container"].name, decoy["network"].name}
    assert not [c for c in changes if any(n in c for n in decoy_names)], changes
    assert decoy_view(decoy) == decoy["before"]
