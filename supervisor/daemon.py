"""`synapse-supervisor --stack FILE`: the daemon, in the foreground (what systemd runs).

The runbook, in order:
  1. validate the stack exactly as `synapsectl validate` does; on any error touch nothing;
  2. check the host: one daemon per stack, published ports free;
  3. write the state directory, create network and volumes, adopt or create containers;
  4. start tier by tier (PostgreSQL and Redis, main, all workers in parallel), each member
     waited for until really ready; report the stack ready (log, sd_notify READY=1);
  5. watch Docker's events and restart what dies, dependency-first, with backoff;
  6. on SIGTERM/SIGINT stop in reverse order (a second signal: quicker, still ordered).
Exit codes: 0 stopped cleanly, 1 failure, 2 bad input, 3 Docker unreachable, 4 start failed.
"""

from __future__ import annotations

import json
import os
import sys
import time

from . import __version__, logs, sd_notify
from .docker_adapter import DockerEngine
from .engine import Engine
from .errors import (ConfigError, OneLineArgumentParser, StartFailed, SupervisorError,
                     exit_code_for)
from .control import ControlServer
from .loop import Supervisor, install_signal_handlers
from .metrics import Metrics
from .prepare import prepare
from .preflight import check_ports, lock_stack
from .state import State


def status_line(sup: Supervisor) -> str:
    recs = list(sup.records.values())
    ready = sum(r.state is State.READY for r in recs)
    trouble = [f"{r.instance} {r.state.value}" for r in recs
               if r.state in (State.BACKOFF, State.FAILED, State.WAITING)]
    return f"{sup.phase}: {ready}/{len(recs)} ready" + (f"; {', '.join(trouble)}"
                                                       if trouble else "")


def write_targets(sup: Supervisor, path) -> None:
    """Prometheus file_sd: every Synapse process's metrics endpoint, with labels."""
    from .operations import metrics_targets
    from .statedir import write_private
    try:
        write_private(path, json.dumps(metrics_targets(sup), indent=1), None, mode=0o644)
    except OSError:
        pass


def reload_from_signal(sup: Supervisor, control, log) -> None:
    """SIGHUP (systemctl reload): re-read the stack file and apply it, telling systemd."""
    from .operations import reload
    sd_notify.reloading()
    try:
        result = control.run_here("reload (SIGHUP)", reload)
        log.info("reloaded", changes=len(result["changes"]))
    except SupervisorError as err:  # e.g. main did not come back: keep supervising
        log.error("reload_failed", error=str(err))
    finally:
        sd_notify.ready(status_line(sup))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="synapse-supervisor",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default=os.environ.get("SYNAPSE_STACK", "stack.yaml"))
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    logs.configure(args.log_level, json={"auto": None, "json": True,
                                         "console": False}[args.log_format])
    try:
        prepared = prepare(args.stack)
    except SupervisorError as err:
        print(f"synapse-supervisor: {err}", file=sys.stderr)
        return exit_code_for(err)
    log = logs.get(prepared.stack.name)
    for warning in prepared.warnings:
        log.warning("lint", message=warning)
    try:
        lock_fd = lock_stack(prepared.stack)
        engine = DockerEngine()
        running = {c.instance for c in engine.list_stack(prepared.stack.name) if c.running}
        check_ports(prepared.stack, running)
    except SupervisorError as err:
        print(f"synapse-supervisor: {err}", file=sys.stderr)
        return exit_code_for(err)
    return run(prepared, engine, log, lock_fd)


def run(prepared, engine: Engine, log, lock_fd: int) -> int:
    last_status = [""]

    targets_file = prepared.stack.state_dir / "prometheus-targets.json"

    def on_change(sup: Supervisor) -> None:
        if not sup.records:
            return  # refused before anything was set up: write nothing
        line = status_line(sup)
        if line != last_status[0]:
            last_status[0] = line
            sd_notify.status(line)
            write_targets(sup, targets_file)

    sup = Supervisor(prepared, engine, log, on_change=on_change)
    install_signal_handlers(sup)
    watchdog = sd_notify.watchdog_interval()
    last_ping = [0.0]

    def on_tick() -> None:  # called by the loop itself: a stuck loop stops pinging
        if watchdog and time.monotonic() - last_ping[0] >= watchdog:
            sd_notify.watchdog()
            last_ping[0] = time.monotonic()

    sup.on_tick = on_tick
    metrics = Metrics(sup)
    sup.on_ready = lambda rec: metrics.observe_ready(rec.role, rec.last_time_to_ready or 0.0)
    control = None
    log.info("daemon_starting", version=__version__, stack_file=str(prepared.stack.stack_file),
             pid=os.getpid())
    code = 0
    try:
        if prepared.stack.daemon.metrics_address:
            metrics.serve(prepared.stack.daemon.metrics_address)
        control = ControlServer(sup, prepared.stack.daemon.control_socket,
                                prepared.stack.daemon.control_group)
        control.start()
        log.info("control_listening", socket=str(prepared.stack.daemon.control_socket),
                 metrics=prepared.stack.daemon.metrics_address)
        with control.busy:
            control.busy_with = "the first start"
            sup.prepare_docker()
            sup.start_stack()
            control.busy_with = None
        if not sup.stop_requested:
            sd_notify.ready(status_line(sup))
        while not sup.stop_requested:
            sup._pump(timeout=1.0)
            if sup.reload_requested:
                sup.reload_requested = False
                reload_from_signal(sup, control, log)
    except StartFailed as err:
        log.error("start_failed", error=str(err))
        print(f"synapse-supervisor: {err}", file=sys.stderr)
        code = err.exit_code
    except ConfigError as err:
        print(f"synapse-supervisor: {err}", file=sys.stderr)
        code = err.exit_code
    except SupervisorError as err:
        log.error("failed", error=str(err))
        print(f"synapse-supervisor: {err}", file=sys.stderr)
        code = err.exit_code
    finally:
        sd_notify.stopping()
        if control is not None:
            control.closing = True  # no state-changing request runs inside the final stop
        try:
            sup.stop_stack()
        finally:
            if control is not None:
                control.close()
            metrics.close()
            sup.close()
            os.close(lock_fd)
    log.info("daemon_exit", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
