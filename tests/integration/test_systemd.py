"""The systemd units under a real systemd: `systemctl start synapse-stack@NAME` and friends.

systemd 252 (Debian 12's) runs as PID 1 in a container (image built here, once, FROM the
debootstrap base). `systemd/install` installs the package and the units inside it from the
repository (mounted read-only), exactly as on a host, and writes the stack with
`synapsectl init`. The daemon then drives a real stack on the host's dockerd through the mounted
Docker socket. What is checked, with Docker's own events and systemd's own bookkeeping:

* `systemctl start` returns only once every container is ready (the unit is `activating` until
  READY=1, `active` after), and `systemctl status` shows the daemon's STATUS= line;
* the watchdog is armed, pinged, and the unit stays up beyond WatchdogSec; a hung daemon
  (SIGSTOP) is killed by it and restarted, adopting its containers;
* `systemctl reload` (SIGHUP, RELOADING=1 ... READY=1) applies a new worker in place;
* `systemctl kill -s KILL` of the daemon: systemd restarts it, it adopts the same containers;
* `systemctl stop`: Docker sees the containers die tier by tier in the daemon's stop order (proxy,
  workers, main, then PostgreSQL and Redis); the daemon exits 0;
* `systemd-analyze verify` finds nothing to say about the units.

Paths: the daemon inside the container hands bind-mount sources (its state directory, the
notify sockets) to the *host's* dockerd, so the stack directory lives at the same path on the
host and in the container: STACKS_HOME/<name>, outside /tmp and /home because the unit has
PrivateTmp= and ProtectHome=. `systemd/install --stack-root` points the units there.
Docker's own docker.service does not exist in the container (the host's dockerd serves the
socket): a stand-in unit checks the socket, so Requires=docker.service holds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import docker
import pytest
import yaml

from tests.integration.conftest import REPO
from tests.integration.stackrun import STACK_LABEL, EventRecorder, free_port

pytestmark = pytest.mark.timeout(900)

IMAGE = "synapse-supervisor/systemd-test:bookworm"
BASE_LABEL = "synapse-supervisor.systemd-test.base"
STACKS_HOME = Path("/var/lib/synapse-supervisor-tests")
SRC = "/src/synapse-supervisor"  # the repository, read-only, inside the container
PREFIX = "/opt/synapse-supervisor"
# What systemd/install installs (default: this checkout); e.g. another worktree to compare.
SOURCE = Path(os.environ.get("SSTEST_SYSTEMD_SOURCE", REPO))
WATCHDOG_SEC = 30

DOCKERFILE = """\
ARG BASE=synapse-supervisor/debian:bookworm
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
COPY ca/ /usr/local/share/ca-certificates/
# systemd as PID 1; nothing that needs hardware, a console or logins.
RUN set -eux; \\
    apt-get update; \\
    apt-get install -y --no-install-recommends systemd systemd-sysv dbus procps; \\
    update-ca-certificates; \\
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \\
    systemctl mask systemd-logind.service getty.target console-getty.service \\
        systemd-udevd.service systemd-udev-trigger.service systemd-firstboot.service \\
        systemd-modules-load.service systemd-remount-fs.service sys-kernel-config.mount \\
        sys-kernel-debug.mount sys-kernel-tracing.mount; \\
    systemctl set-default multi-user.target
# The host's dockerd stands in for docker.service (its socket is mounted).
RUN printf '%s\\n' '[Unit]' 'Description=Docker (the host dockerd, socket mounted)' \\
      '[Service]' 'Type=oneshot' 'RemainAfterExit=yes' \\
      'ExecStart=/usr/bin/test -S /var/run/docker.sock' \\
      > /etc/systemd/system/docker.service
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
"""


# --------------------------------------------------------------------------- the container


@pytest.fixture(scope="module")
def systemd_image(images, docker_client, tmp_path_factory) -> str:
    """Build once; rebuilt only when the base image changed."""
    base_id = docker_client.images.get(images["base"]).id
    try:
        if docker_client.images.get(IMAGE).labels.get(BASE_LABEL) == base_id:
            return IMAGE
    except docker.errors.ImageNotFound:
        pass
    context = tmp_path_factory.mktemp("systemd-image")
    (context / "Dockerfile").write_text(DOCKERFILE)
    ca = context / "ca"
    ca.mkdir()
    # the host's extra CA certificates, as image/build copies them (apt and pip need them)
    for source in (REPO / "image" / ".cache" / "ca", Path("/usr/local/share/ca-certificates")):
        for crt in sorted(source.glob("*.crt")) if source.is_dir() else ():
            shutil.copy(crt, ca / crt.name)
    proc = subprocess.run(
        ["docker", "build", "--network", "host", "--build-arg", f"BASE={images['base']}",
         "--label", f"{BASE_LABEL}={base_id}", "-t", IMAGE, str(context)],
        capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building {IMAGE} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                    pytrace=False)
    return IMAGE


class Box:
    """The systemd container, and the stack it runs."""

    def __init__(self, container, name: str, root: Path) -> None:
        self.container = container
        self.name = name
        self.unit = f"synapse-stack@{name}.service"
        self.root = root
        self.stack_dir = root / name
        self.stack_file = self.stack_dir / "stack.yaml"

    def sh(self, *cmd: str, env: dict | None = None, check: bool = True) -> tuple[int, str, str]:
        code, (out, err) = self.container.exec_run(list(cmd), demux=True, environment=env)
        out = (out or b"").decode(errors="replace")
        err = (err or b"").decode(errors="replace")
        if check and code != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {code}\n{out}\n{err}\n"
                                 f"{self.journal(30)}")
        return code, out, err

    def systemctl(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        return self.sh("systemctl", "--no-pager", *args, check=check)

    def is_active(self) -> str:
        return self.systemctl("is-active", self.unit, check=False)[1].strip()

    def show(self, *props: str) -> dict[str, str]:
        args = [a for p in props for a in ("-p", p)]
        out = self.systemctl("show", "--timestamp=us+utc", self.unit, *args)[1]
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def status(self) -> dict:
        code, out, err = self.sh(f"{PREFIX}/bin/synapsectl", "status", "--json", "--stack",
                                 str(self.stack_file), check=False)
        assert out, f"synapsectl status exited {code}: {err}"
        return json.loads(out)

    def journal(self, lines: int = 200, since_pid: int | None = None) -> str:
        args = ["journalctl", "--no-pager", "-u", self.unit, "-n", str(lines), "-o", "cat"]
        if since_pid:
            args += [f"_PID={since_pid}"]
        code, (out, _err) = self.container.exec_run(args, demux=True)
        return (out or b"").decode(errors="replace")

    def daemon_events(self, pid: int) -> list[dict]:
        out = []
        for line in self.journal(5000, since_pid=pid).splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def plan(self) -> dict:
        """The daemon's own start and stop tiers for the current stack file."""
        out = self.sh(f"{PREFIX}/bin/synapsectl", "plan", "--json", "--stack",
                      str(self.stack_file))[1]
        return json.loads(out)

    def edit_stack(self, change) -> None:
        data = yaml.safe_load(self.stack_file.read_text())
        change(data)
        self.stack_file.write_text(yaml.safe_dump(data, sort_keys=False))

    def containers(self, client) -> dict[str, tuple[str, str]]:
        """instance -> (container id, StartedAt), from Docker itself."""
        found = client.containers.list(all=True, filters={"label": f"{STACK_LABEL}={self.name}"})
        return {c.labels["synapse-supervisor.instance"]: (c.id, c.attrs["State"]["StartedAt"])
                for c in found}

    def wait_new_daemon(self, old_pid: str, timeout: float) -> dict[str, str]:
        """Until systemd has restarted the daemon (another MainPID) and it is active again."""
        def check():
            s = self.show("MainPID", "ActiveState", "NRestarts")
            return s if s["ActiveState"] == "active" and s["MainPID"] not in ("0", old_pid) \
                else None
        return self.wait("a new daemon, active", check, timeout, every=0.5)

    def wait(self, what: str, check, timeout: float, every: float = 0.3):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(every)
        raise AssertionError(f"{what}: not within {timeout}s (last: {last})\n"
                             f"{self.journal(40)}")


class Sampler:
    """`systemctl is-active` over and over in a thread: (began, ended, state), host monotonic
    time (the same CLOCK_MONOTONIC systemd uses: Docker sets up no time namespace)."""

    def __init__(self, box: Box, every: float = 0.1) -> None:
        self.box, self.every = box, every
        self.samples: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            state = self.box.is_active()
            self.samples.append((t0, time.monotonic(), state))
            self._stop.wait(self.every)

    def states(self) -> list[str]:
        return [s for _, _, s in self.samples]

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _cleanup_stack(client, name: str) -> None:
    flt = {"label": f"{STACK_LABEL}={name}"}
    for c in client.containers.list(all=True, filters=flt):
        c.remove(force=True, v=False)
    for n in client.networks.list(filters=flt):
        n.remove()
    for v in client.volumes.list(filters=flt):
        v.remove(force=True)


@pytest.fixture(scope="module")
def box(systemd_image, docker_client, test_labels, unique_name):
    name = f"sstsd{uuid.uuid4().hex[:6]}"
    home = STACKS_HOME / name
    root = home / "stacks"
    root.mkdir(parents=True)
    volumes = {
        "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
        "/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
        str(SOURCE): {"bind": SRC, "mode": "ro"},
        str(home): {"bind": str(home), "mode": "rw"},  # the same path on both sides
    }
    docker_cli = shutil.which("docker")
    if docker_cli:  # `synapsectl init` runs Synapse's --generate-config with it
        volumes[os.path.realpath(docker_cli)] = {"bind": "/usr/bin/docker", "mode": "ro"}
    container = None
    try:
        # systemd as PID 1: mounts (sandboxing) and cgroups need near-privileged rights.
        # Not --privileged: it fails where the engine's own bounding set lacks a capability
        # (here CAP_SYS_RESOURCE), so: every capability the engine has.
        container = docker_client.containers.run(
            systemd_image, detach=True, name=unique_name(f"systemd-{name}"), labels=test_labels,
            cap_add=["ALL"], cap_drop=["SYS_RESOURCE"],
            security_opt=["seccomp=unconfined", "apparmor=unconfined"],
            cgroupns="host", network_mode="host",
            tmpfs={"/run": "rw,exec,mode=755", "/run/lock": "rw,mode=1777", "/tmp": "rw,mode=1777"},
            volumes=volumes, stop_signal="SIGRTMIN+3")
        b = Box(container, name, root)
        b.wait("systemd running", lambda: b.sh("systemctl", "is-system-running",
                                                check=False)[1].strip() in ("running", "degraded"),
               timeout=60)
        yield b
    finally:
        if container is not None:
            try:
                container.remove(force=True, v=True)
            except docker.errors.NotFound:
                pass
        _cleanup_stack(docker_client, name)
        shutil.rmtree(home, ignore_errors=True)
        try:
            STACKS_HOME.rmdir()
        except OSError:
            pass


@pytest.fixture(scope="module")
def installed(box):
    """systemd/install, as an operator runs it, then a small worker set."""
    t0 = time.monotonic()
    code, out, err = box.sh(
        f"{SRC}/systemd/install", "--stack-root", str(box.root), "--server-name",
        f"{box.name}.test", "--instance", box.name, "--",
        "--isolated", "--client-port", str(free_port()), "--federation-port", str(free_port()),
        "--metrics-port", str(free_port()),
        env={"PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"})
    seconds = time.monotonic() - t0
    box.edit_stack(lambda d: d.update(workers={"sync": 1}))
    return {"seconds": seconds, "stdout": out, "stderr": err}


@pytest.fixture(scope="module")
def started(box, installed, docker_client):
    """`systemctl start`, with `is-active` sampled all along; Docker's events recorded."""
    events = EventRecorder(docker_client, box.name)
    result = {}

    with Sampler(box) as sampler:
        t0 = time.monotonic()
        result["code"], result["out"], result["err"] = box.systemctl("start", box.unit,
                                                                     check=False)
        result["returned"] = time.monotonic()
        result["seconds"] = result["returned"] - t0
    samples = sampler.samples
    assert result["code"] == 0, f"systemctl start failed: {result}\n{box.journal(60)}"
    status_after = box.status()
    info = box.show("MainPID", "ActiveEnterTimestampMonotonic", "ActiveEnterTimestamp",
                    "NRestarts")
    instances = {m for tier in box.plan()["start"] for m in tier["members"]}
    yield {"samples": samples, "status": status_after, "info": info, "events": events,
           "instances": instances, **result}
    events.close()


# ------------------------------------------------------------------------------- the tests


def test_install_writes_venv_units_and_stack(box, installed):
    assert installed["seconds"] < 300
    code, out, _ = box.sh(f"{PREFIX}/bin/synapse-supervisor", "--version")
    assert out.strip()
    for link in ("synapsectl", "synapse-supervisor"):
        assert box.sh("readlink", f"/usr/local/bin/{link}")[1].strip() == f"{PREFIX}/bin/{link}"
    template = box.sh("cat", "/etc/systemd/system/synapse-stack@.service")[1]
    assert (f"ExecStart={PREFIX}/bin/synapse-supervisor --stack {box.root}/%i/stack.yaml "
            "--log-format json") in template
    assert f"ReadWritePaths=-{box.root}/%i" in template
    assert "/etc/synapse-stack" not in template
    plain = box.sh("cat", "/etc/systemd/system/synapse-stack.service")[1]
    assert f"--stack {box.root}/stack.yaml" in plain
    assert oct(box.root.stat().st_mode & 0o777) == "0o750"
    data = yaml.safe_load(box.stack_file.read_text())
    assert data["name"] == box.name and data["server_name"] == f"{box.name}.test"
    assert data["daemon"]["control_socket"] == f"/run/synapse-stack/{box.name}/control.sock"
    assert f"systemctl enable --now {box.unit}" in installed["stderr"]


def test_systemd_analyze_verify_is_silent(box, installed):
    """The installed units, and the repository's own (default paths), lint clean."""
    code, out, err = box.sh("systemd-analyze", "verify",
                            "/etc/systemd/system/synapse-stack.service",
                            f"synapse-stack@{box.name}.service", check=False)
    assert code == 0 and not out.strip() and not err.strip(), (code, out, err)
    box.sh("mkdir", "-p", "/tmp/pristine")
    for unit in ("synapse-stack.service", "synapse-stack@.service"):
        box.sh("cp", f"{SRC}/systemd/{unit}", f"/tmp/pristine/{unit}")
    code, out, err = box.sh("sh", "-c", "cd /tmp/pristine && systemd-analyze verify "
                            "./synapse-stack.service ./synapse-stack@.service "
                            "synapse-stack@lint.service", check=False)
    assert code == 0 and not out.strip() and not err.strip(), (code, out, err)


def test_plain_unit_without_a_stack_fails_once_with_the_daemons_message(box, installed):
    """synapse-stack.service, no STACK_ROOT/stack.yaml: the sandbox still starts (the '-' on
    ReadWritePaths=), the daemon says what is wrong, exit 2, and systemd does not retry."""
    unit = "synapse-stack.service"
    code, out, err = box.systemctl("start", unit, check=False)
    assert code != 0
    time.sleep(7)  # > RestartSec=5: a restart would have happened by now
    info = dict(line.split("=", 1) for line in box.systemctl(
        "show", unit, "-p", "ActiveState", "-p", "ExecMainStatus", "-p", "NRestarts",
        "-p", "Result")[1].splitlines())
    assert info == {"ActiveState": "failed", "ExecMainStatus": "2", "NRestarts": "0",
                    "Result": "exit-code"}, info
    log = box.sh("journalctl", "--no-pager", "-u", unit, "-o", "cat")[1]
    assert f"{box.root}/stack.yaml" in log and "stack file not found" in log, log
    box.systemctl("reset-failed", unit)


def test_start_returns_only_when_the_stack_is_ready(box, started):
    assert started["status"]["state"] == "ready", started["status"]
    n = len(started["instances"])
    assert {"postgres", "redis", "main", "sync-1"} <= started["instances"]
    assert started["status"]["ready"] == started["status"]["total"] == n
    assert box.is_active() == "active"
    states = [s for _, _, s in started["samples"]]
    assert "activating" in states, states
    # systemd's own clock: active only from the moment READY=1 arrived, activating before.
    active_at = int(started["info"]["ActiveEnterTimestampMonotonic"]) / 1e6
    assert active_at <= started["returned"]
    for t_begin, t_end, state in started["samples"]:
        if t_end < active_at:  # (inactive: sampled before systemd queued the start job)
            assert state in ("activating", "inactive"), started["samples"]
        elif t_begin > active_at:
            assert state == "active", started["samples"]
    # every container was started (Docker's events) before the unit became active
    active_wall = datetime.strptime(started["info"]["ActiveEnterTimestamp"],
                                    "%a %Y-%m-%d %H:%M:%S.%f %Z").replace(tzinfo=timezone.utc)
    starts = {inst: t for inst, t in started["events"].of("start")}
    assert set(starts) == started["instances"]
    assert max(starts.values()) < active_wall.timestamp()
    # ... and the daemon said "stack_ready" before telling systemd
    pid = int(started["info"]["MainPID"])
    names = [e.get("event") for e in box.daemon_events(pid)]
    assert "stack_ready" in names


def test_status_shows_the_daemons_status_line(box, started):
    _, out, _ = box.systemctl("status", box.unit, check=False)
    n = len(started["instances"])
    assert f'Status: "ready: {n}/{n} ready"' in out, out
    assert box.show("StatusText")["StatusText"] == f"ready: {n}/{n} ready"


def test_watchdog_is_armed_pinged_and_the_unit_stays_up(box, started):
    info = box.show("WatchdogUSec", "MainPID")
    assert info["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    pid = info["MainPID"]
    environ = box.sh("cat", f"/proc/{pid}/environ")[1].split("\0")
    assert f"WATCHDOG_USEC={WATCHDOG_SEC * 1_000_000}" in environ
    assert f"WATCHDOG_PID={pid}" in environ
    # pings arrive: systemd's record of the last one moves forward (every WatchdogSec/2)
    first = int(box.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    box.wait("a later watchdog ping", lambda: int(box.show("WatchdogTimestampMonotonic")[
        "WatchdogTimestampMonotonic"]) > first, timeout=WATCHDOG_SEC / 2 + 5, every=1)
    # still the same process, never restarted, well past WatchdogSec
    active_at = int(started["info"]["ActiveEnterTimestampMonotonic"]) / 1e6
    time.sleep(max(0.0, active_at + WATCHDOG_SEC + 2 - time.monotonic()))
    now = box.show("MainPID", "NRestarts", "ActiveState", "ActiveEnterTimestampMonotonic")
    assert now["ActiveState"] == "active"
    assert now["MainPID"] == started["info"]["MainPID"]
    assert now["NRestarts"] == "0"
    assert now["ActiveEnterTimestampMonotonic"] == started["info"][
        "ActiveEnterTimestampMonotonic"]
    assert "Watchdog timeout" not in box.journal(500)


def test_reload_applies_a_new_worker_in_place(box, started, docker_client):
    before = box.containers(docker_client)
    info = box.show("MainPID", "NRestarts")
    box.edit_stack(lambda d: d["workers"].update(client_reader=1))

    def applied():
        try:
            rows = {c["instance"]: c for c in box.status()["containers"]}
        except (AssertionError, ValueError):
            return False
        row = rows.get("client-reader-1")
        return box.is_active() == "active" and row is not None and row["ready"]

    with Sampler(box) as sampler:
        # ExecReload= sends SIGHUP. systemd 252 then waits for READY=1 when the daemon's
        # RELOADING=1 arrives before kill(1) has exited (the usual case), else it returns at
        # once and the unit shows "reloading" until READY=1: either way it is seen here.
        box.systemctl("reload", box.unit)
        box.wait("client-reader-1 ready after reload", applied, timeout=180, every=0.2)
    assert "reloading" in sampler.states(), sampler.samples
    after = box.show("MainPID", "NRestarts", "ActiveState", "StatusText")
    assert after["ActiveState"] == "active"
    if (after["MainPID"], after["NRestarts"]) != (info["MainPID"], info["NRestarts"]):
        died = [line for line in box.journal(400).splitlines()
                if not line.startswith("{") or '"level": "error"' in line
                and '"container_output"' not in line]
        raise AssertionError("the daemon did not survive the reload (systemd restarted it):\n"
                             + "\n".join(died[-15:]))
    n = len(before) + 1
    assert after["StatusText"] == f"ready: {n}/{n} ready"
    # exactly the difference was applied: what the daemon says it changed, and nothing else
    events = box.daemon_events(int(info["MainPID"]))
    changes = {e["instance"]: e["action"] for e in events if e.get("event") == "reload"}
    assert changes.get("client-reader-1") == "add", changes
    reloaded = [e for e in events if e.get("event") == "reloaded"]
    assert reloaded and reloaded[-1]["changes"] == len(changes), reloaded
    now = box.containers(docker_client)
    assert set(now) == set(before) | {"client-reader-1"}
    for inst, (cid, started_at) in before.items():
        if changes.get(inst) is None:
            assert now[inst] == (cid, started_at), \
                f"{inst} was restarted by a reload that only changed {changes}"


def test_daemon_killed_is_restarted_and_adopts(box, started, docker_client):
    before = box.containers(docker_client)
    info = box.show("MainPID", "NRestarts")
    box.systemctl("kill", "-s", "KILL", "--kill-who=main", box.unit)
    new = box.wait_new_daemon(info["MainPID"], timeout=120)
    assert int(new["NRestarts"]) == int(info["NRestarts"]) + 1
    assert box.status()["state"] == "ready"
    assert box.containers(docker_client) == before  # same containers, none restarted
    converge = [e for e in box.daemon_events(int(new["MainPID"])) if e.get("event") == "converge"]
    assert {e["instance"] for e in converge} == set(before)
    assert {e["action"] for e in converge} == {"adopt"}


def test_hung_daemon_is_killed_by_the_watchdog_and_restarted(box, started, docker_client):
    before = box.containers(docker_client)
    info = box.show("MainPID", "NRestarts")
    t0 = time.monotonic()
    box.systemctl("kill", "-s", "STOP", "--kill-who=main", box.unit)  # the loop stops pinging
    new = box.wait_new_daemon(info["MainPID"], timeout=WATCHDOG_SEC + 60)
    assert time.monotonic() - t0 >= WATCHDOG_SEC / 2  # not before the last ping + WatchdogSec
    log = box.journal(300)
    assert f"Watchdog timeout (limit {WATCHDOG_SEC}s)!" in log
    assert "Failed with result 'watchdog'" in log
    assert int(new["NRestarts"]) == int(info["NRestarts"]) + 1
    assert box.status()["state"] == "ready"
    assert box.containers(docker_client) == before


def test_stop_is_ordered_and_clean(box, started, docker_client):
    events = started["events"]
    tiers = [set(t["members"]) for t in box.plan()["stop"]]
    t0 = time.time()
    box.systemctl("stop", box.unit)
    info = box.show("ActiveState", "Result", "ExecMainStatus", "MainPID")
    assert info == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0",
                    "MainPID": "0"}, f"{info}\n{box.journal(30)}"
    assert "Deactivated successfully" in box.journal(20)
    box.wait("Docker's die events", lambda: len({i for i, _ in events.of("die", since=t0)})
             >= len(box.containers(docker_client)), timeout=10)
    dies = {}
    for inst, t in events.of("die", since=t0):
        dies.setdefault(inst, t)
    assert set(dies) == set().union(*tiers), (dies, tiers)
    assert [t["tier"] for t in box.plan()["stop"]][-2:] == ["main", "infrastructure"]
    for earlier, later in zip(tiers, tiers[1:]):  # e.g. proxy, workers, main, infrastructure
        assert max(dies[i] for i in earlier) < min(dies[i] for i in later), (dies, tiers)
    for c in docker_client.containers.list(all=True,
                                           filters={"label": f"{STACK_LABEL}={box.name}"}):
        assert c.status == "exited" and c.attrs["State"]["ExitCode"] == 0, c.name
    # the runtime directory is kept (shared by every stack); the control socket is gone
    assert box.sh("test", "-d", "/run/synapse-stack", check=False)[0] == 0
    assert box.sh("test", "-e", f"/run/synapse-stack/{box.name}/control.sock",
                  check=False)[0] != 0
