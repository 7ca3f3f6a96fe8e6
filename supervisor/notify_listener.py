"""Receive Synapse's own sd_notify messages, one datagram socket per container.

Synapse sends `READY=1` once its listeners are up (and `STOPPING=1` at shutdown) to
$NOTIFY_SOCKET. The daemon binds one unix datagram socket per instance under the state
directory; the directory is bind-mounted into that container, so who sent a message is known
from the socket it arrived on, without trusting its content. A single thread waits on all
sockets and hands `(instance, fields)` to a callback: no polling.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
from pathlib import Path
from typing import Callable

SOCKET_NAME = "notify.sock"


def parse(datagram: bytes) -> dict[str, str]:
    fields = {}
    for line in datagram.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


class NotifyListener:
    def __init__(self, callback: Callable[[str, dict[str, str]], None]) -> None:
        self._callback = callback
        self._selector = selectors.DefaultSelector()
        self._sockets: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._closed = False
        self._thread.start()

    def add(self, instance: str, directory: Path, uid: int | None = None) -> Path:
        """(Re)bind the socket for `instance` in `directory`; return its path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SOCKET_NAME
        with self._lock:
            old = self._sockets.pop(instance, None)
            if old is not None:
                self._selector.unregister(old)
                old.close()
            if path.exists() or path.is_symlink():
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Bind through the directory's fd: a unix socket path is limited to 107 bytes,
            # state directories are not.
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                sock.bind(f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}")
            finally:
                os.close(dir_fd)
            sock.setblocking(False)
            os.chmod(path, 0o600)
            if uid is not None and os.geteuid() == 0:
                os.chown(path, uid, uid)
                os.chown(directory, uid, uid)
            os.chmod(directory, 0o700)
            self._sockets[instance] = sock
            self._selector.register(sock, selectors.EVENT_READ, instance)
        self._wake_w.send(b"x")
        return path

    def _run(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(timeout=None):
                if key.data is None:
                    self._wake_r.recv(4096)
                    continue
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, OSError):
                    continue
                self._callback(key.data, parse(data))

    def close(self) -> None:
        self._closed = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=2)
        with self._lock:
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()
