"""A scripted stand-in for DockerEngine, to replay event histories through the real loop.

It never proves that the product works with Docker (the integration tests do that); it lets
unit tests drive error paths: a main that dies before ready, a crash-looping worker, a worker
that dies while main is down. Synapse containers "become ready" by sending READY=1 to their
real notify socket, as Synapse does.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

from supervisor.engine import ContainerEvent, ContainerInfo, StaleTask


class FakeEngine:
    def __init__(self, state_dir: Path, behaviour: dict[str, list[str]] | None = None) -> None:
        """`behaviour[instance]` is consumed one entry per start: "ok" (ready), "die" (exits 1
        at once), "hang" (never ready), "stale" (the start is refused with containerd's
        'task already exists', as after a start that raced dockerd's shutdown)."""
        self.state_dir = state_dir
        self.behaviour = behaviour or {}
        self.containers: dict[str, ContainerInfo] = {}
        self.calls: list[tuple[str, str]] = []
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._n = 0

    def ping(self):
        return True

    # images, networks, volumes
    def image_id(self, image):
        return "sha256:" + image

    def ensure_network(self, layout):
        return "net"

    def ensure_volume(self, layout, name):
        pass

    def list_stack(self, stack):
        return list(self.containers.values())

    def inspect(self, cid):
        return self.containers.get(cid)

    def create(self, spec):
        with self._lock:
            self._n += 1
            cid = f"{spec.instance}-{self._n:04d}".ljust(64, "0")
        self.containers[cid] = ContainerInfo(
            container_id=cid, name=spec.name, instance=spec.instance, role=spec.role,
            config_hash=spec.config_hash, status="created", running=False, exit_code=None,
            oom_killed=False, started_at="", finished_at="", ip="127.0.0.1", image=spec.image)
        self.calls.append(("create", spec.instance))
        return cid

    def start(self, cid):
        info = self.containers[cid]
        self.calls.append(("start", info.instance))
        plan = self.behaviour.get(info.instance) or ["ok"]
        what = plan.pop(0) if len(plan) > 1 else plan[0]
        if what == "stale":
            raise StaleTask(f"starting {cid[:12]}: task {cid}: already exists")
        self.containers[cid] = replace(info, running=True, status="running")
        if what == "die":
            threading.Timer(0.01, self.die, args=(info.instance, 1)).start()
        elif what == "ok" and info.role not in ("postgres", "redis", "proxy"):
            sock_path = self.state_dir / "notify" / info.instance / "notify.sock"
            threading.Timer(0.01, self._notify, args=(sock_path,)).start()

    def _notify(self, path: Path) -> None:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)  # paths may exceed 107 bytes
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"READY=1\nMAINPID=1", f"/proc/self/fd/{fd}/{path.name}")
        finally:
            os.close(fd)

    def die(self, instance: str, code: int = 137, oom: bool = False) -> None:
        cid = next(c for c, i in self.containers.items() if i.instance == instance)
        self.containers[cid] = replace(self.containers[cid], running=False, status="exited",
                                       exit_code=code, oom_killed=oom)
        self._events.put(ContainerEvent("die", cid, instance, code, time.time_ns()))

    def stop(self, cid, timeout):
        info = self.containers[cid]
        self.calls.append(("stop", info.instance))
        self.containers[cid] = replace(info, running=False, status="exited", exit_code=0)
        self._events.put(ContainerEvent("die", cid, info.instance, 0, time.time_ns()))

    def kill(self, cid, signal="SIGKILL"):
        self.die(self.containers[cid].instance, 137)

    def exec(self, cid, cmd):
        self.calls.append(("exec", " ".join(cmd)))
        return 0, ""

    def remove(self, cid):
        self.calls.append(("remove", cid))
        info = self.containers.pop(cid, None)
        if info is not None:
            self._events.put(ContainerEvent("destroy", cid, info.instance, None, time.time_ns()))

    def last_lines(self, cid, n=15):
        return ["Uninitialised database: run the main synapse process first"]

    def events(self, stack, since=None):
        while True:
            ev = self._events.get()
            if ev is None:
                return
            yield ev

    def started(self) -> list[str]:
        return [inst for call, inst in self.calls if call == "start"]
