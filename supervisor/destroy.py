"""`synapsectl destroy`: the one command that deletes data, and only when confirmed.

It refuses while a daemon runs the stack, stops anything of the stack still running in stop
order, removes the stack's containers and network and, unless `--keep-volumes`, its volumes
(the PostgreSQL database and the media store) and the rendered state directory. Only objects
labelled with this stack's name are touched. The stack directory itself (stack.yaml,
homeserver.yaml, signing key, secrets) is never deleted.
"""

from __future__ import annotations

import shutil

from . import lifecycle
from .containers import layout_of
from .engine import Engine
from .errors import SupervisorError, UsageError
from .stack import Stack


def destroy(stack: Stack, engine: Engine, keep_volumes: bool) -> dict:
    found = engine.list_stack(stack.name)
    order = {name: n for n, level in enumerate(lifecycle.levels(lifecycle.dependents(
        lifecycle.dependencies(stack)))) for name in level}
    for info in sorted(found, key=lambda c: order.get(c.instance, -1)):
        if info.running:
            engine.stop(info.container_id, stack.restart.stop_timeout)
    for info in found:
        engine.remove(info.container_id)
    objects = engine.stack_objects(stack.name)
    for net in objects["networks"]:
        engine.remove_network(net)
    removed_volumes = []
    if not keep_volumes:
        for vol in objects["volumes"]:
            engine.remove_volume(vol)
            removed_volumes.append(vol)
        state = layout_of(stack).state_dir
        if state.is_dir() and state != stack.stack_file.parent:
            shutil.rmtree(state)
    return {"containers": sorted(c.name for c in found), "networks": objects["networks"],
            "volumes": removed_volumes}


def confirm(stack: Stack, given: str | None, interactive: bool, keep_volumes: bool) -> None:
    if keep_volumes:
        return
    if given is None and interactive:
        given = input(f"This deletes the database and media of stack {stack.name!r}. "
                      "Type the stack name to confirm: ").strip()
    if given != stack.name:
        raise UsageError(f"destroy: not confirmed (fix: pass --confirm {stack.name}, or "
                         "--keep-volumes to keep the database and media)")


def refuse_if_running(socket_path: str) -> None:
    """Anything but "no socket" or "refused" counts as a running daemon (a socket we may not
    open is still somebody's daemon)."""
    import errno
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(socket_path)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return
    raise SupervisorError("destroy: a daemon runs this stack (fix: stop it first, e.g. "
                          "systemctl stop synapse-stack or scripts/down)")
