"""supervisor/sd_notify.py against a real unix datagram socket, as systemd listens.

Each test binds a SOCK_DGRAM socket (a path in tmp, or the abstract '@' form), points
$NOTIFY_SOCKET at it and reads back exactly what systemd would receive.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from supervisor import sd_notify


class Listener:
    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # what $NOTIFY_SOCKET says

    def fields(self, timeout: float = 2.0) -> dict[str, str]:
        """One datagram, parsed the way systemd does (newline-separated KEY=VALUE)."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        out = {}
        for line in data.split("\n"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r} in {data!r}"
            out[key] = value
        return out

    def raw(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def empty(self) -> bool:
        self.sock.settimeout(0.2)
        try:
            self.sock.recv(4096)
        except (TimeoutError, socket.timeout, BlockingIOError):
            return True
        return False


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        address = path
    else:
        name = f"sstest-notify-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield Listener(sock, address)
    sock.close()


def test_ready_carries_status(listener):
    assert sd_notify.ready("ready: 4/4 ready") is True
    assert listener.fields() == {"READY": "1", "STATUS": "ready: 4/4 ready"}


def test_status_alone(listener):
    assert sd_notify.status("starting: 1/4 ready; main starting") is True
    assert listener.fields() == {"STATUS": "starting: 1/4 ready; main starting"}


def test_reloading_sends_monotonic_usec_now(listener):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sd_notify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = listener.fields()
    assert set(fields) == {"RELOADING", "MONOTONIC_USEC"}
    assert fields["RELOADING"] == "1"
    # systemd >= 253 (Type=notify-reload) requires MONOTONIC_USEC= in CLOCK_MONOTONIC µs.
    usec = int(fields["MONOTONIC_USEC"])
    assert before <= usec <= after
    assert after - before < 1_000_000


def test_stopping(listener):
    assert sd_notify.stopping() is True
    assert listener.fields() == {"STOPPING": "1"}


def test_watchdog_ping(listener):
    assert sd_notify.watchdog() is True
    assert listener.raw() == b"WATCHDOG=1"


def test_one_datagram_per_call_in_order(listener):
    sd_notify.reloading()
    sd_notify.ready("ready: 5/5 ready")
    sd_notify.stopping()
    assert "RELOADING" in listener.fields()
    assert listener.fields() == {"READY": "1", "STATUS": "ready: 5/5 ready"}
    assert listener.fields() == {"STOPPING": "1"}
    assert listener.empty()


def test_sender_is_this_process(listener):
    """NotifyAccess=main: systemd accepts the datagram only from the main PID, which it
    learns from the sender's credentials, so the message must come from this process."""
    listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sd_notify.watchdog()
    listener.sock.settimeout(2)
    _data, ancdata, _flags, _addr = listener.sock.recvmsg(4096, socket.CMSG_SPACE(12))
    creds = [d for level, kind, d in ancdata
             if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds, "no SCM_CREDENTIALS"
    pid = int.from_bytes(creds[0][:4], "little")
    assert pid == os.getpid()


def test_no_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.ready("x") is False
    assert sd_notify.status("x") is False
    assert sd_notify.watchdog() is False
    assert sd_notify.reloading() is False
    assert sd_notify.stopping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sd_notify.ready("x") is False


def test_unreachable_socket_never_raises(tmp_path, monkeypatch):
    """systemd gone (or a stale path): the daemon keeps running."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sd_notify.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@sstest-nobody-{uuid.uuid4().hex}")
    assert sd_notify.watchdog() is False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd_notify.watchdog_interval() == pytest.approx(15.0)
    monkeypatch.delenv("WATCHDOG_PID")  # systemd may omit it: the watchdog is still ours
    assert sd_notify.watchdog_interval() == pytest.approx(15.0)
    monkeypatch.setenv("WATCHDOG_USEC", "500000")
    assert sd_notify.watchdog_interval() == pytest.approx(0.25)


def test_watchdog_interval_off(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sd_notify.watchdog_interval() is None
    # set for another process (inherited by a child): not ours to ping
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sd_notify.watchdog_interval() is None
