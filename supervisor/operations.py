"""What an operator can ask of a running stack, as functions run in the loop thread.

Each function takes the `Supervisor` and returns plain data for the control API's envelope, or
raises an `OperationError` with a stable code. They reuse the loop's own ordered start and stop,
so a restart or reload follows the same runbook as the first start.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

from .containers import SYNAPSE_UID, layout_of, specs
from .errors import ConfigError, SupervisorError
from .lifecycle import Tier
from .loop import Supervisor, local_images
from .prepare import prepare
from .stack import CLIENT_PORT, MAIN, METRICS_PORT
from .state import Record, State
from .statedir import materialize


class OperationError(SupervisorError):
    def __init__(self, code: str, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code


def container_row(sup: Supervisor, rec: Record) -> dict:
    now = time.monotonic()
    spec = sup.specs.get(rec.instance)
    uptime = now - rec.started_at if rec.started_at and rec.state in (
        State.READY, State.STARTING) else None
    return {
        "instance": rec.instance,
        "role": rec.role,
        "state": rec.state.value,
        "ready": rec.state is State.READY,
        "uptime_seconds": round(uptime, 1) if uptime is not None else None,
        "restarts": rec.restarts,
        "attempts": rec.attempts,
        "last_exit_code": rec.last_exit_code,
        "last_exit_reason": rec.last_exit_reason,
        "problem": rec.extra.get("problem"),  # why a running container is failed, with the fix
        "backoff_seconds": round(rec.retry_at - now, 1) if rec.retry_at else None,
        "time_to_ready_seconds": round(rec.last_time_to_ready, 3)
        if rec.last_time_to_ready is not None else None,
        "container_id": (rec.container_id or "")[:12] or None,
        "image": spec.image if spec else None,
    }


def status(sup: Supervisor) -> dict:
    recs = list(sup.records.values())
    return {
        "stack": sup.stack.name,
        "server_name": sup.stack.server_name,
        "state": sup.phase,
        "ready": sum(r.state is State.READY for r in recs),
        "total": len(recs),
        "daemon_uptime_seconds": round(time.monotonic() - sup.started_monotonic, 1),
        "containers": [container_row(sup, r) for r in recs],
    }


def start(sup: Supervisor) -> dict:
    sup.stop_requested = False
    sup.start_stack()
    return status(sup)


def stop(sup: Supervisor) -> dict:
    sup.stop_stack()
    return status(sup)


# Instances Synapse wants restarted together, by worker type, and why.
TOGETHER = {
    "federation_sender": "Synapse shards outbound federation over all senders; restart them "
                         "together",
}


def restart(sup: Supervisor, instances: list[str]) -> dict:
    if not instances:
        tiers = [t for t in sup.prepared.plan.stop if t.name != "infrastructure"]
        sup.stop_stack(tiers)
        sup.start_stack()
        return status(sup)
    unknown = [i for i in instances if i not in sup.records]
    if unknown:
        raise OperationError("unknown_instance", f"unknown instance {unknown[0]!r} (fix: use one "
                             f"of {', '.join(sup.records)})", exit_code=2)
    chosen = set(instances)
    for wtype, why in TOGETHER.items():
        group = {w.name for w in sup.stack.of_type(wtype)}
        if chosen & group and not group <= chosen:
            raise OperationError("restart_refused", f"{why}: restart "
                                 f"{' '.join(sorted(group))}", exit_code=2)
    tiers = [Tier(t.name, tuple(m for m in t.members if m in chosen))
             for t in sup.prepared.plan.stop]
    sup.proxy.take_out(chosen)
    sup.stop_stack([t for t in tiers if t.members])
    sup.start_stack()
    return status(sup)


def reload(sup: Supervisor) -> dict:
    """Re-read the stack file; stop what is removed or changed (in stop order), recreate
    what changed, create what is new, then start in order. An invalid file changes nothing."""
    try:
        new = prepare(sup.stack.stack_file)
    except SupervisorError as err:
        raise OperationError("invalid_stack", str(err), exit_code=2) from None
    if new.stack.name != sup.stack.name:
        raise OperationError("invalid_stack", f"{sup.stack.stack_file}: name: a running stack "
                             "cannot be renamed (fix: stop it and start the new name)", 2)
    try:
        new_specs = specs(new, local_images(sup.engine, new.stack))
    except ConfigError as err:  # an image it names is missing: nothing was stopped
        raise OperationError("invalid_stack", str(err), exit_code=2) from None
    old_specs = sup.specs
    changes = []
    for inst in new_specs:
        if inst not in old_specs:
            changes.append({"action": "add", "instance": inst, "reason": "new in the stack file"})
        elif new_specs[inst].config_hash != old_specs[inst].config_hash:
            changes.append({"action": "recreate", "instance": inst, "reason": "config changed"})
    for inst in old_specs:
        if inst not in new_specs:
            changes.append({"action": "remove", "instance": inst,
                            "reason": "no longer in the stack file"})
    if not changes:
        sup.adopt_prepared(new, new_specs)
        return {"changes": [], "status": status(sup)}
    affected = {c["instance"] for c in changes if c["action"] != "add"}
    sup.proxy.take_out(affected)
    down = [Tier(t.name, tuple(m for m in t.members if m in affected))
            for t in sup.prepared.plan.stop]
    sup.stop_stack([t for t in down if t.members])
    for inst in affected:
        rec = sup.records[inst]
        if rec.container_id:
            sup.engine.remove(rec.container_id)
        rec.container_id = None
    for inst in [c["instance"] for c in changes if c["action"] == "remove"]:
        del sup.records[inst]
    sup.adopt_prepared(new, new_specs)
    materialize(new)
    layout = layout_of(new.stack)
    for inst, spec in new_specs.items():
        if inst not in sup.records:
            sup.records[inst] = Record(instance=inst, role=spec.role,
                                       state_since=time.monotonic())
        rec = sup.records[inst]
        if rec.container_id is None:
            if spec.synapse:
                sup.notify.add(inst, layout.notify_dir(inst), uid=SYNAPSE_UID)
            rec.container_id = sup.engine.create(spec)
    for change in changes:
        sup.log.info("reload", **change)
    sup.start_stack()
    return {"changes": changes, "status": status(sup)}


def metrics_targets(sup: Supervisor) -> list[dict]:
    """Prometheus http_sd / file_sd target groups: every Synapse process's metrics endpoint.
    The addresses are on the stack network, reachable from the host and the network only."""
    groups = []
    for inst, spec in sup.specs.items():
        rec = sup.records.get(inst)
        if not spec.synapse or rec is None or not rec.ip:
            continue
        groups.append({"targets": [f"{rec.ip}:{METRICS_PORT}"],
                       "labels": {"instance": inst, "role": spec.role,
                                  "stack": sup.stack.name, "job": "synapse",
                                  "__metrics_path__": "/_synapse/metrics"}})
    return groups


def register(sup: Supervisor, user: str, password: str, admin: bool) -> dict:
    """Create a user through main's shared-secret registration API."""
    hs = sup.prepared.inputs.homeserver
    secret = hs.get("registration_shared_secret")
    path = hs.get("registration_shared_secret_path")
    if not secret and path:
        try:
            with open(path) as f:
                secret = f.read().strip()
        except OSError:
            secret = None
    if not secret:
        raise OperationError("no_shared_secret", f"{sup.stack.homeserver_file}: "
                             "registration_shared_secret: not set (fix: add one; synapsectl init "
                             "writes it)", exit_code=2)
    main = sup.records.get(MAIN)
    if main is None or main.state is not State.READY or not main.ip:
        raise OperationError("not_ready", "main is not ready (fix: synapsectl start, then retry)")
    base = f"http://{main.ip}:{CLIENT_PORT}/_synapse/admin/v1/register"
    try:
        with urllib.request.urlopen(base, timeout=10) as resp:
            nonce = json.load(resp)["nonce"]
        mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), user.encode(), password.encode(),
                                 b"admin" if admin else b"notadmin"]))
        body = json.dumps({"nonce": nonce, "username": user, "password": password,
                           "admin": admin, "mac": mac.hexdigest()}).encode()
        req = urllib.request.Request(base, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            result = json.load(resp)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise OperationError("register_failed", f"Synapse refused: {detail}") from None
    except OSError as err:
        raise OperationError("register_failed", f"cannot reach main: {err}") from None
    return {"user_id": result.get("user_id"), "admin": admin}
