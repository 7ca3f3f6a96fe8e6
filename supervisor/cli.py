"""`synapsectl`: the operator's command line.

Offline verbs (`init`, `validate`, `plan`, `schema`) work without a daemon and without Docker.
The others are thin clients of the daemon's control API (see `control_client`). Every verb takes
`--json`; errors are one line on stderr, with exit codes from `errors.exit_code_for`:
0 ok, 1 command failed, 2 bad input, 3 daemon or Docker not reachable, 4 start failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import catalogue, control_client, schema
from .errors import OneLineArgumentParser, SupervisorError, UsageError, exit_code_for


def _stack_path(args: argparse.Namespace) -> Path:
    return Path(args.stack or os.environ.get("SYNAPSE_STACK") or "stack.yaml")


def _emit(args: argparse.Namespace, data: dict, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human)


def cmd_init(args: argparse.Namespace) -> int:
    from .init import init_stack
    stack_file = init_stack(Path(args.directory), args.server_name, name=args.name,
                            isolated=args.isolated, client_port=args.client_port,
                            federation_port=args.federation_port,
                            metrics_port=args.metrics_port)
    _emit(args, {"stack_file": str(stack_file)},
          f"wrote {stack_file}\nnext: synapsectl validate --stack {stack_file}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .prepare import prepare  # imported per verb: daemon verbs start faster without it
    prepared = prepare(_stack_path(args))
    stack = prepared.stack
    if not args.json:
        for line in prepared.warnings + tuple(prepared.rendered.notes):
            print(f"note: {line}", file=sys.stderr)
    summary = (f"{stack.stack_file}: ok: {len(stack.instances)} Synapse processes "
               f"(main + {len(stack.workers)} workers)"
               + (f", managed {' and '.join(stack.managed_services)}"
                  if stack.managed_services else ""))
    _emit(args, {"ok": True, "stack": stack.name, "instances": [i.name for i in stack.instances],
                 "warnings": list(prepared.warnings), "notes": prepared.rendered.notes}, summary)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .prepare import prepare
    prepared = prepare(_stack_path(args))
    plan = prepared.plan
    roles = {i.name: i.type for i in prepared.stack.instances}
    if args.show_config:
        files = prepared.rendered.config_files(args.show_config)
        if args.show_config not in roles:
            raise UsageError(f"plan: unknown instance {args.show_config!r} "
                             f"(fix: use one of {', '.join(roles)})")
        import yaml
        for name in files[:2]:
            print(f"# /conf/{name}")
            print(yaml.safe_dump(prepared.rendered.files[name], sort_keys=False))
        return 0
    data = {
        "stack": prepared.stack.name,
        "start": [{"tier": t.name, "members": list(t.members)} for t in plan.start],
        "stop": [{"tier": t.name, "members": list(t.members)} for t in plan.stop],
        "roles": roles,
        "notes": prepared.rendered.notes,
    }
    human = plan.describe()
    if prepared.rendered.notes:
        human += "\nnotes:\n" + "\n".join(f"  {n}" for n in prepared.rendered.notes)
    _emit(args, data, human)
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    from . import proxy_config
    from .stackfile import load
    stack = load(_stack_path(args))
    down: set[str] = set()
    if args.live:
        data = control_client.request(control_client.socket_path(args), "GET", "/v1/status")
        names = {i.name for i in stack.instances}
        down = {c["instance"] for c in data["containers"]
                if c["instance"] in names and not c["ready"]}
    if not stack.has_proxy:
        print("note: proxy.mode is none: main receives every request", file=sys.stderr)
    _emit(args, {"down": sorted(down), "routes": proxy_config.routes_table(stack, down)},
          proxy_config.describe(stack, down))
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    from .destroy import confirm, destroy, refuse_if_running
    from .docker_adapter import DockerEngine
    from .stackfile import load
    stack = load(_stack_path(args))
    refuse_if_running(str(stack.daemon.control_socket))
    confirm(stack, args.confirm, sys.stdin.isatty(), args.keep_volumes)
    result = destroy(stack, DockerEngine(), args.keep_volumes)
    _emit(args, result, f"removed {len(result['containers'])} containers, networks: "
          f"{', '.join(result['networks']) or '-'}, volumes: "
          f"{', '.join(result['volumes']) or 'kept'}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(schema.SCHEMA, indent=2))
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    rows = {name: {"summary": t.summary, "singleton": t.singleton,
                   "legacy_names": list(t.legacy_names), "routes": list(t.routes)}
            for name, t in catalogue.WORKER_TYPES.items()}
    human = "\n".join(f"{name:20} {'(one only) ' if t.singleton else ''}{t.summary}"
                      for name, t in catalogue.WORKER_TYPES.items())
    _emit(args, rows, human)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = OneLineArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--stack", help="stack file (default: $SYNAPSE_STACK or ./stack.yaml)")
    parser = OneLineArgumentParser(prog="synapsectl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("init", parents=[common], help="write a new stack directory")
    p.add_argument("directory")
    p.add_argument("--server-name", required=True)
    p.add_argument("--name", help="stack name (default: from the server name)")
    p.add_argument("--isolated", action="store_true",
                   help="no trusted key servers (offline machines, tests)")
    p.add_argument("--client-port", type=int, default=8008)
    p.add_argument("--federation-port", type=int, default=8448)
    p.add_argument("--metrics-port", type=int, default=9400)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("validate", parents=[common], help="check a stack without starting it")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("plan", parents=[common], help="print the start and stop order")
    p.add_argument("--show-config", metavar="INSTANCE",
                   help="print the Synapse config rendered for one instance")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("routes", parents=[common],
                       help="which path goes to which instances through the proxy")
    p.add_argument("--live", action="store_true",
                   help="ask the daemon which instances are down and show the fallbacks")
    p.add_argument("--socket", help="control socket, with --live")
    p.set_defaults(func=cmd_routes)
    p = sub.add_parser("destroy", parents=[common],
                       help="remove the stack's containers, network and (confirmed) its data")
    p.add_argument("--confirm", metavar="STACK_NAME", help="the stack's name, to delete data")
    p.add_argument("--keep-volumes", action="store_true",
                   help="keep the database and media volumes")
    p.set_defaults(func=cmd_destroy)
    p = sub.add_parser("schema", parents=[common], help="print the stack file's JSON Schema")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("workers", parents=[common], help="list the worker types")
    p.set_defaults(func=cmd_workers)
    control_client.add_verbs(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SupervisorError as err:
        print(f"synapsectl: {err}", file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `synapsectl status | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
