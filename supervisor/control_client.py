"""synapsectl's daemon verbs: a thin HTTP client of the control socket (docs/control-api.md).

The socket path comes from `--socket`, $SYNAPSE_CONTROL_SOCKET, or the stack file's
`daemon.control_socket`. "Daemon not running" (no socket, refused) and "no permission" exit 3;
a refused or failed command exits with the code the daemon gives (2 bad input, 1 failed).
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import DaemonNotRunning, OneLineArgumentParser, SupervisorError


class CommandFailed(SupervisorError):
    def __init__(self, message: str, code: str, exit_code: int) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def socket_path(args: argparse.Namespace) -> str:
    if getattr(args, "socket", None):
        return args.socket
    if os.environ.get("SYNAPSE_CONTROL_SOCKET"):
        return os.environ["SYNAPSE_CONTROL_SOCKET"]
    from .stackfile import load
    stack_file = Path(args.stack or os.environ.get("SYNAPSE_STACK") or "stack.yaml")
    return str(load(stack_file).daemon.control_socket)


def open_request(path: str, method: str, url: str, body: dict | None = None,
                 timeout: float = 3600.0) -> http.client.HTTPResponse:
    conn = _UnixConnection(path, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, url, body=data, headers=headers)
        return conn.getresponse()
    except FileNotFoundError:
        raise DaemonNotRunning(f"daemon not running: no control socket at {path} (fix: start "
                               "synapse-supervisor, e.g. systemctl start synapse-stack)") from None
    except ConnectionRefusedError:
        raise DaemonNotRunning(f"daemon not running: {path} refuses connections (fix: start "
                               "synapse-supervisor)") from None
    except PermissionError:
        raise DaemonNotRunning(f"permission denied on {path} (fix: run as root or as a member "
                               "of the socket's group)") from None


def request(path: str, method: str, url: str, body: dict | None = None):
    resp = open_request(path, method, url, body)
    raw = resp.read()
    try:
        envelope = json.loads(raw)
    except ValueError:
        raise CommandFailed(f"daemon answered {resp.status} without JSON", "protocol", 1)
    if not envelope.get("ok"):
        err = envelope.get("error") or {}
        raise CommandFailed(err.get("message", "failed"), err.get("code", "failed"),
                            int(err.get("exit_code") or 1))
    return envelope["data"]


def _fmt_seconds(value) -> str:
    if value is None:
        return "-"
    value = int(value)
    return f"{value // 3600}h{value % 3600 // 60:02d}m" if value >= 3600 else \
        f"{value // 60}m{value % 60:02d}s"


def render_status(data: dict) -> str:
    lines = [f"stack {data['stack']} ({data['server_name']}): {data['state']}, "
             f"{data['ready']}/{data['total']} ready"]
    header = ("INSTANCE", "ROLE", "STATE", "READY", "UPTIME", "RESTARTS", "LAST EXIT", "IMAGE")
    rows = [header] + [(
        c["instance"], c["role"], c["state"], "yes" if c["ready"] else "no",
        _fmt_seconds(c["uptime_seconds"]), str(c["restarts"]), c["last_exit_reason"] or "-",
        c["image"] or "-") for c in data["containers"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{c['instance']}: {c['problem']}" for c in data["containers"] if c.get("problem")]
    return "\n".join(lines)


class Progress:
    """While a long command runs: poll status and print each container's state changes."""

    def __init__(self, path: str, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.enabled:
            self.thread.join(timeout=2)

    def _run(self) -> None:
        seen: dict[str, str] = {}
        while not self.stop.wait(0.5):
            try:
                data = request(self.path, "GET", "/v1/status")
            except SupervisorError:
                continue
            for c in data["containers"]:
                if seen.get(c["instance"]) != c["state"]:
                    if c["instance"] in seen:
                        print(f"  {c['instance']}: {c['state']}", file=sys.stderr, flush=True)
                    seen[c["instance"]] = c["state"]


def _out(args, data, human: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else human)


def cmd_status(args) -> int:
    data = request(socket_path(args), "GET", "/v1/status")
    _out(args, data, render_status(data))
    return 0 if data["state"] in ("ready", "starting") else 1


def _mutating(verb: str, url: str, body_of=lambda a: None):
    def run(args) -> int:
        path = socket_path(args)
        with Progress(path, enabled=not args.json):
            data = request(path, "POST", url, body_of(args))
        status = data.get("status", data)
        human = render_status(status)
        if verb == "reload":
            changes = data.get("changes") or []
            human = "\n".join([f"{c['action']:9} {c['instance']}: {c['reason']}" for c in changes]
                              or ["no changes"]) + "\n" + human
        _out(args, data, human)
        return 0
    return run


def cmd_logs(args) -> int:
    if args.tail != "all" and not str(args.tail).isdigit():
        raise CommandFailed(f"--tail: {args.tail!r} is not a number of lines (fix: e.g. "
                            "--tail 100, or --tail all)", "bad_request", 2)
    path = socket_path(args)
    query = [f"tail={args.tail}"]
    if args.instances:
        query.append("instance=" + ",".join(args.instances))
    if args.follow:
        query.append("follow=1")
    if args.since:
        query.append(f"since={parse_since(args.since)}")
    resp = open_request(path, "GET", "/v1/logs?" + "&".join(query))
    if resp.status != 200:
        envelope = json.loads(resp.read())
        err = envelope.get("error") or {}
        raise CommandFailed(err.get("message", "failed"), err.get("code", "failed"),
                            int(err.get("exit_code") or 1))
    try:
        while True:
            line = resp.readline()
            if not line:
                break
            sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def parse_since(value: str) -> float:
    """'10m', '2h', '30s' ago, or epoch seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    try:
        return float(value)
    except ValueError:
        raise CommandFailed(f"--since: {value!r} is neither a duration (10m) nor epoch seconds "
                            "(fix: e.g. --since 10m)", "bad_request", 2) from None


def cmd_register(args) -> int:
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as err:
            raise CommandFailed(f"{args.password_file}: cannot read: {err.strerror} (fix: check "
                                "the path)", "bad_request", 2) from None
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
    else:
        password = sys.stdin.readline().strip()
    data = request(socket_path(args), "POST", "/v1/register",
                   {"user": args.user, "password": password, "admin": args.admin})
    _out(args, data, f"registered {data['user_id']}" + (" (admin)" if data["admin"] else ""))
    return 0


def cmd_targets(args) -> int:
    data = request(socket_path(args), "GET", "/v1/targets")
    print(json.dumps(data, indent=2))
    return 0


COMPLETION = """\
# bash completion for synapsectl: source <(synapsectl completion)
_synapsectl() {
  local cur=${COMP_WORDS[COMP_CWORD]}
  if [ "$COMP_CWORD" -eq 1 ]; then
    COMPREPLY=($(compgen -W "%(verbs)s" -- "$cur"))
  elif [[ "$cur" == -* ]]; then
    COMPREPLY=($(compgen -W "--json --stack --socket --follow --tail --since --admin --password-file --live --show-config --confirm --keep-volumes --server-name --isolated" -- "$cur"))
  else
    case ${COMP_WORDS[1]} in
      restart|logs)
        COMPREPLY=($(compgen -W "$(synapsectl status --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(c["instance"] for c in json.load(sys.stdin)["containers"]))' 2>/dev/null)" -- "$cur"));;
      init|validate|plan) COMPREPLY=($(compgen -f -- "$cur"));;
    esac
  fi
}
complete -F _synapsectl synapsectl
"""


def add_verbs(sub, common: argparse.ArgumentParser) -> None:
    daemon = OneLineArgumentParser(add_help=False, parents=[common])
    daemon.add_argument("--socket", help="control socket (default: from the stack file)")

    p = sub.add_parser("status", parents=[daemon], help="the stack and each container")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("start", parents=[daemon], help="start the stack's containers in order")
    p.set_defaults(func=_mutating("start", "/v1/start"))
    p = sub.add_parser("stop", parents=[daemon],
                       help="stop the stack's containers in reverse order (daemon stays)")
    p.set_defaults(func=_mutating("stop", "/v1/stop"))
    p = sub.add_parser("restart", parents=[daemon],
                       help="restart the whole stack in order, or only INSTANCEs")
    p.add_argument("instances", nargs="*", metavar="INSTANCE")
    p.set_defaults(func=_mutating("restart", "/v1/restart",
                                  lambda a: {"instances": a.instances}))
    p = sub.add_parser("reload", parents=[daemon],
                       help="re-read the stack file and apply the difference in order")
    p.set_defaults(func=_mutating("reload", "/v1/reload"))
    p = sub.add_parser("logs", parents=[daemon], help="containers' output, by instance")
    p.add_argument("instances", nargs="*", metavar="INSTANCE")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--since", help="e.g. 10m, 2h, or epoch seconds")
    p.add_argument("--tail", default="all", help="lines per container (default all)")
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("register", parents=[daemon], help="create a user on the running stack")
    p.add_argument("user")
    p.add_argument("--admin", action="store_true")
    p.add_argument("--password-file", help="read the password from this file (else prompt/stdin)")
    p.set_defaults(func=cmd_register)
    p = sub.add_parser("targets", parents=[daemon],
                       help="Prometheus http_sd targets of every Synapse process")
    p.set_defaults(func=cmd_targets)
    p = sub.add_parser("completion", help="print a bash completion script")
    p.set_defaults(func=lambda a: print(COMPLETION % {"verbs": " ".join(sorted(sub.choices))})
                   or 0)
