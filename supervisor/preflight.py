"""Checks against the host before the daemon touches anything: one daemon per stack, and
published ports that are free (or already held by this stack's own container)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from .errors import ConfigError, SupervisorError
from .lint import host_port, published
from .stack import MAIN, PROXY, Stack


def lock_stack(stack: Stack) -> int:
    """Hold an exclusive lock for this stack's daemon; the fd must stay open."""
    path = Path("/run/synapse-stack") if os.geteuid() == 0 else stack.stack_file.parent
    path.mkdir(parents=True, exist_ok=True)
    lock = path / f"{stack.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode().strip() or "?"
        os.close(fd)
        raise SupervisorError(f"another synapse-supervisor already runs stack {stack.name} "
                              f"(pid {holder}; lock {lock}) (fix: use synapsectl to talk to it, "
                              "or stop it first)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def port_in_use(host: str, port: int, stack: Stack | None = None, key: str = "") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise ConfigError(stack.stack_file if stack else "", key or f"{host}:{port}",
                              f"cannot bind {host}:{port}: {err.strerror}",
                              "use an address of this host, e.g. 127.0.0.1") from None
    return False


def owner_instance(stack: Stack, key: str) -> str | None:
    if key in ("publish.client", "publish.federation"):
        return PROXY if stack.has_proxy else MAIN
    if key.startswith("publish.synapse_metrics."):
        return key.rsplit(".", 1)[1]
    return None


def check_ports(stack: Stack, running_instances: set[str]) -> None:
    for key, address in published(stack):
        owner = owner_instance(stack, key)
        if owner is not None and owner in running_instances:
            continue  # our own running container holds it; it will be adopted
        host, port = host_port(address)
        if port_in_use(host, port, stack, key):
            raise ConfigError(stack.stack_file, key, f"{address} is already in use on this host",
                              f"stop what listens there, or change {key}")
