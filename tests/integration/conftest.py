"""Shared fixtures for integration tests (need a Docker engine; build the images).

Generic helpers, usable by any integration test module:

* ``images``: runs ``scripts/ensure-docker`` and ``image/build`` once per session (a failed
  build fails the tests, nothing is skipped) and returns the image names.
* ``docker_client``: a docker-py client.
* ``test_labels`` / ``unique_name``: every container, network and volume a test creates must
  carry ``test_labels`` (``synapse-supervisor.test=<random id>``); everything with that label
  is removed at the end of the session.
* ``network``: a fresh labelled bridge network.
* helpers: ``chown_tree``, ``wait_http``, ``wait_log``, ``published_port``, ``dir_snapshot``.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import docker
import pytest

REPO = Path(__file__).resolve().parents[2]
LABEL = "synapse-supervisor.test"
SYNAPSE_UID = 991

IMAGES = {
    "base": "synapse-supervisor/debian:bookworm",
    "synapse": "synapse-supervisor/synapse:1.163.2",
    "synapse_latest": "synapse-supervisor/synapse:latest",
    "postgres": "synapse-supervisor/postgres:15",
    "redis": "synapse-supervisor/redis:7",
    "nginx": "synapse-supervisor/nginx:1",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Start dockerd if needed (idempotent)."""
    subprocess.run([str(REPO / "scripts" / "ensure-docker")], check=True)


@pytest.fixture(scope="session")
def docker_client(docker_engine):
    client = docker.from_env(timeout=300)
    yield client
    client.close()


@pytest.fixture(scope="session")
def build_result(docker_engine) -> dict:
    """Run image/build once per session; returns its output and duration."""
    start = time.monotonic()
    proc = subprocess.run([str(REPO / "image" / "build")], capture_output=True, text=True)
    duration = time.monotonic() - start
    if proc.returncode != 0:
        pytest.fail(
            "image/build failed (exit %d):\n%s\n%s"
            % (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:]),
            pytrace=False,
        )
    return {"stdout": proc.stdout, "stderr": proc.stderr, "seconds": duration}


@pytest.fixture(scope="session")
def images(build_result) -> dict[str, str]:
    return dict(IMAGES)


@pytest.fixture(scope="session")
def test_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def test_labels(test_id, docker_client) -> dict[str, str]:
    labels = {LABEL: test_id}
    yield labels
    cleanup_labelled(docker_client, test_id)


def cleanup_labelled(client, test_id: str) -> None:
    """Remove every container, network and volume labelled with this test id."""
    flt = {"label": f"{LABEL}={test_id}"}
    for container in client.containers.list(all=True, filters=flt):
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
    for net in client.networks.list(filters=flt):
        try:
            net.remove()
        except docker.errors.NotFound:
            pass
    for vol in client.volumes.list(filters=flt):
        try:
            vol.remove(force=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture(scope="session")
def unique_name(test_id):
    """unique_name("main") -> "sstest-<id>-main" (hyphenated, DNS-safe)."""

    def make(suffix: str) -> str:
        return f"sstest-{test_id}-{suffix}"

    return make


@pytest.fixture(scope="module")
def network(docker_client, test_labels, unique_name, request):
    """A labelled user-defined bridge network for one test module."""
    name = unique_name(request.module.__name__.rsplit(".", 1)[-1].replace("_", "-"))
    net = docker_client.networks.create(name, driver="bridge", labels=test_labels)
    yield net
    for container in docker_client.containers.list(all=True, filters={"network": net.id}):
        container.remove(force=True, v=True)
    net.remove()


# ------------------------------------------------------------------------------- helpers


def chown_tree(path: Path, uid: int = SYNAPSE_UID, gid: int | None = None) -> None:
    """Give a host directory tree to the container user (the tests run as root)."""
    gid = uid if gid is None else gid
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def dir_snapshot(path: Path) -> dict[str, tuple]:
    """Names, sizes, modes and mtimes of everything under path (to prove nothing changed)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(path))] = (st.st_size, st.st_mode, st.st_mtime_ns, st.st_uid)
    return out


def published_port(container, port: str = "8008/tcp") -> int:
    container.reload()
    bindings = container.attrs["NetworkSettings"]["Ports"].get(port) or []
    for b in bindings:
        if b.get("HostIp") in ("127.0.0.1", "0.0.0.0", ""):
            return int(b["HostPort"])
    raise AssertionError(f"{container.name}: {port} not published: {bindings}")


def _describe(container) -> str:
    container.reload()
    state = container.attrs["State"]
    logs = container.logs(tail=40).decode(errors="replace")
    return f"{container.name}: status={state['Status']} exit={state.get('ExitCode')}\n{logs}"


def http_status(url: str, timeout: float = 5) -> int:
    """One GET (no proxy); returns the HTTP status code."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_http(url: str, container=None, timeout: float = 60, status: int = 200) -> float:
    """Poll url until it returns `status`; returns seconds waited. Fails early if the
    container exits."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        try:
            with opener.open(url, timeout=2) as resp:
                if resp.status == status:
                    return time.monotonic() - start
                last = resp.status
        except urllib.error.HTTPError as e:
            if e.code == status:
                return time.monotonic() - start
            last = e.code
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
        if container is not None:
            container.reload()
            if container.status in ("exited", "dead"):
                raise AssertionError(f"container exited while waiting for {url}\n" + _describe(container))
        time.sleep(0.1)
    raise AssertionError(
        f"{url} did not return {status} within {timeout}s (last: {last})"
        + ("\n" + _describe(container) if container is not None else "")
    )


def wait_log(container, needle: str, timeout: float = 30) -> float:
    """Wait until `needle` appears in the container's output; returns seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if needle in container.logs().decode(errors="replace"):
            return time.monotonic() - start
        container.reload()
        if container.status in ("exited", "dead"):
            break
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in the logs within {timeout}s\n" + _describe(container))


def wait_healthy(container, timeout: float = 60) -> float:
    """Wait for Docker's health status 'healthy' (the image's HEALTHCHECK)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        container.reload()
        health = container.attrs["State"].get("Health", {}).get("Status")
        if health == "healthy":
            return time.monotonic() - start
        if container.status in ("exited", "dead"):
            break
        time.sleep(0.2)
    raise AssertionError("not healthy in time\n" + _describe(container))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "dockerd_restart: restarts the host's dockerd (test_faults.py); skips itself "
        "while other test stacks, daemons or image builds are running")
