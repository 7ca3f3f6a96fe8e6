"""The container backend's contract: what the supervisor asks of an engine, and what it gets.

Everything above this line of the code (the loop, operations, the daemon, destroy) talks to an
`Engine` and sees only the plain records below, never a docker-py object. `DockerEngine`
(`docker_adapter.py`, the only module that imports docker) is today's one implementation, on a
single Docker engine. A Swarm backend (services instead of containers, the same ordering and
readiness gating) would be a second class with these methods, chosen in `daemon.py`; the unit
tests' `FakeEngine` is a third. Errors: `EngineError` (the engine refused; its message is the
operator's one line), `StaleTask` (a start refused for good: replace the container).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

from .containers import ContainerSpec, StackLayout
from .errors import SupervisorError


@dataclass(frozen=True)
class ContainerInfo:
    container_id: str
    name: str
    instance: str
    role: str
    config_hash: str
    status: str  # created, running, exited, ...
    running: bool
    exit_code: int | None
    oom_killed: bool
    started_at: str
    finished_at: str
    ip: str | None
    image: str


@dataclass(frozen=True)
class ContainerEvent:
    action: str  # start, die, oom, kill, stop, destroy, ...
    container_id: str
    instance: str
    exit_code: int | None
    time_nano: int


class EngineError(SupervisorError):
    exit_code = 1


class StaleTask(EngineError):
    """The engine refuses to start a container because containerd still holds a task for it
    ("task <id>: already exists"). It happens when a start call raced dockerd's shutdown: the
    task outlived the engine, and no later start of that container can succeed. The way out
    is to remove the container and create it again."""


class Engine(Protocol):
    """What the supervisor needs from a container backend. Every call may block (the loop
    makes them from worker threads) and may raise `EngineError`. Only objects carrying the
    stack's labels are ever listed, changed or removed."""

    def ping(self) -> bool:
        """Whether the engine answers now (never raises)."""

    # images, networks, volumes
    def image_id(self, image: str) -> str | None:
        """The local image's ID, or None when it is not there (a backend never pulls)."""

    def ensure_network(self, layout: StackLayout) -> str:
        """The stack's network, created if missing; refuses one not labelled as the stack's."""

    def ensure_volume(self, layout: StackLayout, name: str) -> None:
        """A named volume, created if missing; refuses one not labelled as the stack's."""

    def stack_objects(self, stack: str) -> dict[str, list[str]]:
        """{"networks": [...], "volumes": [...]}: the stack's by label."""

    def remove_network(self, name: str) -> None: ...

    def remove_volume(self, name: str) -> None:
        """Only `synapsectl destroy --confirm` calls this."""

    # containers
    def list_stack(self, stack: str) -> list[ContainerInfo]:
        """Every container (running or not) labelled as the stack's."""

    def inspect(self, container_id: str) -> ContainerInfo | None:
        """None when there is no such container."""

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) a container from its spec; its ID."""

    def start(self, container_id: str) -> None:
        """Raises StaleTask when the container can never start again (replace it)."""

    def stop(self, container_id: str, timeout: float) -> None:
        """The stop signal, then a kill after `timeout` seconds; no error if it is gone."""

    def kill(self, container_id: str, signal: str = "SIGKILL") -> None:
        """No error if it is gone or not running."""

    def remove(self, container_id: str) -> None:
        """Remove a container, never its volumes; no error if it is gone."""

    def exec(self, container_id: str, cmd: tuple[str, ...] | list[str]) -> tuple[int, str]:
        """Run a command in a running container: (exit code, combined output)."""

    def logs(self, container_id: str, tail: int | str = "all", since: float | None = None,
             follow: bool = False, timestamps: bool = False) -> bytes | Iterable[bytes]:
        """Its output; with `follow`, an iterator of chunks until the container stops."""

    def last_lines(self, container_id: str, n: int = 15) -> list[str]:
        """Its last lines of output (empty when they cannot be read)."""

    # events
    def events(self, stack: str, since: float | None = None) -> Iterator[ContainerEvent]:
        """The stack's container events from `since` (seconds since the epoch) on. The
        iterator ends or raises when the stream drops; the caller relists and reconnects."""

    def close(self) -> None: ...
