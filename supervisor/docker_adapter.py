"""The only module that talks to Docker: every Engine API call the product makes is here.

`DockerEngine` turns `ContainerSpec`s into containers, finds the stack's containers by label
(never anything else), stops and starts them, reads their state, logs and the event stream, and
turns docker-py errors into ours. It returns plain records (`ContainerInfo`), so the lifecycle
and the daemon never see docker-py objects. It implements `engine.Engine`, the contract a Swarm
backend would implement beside it.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Iterator

import docker
import docker.errors
from docker.types import Mount as DockerMount

from .containers import (LABEL_HASH, LABEL_INSTANCE, LABEL_ROLE, LABEL_STACK, ContainerSpec,
                         StackLayout)
from .engine import ContainerEvent, ContainerInfo, EngineError, StaleTask
from .errors import DockerUnavailable


# The backend's error and record types live with the contract (engine.py); kept importable
# from here under their old names.
DockerError = EngineError


class DockerEngine:
    def __init__(self, base_url: str | None = None, timeout: int = 120) -> None:
        try:
            if base_url:
                self.api = docker.APIClient(base_url=base_url, timeout=timeout)
            else:
                self.api = docker.from_env(timeout=timeout).api
            self.api.ping()
        except Exception as err:  # docker-py raises several kinds here
            raise DockerUnavailable(
                f"Docker engine not reachable ({type(err).__name__}) (fix: start dockerd, e.g. "
                "scripts/ensure-docker, or set DOCKER_HOST)") from None

    def ping(self) -> bool:
        try:
            return bool(self.api.ping())
        except Exception:
            return False

    # --- images, networks, volumes ------------------------------------------------------

    def image_id(self, image: str) -> str | None:
        try:
            return self.api.inspect_image(image)["Id"]
        except docker.errors.ImageNotFound:
            return None

    def ensure_network(self, layout: StackLayout) -> str:
        found = self.api.networks(names=[layout.network])
        for net in found:
            if net["Name"] == layout.network:
                labels = net.get("Labels") or {}
                if labels.get(LABEL_STACK) != layout.stack:
                    raise DockerError(f"network {layout.network} exists but does not belong to "
                                      f"stack {layout.stack} (fix: rename the stack or remove "
                                      "that network)")
                return net["Id"]
        net = self.api.create_network(layout.network, driver="bridge",
                                      labels={LABEL_STACK: layout.stack}, check_duplicate=True)
        return net["Id"]

    def ensure_volume(self, layout: StackLayout, name: str) -> None:
        try:
            vol = self.api.inspect_volume(name)
            if (vol.get("Labels") or {}).get(LABEL_STACK) != layout.stack:
                raise DockerError(f"volume {name} exists but does not belong to stack "
                                  f"{layout.stack} (fix: rename the stack, or label the volume)")
        except docker.errors.NotFound:
            self.api.create_volume(name, labels={LABEL_STACK: layout.stack})

    def stack_objects(self, stack: str) -> dict[str, list[str]]:
        """Names of the stack's networks and volumes (for status and destroy)."""
        label = f"{LABEL_STACK}={stack}"
        nets = [n["Name"] for n in self.api.networks(filters={"label": label})]
        vols = [v["Name"] for v in (self.api.volumes(filters={"label": label}).get("Volumes")
                                    or [])]
        return {"networks": nets, "volumes": vols}

    def remove_network(self, name: str) -> None:
        self.api.remove_network(name)

    def remove_volume(self, name: str) -> None:
        self.api.remove_volume(name)

    # --- containers -----------------------------------------------------------------------

    def list_stack(self, stack: str) -> list[ContainerInfo]:
        found = self.api.containers(all=True, filters={"label": f"{LABEL_STACK}={stack}"})
        infos = []
        for c in found:
            info = self.inspect(c["Id"])
            if info is not None:
                infos.append(info)
        return infos

    def inspect(self, container_id: str) -> ContainerInfo | None:
        try:
            c = self.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        labels = c["Config"].get("Labels") or {}
        state = c["State"]
        nets = (c.get("NetworkSettings") or {}).get("Networks") or {}
        ip = next((n.get("IPAddress") for n in nets.values() if n.get("IPAddress")), None)
        return ContainerInfo(
            container_id=c["Id"], name=c["Name"].lstrip("/"),
            instance=labels.get(LABEL_INSTANCE, ""), role=labels.get(LABEL_ROLE, ""),
            config_hash=labels.get(LABEL_HASH, ""), status=state.get("Status", ""),
            running=bool(state.get("Running")), exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")), started_at=state.get("StartedAt", ""),
            finished_at=state.get("FinishedAt", ""), ip=ip, image=c["Config"].get("Image", ""))

    def create(self, spec: ContainerSpec) -> str:
        mounts = [DockerMount(target=m.target, source=m.source, type=m.kind,
                              read_only=m.read_only) for m in spec.mounts]
        res = spec.resources
        host_config = self.api.create_host_config(
            mounts=mounts,
            port_bindings={p: b for p, b in spec.ports.items()},
            mem_limit=res.memory, nano_cpus=int(res.cpus * 1e9) if res.cpus else None,
            pids_limit=res.pids, read_only=spec.read_only or None, tmpfs=spec.tmpfs or None,
            cap_drop=list(spec.cap_drop) or None, cap_add=list(spec.cap_add) or None,
            security_opt=list(spec.security_opt) or None, network_mode=spec.network,
            restart_policy={"Name": "no"}, init=False)
        networking = self.api.create_networking_config({
            spec.network: self.api.create_endpoint_config(aliases=[spec.instance])})
        try:
            created = self.api.create_container(
                spec.image, command=list(spec.command) if spec.command else None,
                name=spec.name, environment=spec.env, labels=spec.labels, user=spec.user,
                ports=[int(p.split("/")[0]) for p in spec.ports], host_config=host_config,
                networking_config=networking, stop_signal=spec.stop_signal,
                stop_timeout=int(spec.stop_timeout), detach=True)
        except docker.errors.ImageNotFound:
            raise DockerError(f"image {spec.image} not found (fix: build it with image/build, "
                              "or set images: in the stack file)") from None
        except docker.errors.APIError as err:
            raise DockerError(f"creating {spec.name}: {err.explanation or err}") from None
        return created["Id"]

    def start(self, container_id: str) -> None:
        try:
            self.api.start(container_id)
        except docker.errors.APIError as err:
            text = str(err.explanation or err)
            if "task" in text and "already exists" in text:
                raise StaleTask(f"starting {container_id[:12]}: {text}") from None
            raise DockerError(f"starting {container_id[:12]}: {text}") from None

    def stop(self, container_id: str, timeout: float) -> None:
        try:
            self.api.stop(container_id, timeout=max(0, int(round(timeout))))
        except docker.errors.NotFound:
            pass

    def kill(self, container_id: str, signal: str = "SIGKILL") -> None:
        try:
            self.api.kill(container_id, signal=signal)
        except (docker.errors.NotFound, docker.errors.APIError):
            pass  # already gone or not running

    def exec(self, container_id: str, cmd: tuple[str, ...] | list[str]) -> tuple[int, str]:
        """Run a command in a running container; (exit code, combined output)."""
        try:
            ex = self.api.exec_create(container_id, list(cmd), stdout=True, stderr=True)
            out = self.api.exec_start(ex["Id"])
            code = self.api.exec_inspect(ex["Id"]).get("ExitCode")
        except docker.errors.APIError as err:
            return 1, str(err.explanation or err)
        return (code if code is not None else 1), out.decode(errors="replace")

    def remove(self, container_id: str) -> None:
        """Remove a container. Named volumes are never removed here (v=False)."""
        try:
            self.api.remove_container(container_id, v=False, force=True)
        except docker.errors.NotFound:
            pass

    def logs(self, container_id: str, tail: int | str = "all", since: float | None = None,
             follow: bool = False, timestamps: bool = False):
        kwargs = {"stdout": True, "stderr": True, "tail": tail, "follow": follow,
                  "stream": follow, "timestamps": timestamps}
        if since is not None:
            kwargs["since"] = int(since)
        return self.api.logs(container_id, **kwargs)

    def last_lines(self, container_id: str, n: int = 15) -> list[str]:
        try:
            raw = self.api.logs(container_id, stdout=True, stderr=True, tail=n)
        except docker.errors.APIError:
            return []
        return raw.decode(errors="replace").rstrip().splitlines()

    # --- events -----------------------------------------------------------------------

    def events(self, stack: str, since: float | None = None) -> Iterator[ContainerEvent]:
        """The stack's container events. The iterator ends when the stream drops (docker-py
        turns socket errors into StopIteration): the caller reconnects with `since=`."""
        stream = self.api.events(
            since=since, decode=True,
            filters={"type": "container", "label": [f"{LABEL_STACK}={stack}"]})
        try:
            for ev in stream:
                attrs = (ev.get("Actor") or {}).get("Attributes") or {}
                code = attrs.get("exitCode")
                yield ContainerEvent(
                    action=ev.get("Action") or ev.get("status", ""),
                    container_id=ev.get("id") or (ev.get("Actor") or {}).get("ID", ""),
                    instance=attrs.get(LABEL_INSTANCE, ""),
                    exit_code=int(code) if code is not None else None,
                    time_nano=int(ev.get("timeNano") or time.time_ns()))
        finally:
            stream.close()

    def close(self) -> None:
        self.api.close()


def docker_time(value: str) -> float | None:
    """Seconds since the epoch from Docker's RFC 3339 nanosecond timestamps."""
    if not value or value.startswith("0001-"):
        return None
    head, _, frac = value.rstrip("Z").partition(".")
    stamp = _dt.datetime.fromisoformat(head).replace(tzinfo=_dt.timezone.utc).timestamp()
    return stamp + (float("0." + frac[:6]) if frac else 0.0)
