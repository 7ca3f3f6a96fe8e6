"""The reverse proxy's routing, as pure functions: which request goes to which Synapse process.

The stack runs one nginx container (instance `proxy`, image `synapse-supervisor/nginx:1`, after
the workers tier) in front of main and the workers. This module turns a `Stack` and the worker
catalogue into:

* the routing table: for each of the proxy's two servers (client API on 8008, federation API on
  8448), the ordered list of URL regexes with the worker type that serves them, the instances
  behind it, how requests are pinned (sticky mode) and what happens when every instance of the
  type is down; anything unmatched goes to main (`routing_table`, `routes_table`, `describe`);
* the answer for one request, from that same ordered table (`route_for`, `resolve`), so tests
  and `synapsectl routes` see exactly what nginx will do;
* the nginx config text (`render_nginx`), regenerated whenever the stack or the set of down
  instances changes; the daemon writes it into the directory mounted at /etc/nginx/synapse and
  sends SIGHUP.

Order matters because nginx uses the first matching regex location: routes only one kind of
process can serve (media) come first, then stream-writer endpoints (a writer can serve any
generic-worker endpoint, but some writer endpoints fail elsewhere: typing answers 500), then
the narrow worker routes, and client_reader's broad ones last. See docs/routing.md.

Pure: no I/O, no Docker, no clock.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

from . import catalogue
from .catalogue import WorkerType
from .stack import CLIENT_PORT, FEDERATION_PORT, MAIN, Stack

# --- the container contract of synapse-supervisor/nginx:1 (image/nginx/Dockerfile) ----------

PROXY_INSTANCE = "proxy"
PROXY_ROLE = "proxy"
PROXY_IMAGE = "synapse-supervisor/nginx:1"
PROXY_UID = 101
CONFIG_DIR = "/etc/nginx/synapse"  # bind-mount the host DIRECTORY here, read-only
CONFIG_FILE = "nginx.conf"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
STOP_SIGNAL = "SIGQUIT"  # graceful: in-flight requests finish (bounded by shutdown_timeout)
RELOAD_SIGNAL = "SIGHUP"  # re-read the config; a bad config is refused, the old one keeps serving
COMMAND = ("nginx", "-c", CONFIG_PATH, "-g", "daemon off;")  # the image's CMD; pass it explicitly
TEST_COMMAND = ("nginx", "-t", "-c", CONFIG_PATH)  # docker exec: validate before SIGHUP
CONTAINER_USER = f"{PROXY_UID}:{PROXY_UID}"
TMPFS = {"/tmp": "rw,noexec,nosuid,size=64m"}  # pid file and temp paths (read-only root fs)
HEALTH_PATH = "/health"  # on both ports: 200 "OK", or 503 "down: a, b" (the proxy is fine)

# The proxy's two servers.
CLIENT = "client"
FEDERATION = "federation"
SERVERS = (CLIENT, FEDERATION)
SERVER_PORTS = {CLIENT: CLIENT_PORT, FEDERATION: FEDERATION_PORT}

# What a route's target can be besides a worker type or main: the proxy answers itself.
UNAVAILABLE = "503"

READ_METHODS = ("GET", "HEAD")

# Route precedence by worker type (first match wins). Exclusive routes first (only media
# workers serve media once they exist: main then has enable_media_repo false), then stream
# writers (the writer must get its endpoints; sending it anything else is harmless: it is a
# generic worker and forwards), then narrow routes, then client_reader's broad ones.
PRECEDENCE = (
    "media_repository",
    "typing", "to_device", "account_data", "receipts", "presence", "push_rules", "device_lists",
    "user_dir",
    "sync",
    "event_creator",
    "client_reader",
    "federation_reader",
)

# Sticky modes: how requests are pinned to one instance when a type has several.
USER = "user"  # hash on the user: localpart of a syt_ access token (docs/workers.md)
SOURCE_IP = "source-ip"  # hash on the client address ($remote_addr)
ROOM = "room"  # hash on the room ID in the path

# Routes pinned per room: "every request for a room must reach the same instance" (pagination
# of /messages; synapse-workers.md §11 "Sticky routing").
ROOM_STICKY_ROUTES = frozenset({catalogue.A + r"rooms/.*/messages$"})

# On the federation server, legacy (unauthenticated) media downloads from other servers arrive
# as /_matrix/media/...; main's 8448 listener has only the federation resource, so without a
# media worker they go to main's client listener, which serves media.
LEGACY_MEDIA_ROUTE = r"^/_matrix/media/"

# Fallback when every instance of a type is down.
FALLBACK_MAIN = "main"  # main serves these routes too
FALLBACK_READS = "reads"  # GET/HEAD go to main; writes get 503 (the stream's writer is down)
FALLBACK_NONE = "none"  # 503: nobody else can serve them


@dataclass(frozen=True)
class ProxySettings:
    """Tunables of the rendered config that are not routing."""

    client_max_body_size: str = "50M"  # match homeserver.yaml's max_upload_size
    read_timeout: int = 90  # seconds, every route
    sync_read_timeout: int = 600  # seconds, sync routes: long-polls and slow initial syncs
    connect_timeout: int = 5
    keepalive: int = 16  # idle HTTP/1.1 connections kept per upstream and nginx worker
    retry_after: int = 5  # Retry-After of the proxy's own 503s
    shutdown_timeout: int = 30  # worker_shutdown_timeout: bound of a graceful stop or reload
    worker_processes: str = "auto"
    worker_connections: int = 4096
    # /_synapse/admin on the client server: None = proxied like any path (it needs an admin
    # access token); () = refused (403) for everyone; ("10.0.0.0/8", ...) = only these sources.
    admin_allow: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9]+[kKmMgG]?", self.client_max_body_size):
            raise ValueError(f"client_max_body_size {self.client_max_body_size!r}: use a size "
                             "such as 50M")
        for source in self.admin_allow or ():
            if not re.fullmatch(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?", source):
                raise ValueError(f"admin_allow {source!r}: use an address or CIDR")


DEFAULT_SETTINGS = ProxySettings()


def settings_for(stack: Stack) -> ProxySettings:
    """Defaults, with the stack's own proxy options where the stack model has them
    (`stack.proxy.client_max_body_size`)."""
    body = getattr(getattr(stack, "proxy", None), "client_max_body_size", None)
    return ProxySettings(client_max_body_size=body) if body else DEFAULT_SETTINGS


@dataclass(frozen=True)
class Target:
    """Who answers: a process type through an nginx upstream, or the proxy itself."""

    name: str  # worker type, "main", or a status code the proxy returns ("503")
    upstream: str | None = None  # nginx upstream name; None when the proxy answers
    instances: tuple[str, ...] = ()  # the live instances behind the upstream
    reason: str = ""  # why the proxy answers itself
    unavailable: str = ""  # what is down when the proxy answers 503 (a type or "main")

    @property
    def proxied(self) -> bool:
        return self.upstream is not None


@dataclass(frozen=True)
class Route:
    """One regex location of one server, in match order."""

    server: str  # client | federation
    pattern: str  # the regex, matched case-insensitively against the decoded path
    worker_type: str  # the type that serves it when up ("main" for the proxy's own additions)
    declared: tuple[str, ...]  # every instance of that type in the stack
    sticky: str | None  # user | source-ip | room | None (round robin)
    fallback: str  # main | reads | none: what happens when every declared instance is down
    target: Target  # who serves it now (for every method, unless `writes` says otherwise)
    writes: Target | None = None  # who serves methods other than GET/HEAD, when different
    long_poll: bool = False  # sync routes: long proxy_read_timeout

    def target_for(self, method: str) -> Target:
        if self.writes is not None and method.upper() not in READ_METHODS:
            return self.writes
        return self.target


@dataclass(frozen=True)
class Upstream:
    name: str
    servers: tuple[str, ...]  # "host:port", host = the instance's network alias
    sticky: str | None = None  # hash key when there are several servers


@dataclass(frozen=True)
class RoutingTable:
    stack: str
    down: tuple[str, ...]  # sorted, as given
    routes: tuple[Route, ...]  # both servers, each in match order
    defaults: dict[str, Target]  # server -> target of everything unmatched
    upstreams: tuple[Upstream, ...]

    def of(self, server: str) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.server == server)


# --- building the table ---------------------------------------------------------------------


def _servers_of(pattern: str) -> tuple[str, ...]:
    """Which of the proxy's servers a route belongs to, from its literal path prefix."""
    path = pattern.lstrip("^")
    if path.startswith(("/_matrix/federation/", "/_matrix/key/")):
        return (FEDERATION,)
    if path.startswith("/_matrix/media/"):
        return (CLIENT, FEDERATION)  # remote servers download (legacy) media on 8448
    return (CLIENT,)


def _is_federation_path(pattern: str) -> bool:
    return pattern.lstrip("^").startswith(("/_matrix/federation/", "/_matrix/key/"))


def routed_types() -> tuple[WorkerType, ...]:
    """Catalogue types that serve URLs, in precedence order (unknown ones last)."""
    with_routes = [t for t in catalogue.WORKER_TYPES.values() if t.routes]
    order = {name: n for n, name in enumerate(PRECEDENCE)}
    return tuple(sorted(with_routes, key=lambda t: order.get(t.name, len(order))))


def sticky_mode(wtype: WorkerType, pattern: str) -> str | None:
    if pattern in ROOM_STICKY_ROUTES:
        return ROOM
    if wtype.sticky == SOURCE_IP:  # inbound transactions only: each origin to one process
        return SOURCE_IP if "/send/" in pattern else None
    return wtype.sticky


def fallback_mode(wtype: WorkerType) -> str:
    if wtype.media:
        return FALLBACK_NONE
    if wtype.stream_writer:
        return FALLBACK_READS
    return FALLBACK_MAIN


def _port_of(wtype: WorkerType) -> int:
    # Federation readers serve federation on 8448 (their 8008 serves only /health); every
    # other routed type serves its routes on 8008 (media workers include federation media).
    return FEDERATION_PORT if wtype.federation_listener else CLIENT_PORT


def _upstream_name(base: str, sticky: str | None, live: int) -> str:
    if sticky is None or live < 2:
        return base
    return f"{base}_by_{sticky.replace('-', '_')}"


def routing_table(stack: Stack, down: frozenset[str] | set[str] = frozenset()) -> RoutingTable:
    """The ordered routing table for a stack with the instances in `down` left out."""
    down = frozenset(down)
    upstreams: dict[str, Upstream] = {}
    main_up = MAIN not in down

    def main_target(federation: bool) -> Target:
        if not main_up:
            return Target(UNAVAILABLE, reason="main is restarting", unavailable=MAIN)
        name = "main_federation" if federation else "main"
        port = FEDERATION_PORT if federation else CLIENT_PORT
        upstreams.setdefault(name, Upstream(name, (f"{stack.main.name}:{port}",)))
        return Target(MAIN, name, (stack.main.name,))

    routes: list[Route] = []
    for server in SERVERS:
        if server == FEDERATION and not stack.of_type("media_repository"):
            routes.append(Route(FEDERATION, LEGACY_MEDIA_ROUTE, MAIN, (stack.main.name,), None,
                                FALLBACK_NONE, main_target(federation=False)))
        for wtype in routed_types():
            declared = tuple(i.name for i in stack.of_type(wtype.name))
            if not declared:
                continue  # not declared: main serves these routes (default location)
            live = tuple(n for n in declared if n not in down)
            port = _port_of(wtype)
            for pattern in wtype.routes:
                if server not in _servers_of(pattern):
                    continue
                sticky = sticky_mode(wtype, pattern)
                fallback = fallback_mode(wtype)
                writes = None
                if live:
                    name = _upstream_name(wtype.name, sticky, len(live))
                    upstreams.setdefault(name, Upstream(
                        name, tuple(f"{n}:{port}" for n in live),
                        sticky if len(live) > 1 else None))
                    target = Target(wtype.name, name, live)
                else:
                    gone = f"{wtype.name} ({', '.join(declared)}) is restarting"
                    if fallback == FALLBACK_NONE:
                        target = Target(UNAVAILABLE, reason=gone, unavailable=wtype.name)
                    else:
                        target = main_target(_is_federation_path(pattern))
                        if fallback == FALLBACK_READS and target.proxied:
                            writes = Target(UNAVAILABLE, reason=gone, unavailable=wtype.name)
                routes.append(Route(server, pattern, wtype.name, declared, sticky, fallback,
                                    target, writes, long_poll=wtype.name == "sync"))
    defaults = {CLIENT: main_target(federation=False), FEDERATION: main_target(federation=True)}
    ordered = sorted(upstreams.values(), key=lambda u: (u.name != "main",
                                                        u.name != "main_federation", u.name))
    return RoutingTable(stack.name, tuple(sorted(down)), tuple(routes), defaults,
                        tuple(ordered))


# --- one request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    server: str
    route: Route | None  # None: the default location (or /health, or a refused path)
    target: Target


def _normalise(path: str) -> str:
    """What nginx matches locations against: the decoded path, no query, slashes merged."""
    path = path.split("?", 1)[0]
    return re.sub(r"/{2,}", "/", unquote(path))


def server_of_path(path: str) -> str:
    """The server a path is meant for (federation and key APIs go to 8448)."""
    return FEDERATION if _is_federation_path(_normalise(path)) else CLIENT


def _matches(pattern: str, path: str) -> bool:
    return re.search(pattern, path, re.IGNORECASE) is not None  # nginx `location ~*`


def resolve(stack: Stack, method: str, path: str, down: frozenset[str] | set[str] = frozenset(),
            server: str | None = None) -> Decision:
    """What the rendered proxy does with one request: same table, same order as nginx."""
    table = routing_table(stack, down)
    server = server or server_of_path(path)
    uri = _normalise(path)
    if uri == HEALTH_PATH:
        return Decision(server, None, _health_target(table))
    if server == CLIENT and uri.startswith("/_synapse/replication"):
        return Decision(server, None, Target("404", reason="replication is never exposed"))
    for route in table.of(server):
        if _matches(route.pattern, uri):
            return Decision(server, route, route.target_for(method))
    return Decision(server, None, table.defaults[server])


def route_for(stack: Stack, method: str, path: str,
              down: frozenset[str] | set[str] = frozenset(), server: str | None = None) -> str:
    """Who answers a request: a worker type ("sync", "client_reader", ...), "main", or the
    status code the proxy answers with itself ("503": every instance that could serve it is
    down; "200"/"503" for /health; "404" for /_synapse/replication). `server` defaults to the
    server the path is meant for: federation for /_matrix/federation and /_matrix/key."""
    return resolve(stack, method, path, down, server).target.name


def _health_target(table: RoutingTable) -> Target:
    if table.down:
        return Target(UNAVAILABLE, reason="down: " + ", ".join(table.down))
    return Target("200", reason="OK")


# --- plain data and text for synapsectl routes -------------------------------------------------


def _target_data(t: Target | None) -> dict | None:
    if t is None:
        return None
    return {"serves": t.name, "upstream": t.upstream, "instances": list(t.instances),
            "reason": t.reason or None}


def routes_table(stack: Stack, down: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """The routing table as JSON-ready rows, match order per server, each server ending with
    its catch-all row (pattern None: everything else)."""
    table = routing_table(stack, down)
    rows: list[dict] = []
    for server in SERVERS:
        for n, route in enumerate(table.of(server), 1):
            rows.append({
                "server": server, "port": SERVER_PORTS[server], "order": n,
                "pattern": route.pattern, "worker_type": route.worker_type,
                "declared": list(route.declared), "sticky": route.sticky,
                "fallback": route.fallback, **_target_data(route.target),
                "writes": _target_data(route.writes)})
        default = table.defaults[server]
        rows.append({
            "server": server, "port": SERVER_PORTS[server], "order": len(table.of(server)) + 1,
            "pattern": None, "worker_type": MAIN, "declared": [stack.main.name], "sticky": None,
            "fallback": FALLBACK_NONE, **_target_data(default), "writes": None})
    return rows


def _describe_target(route_target: Target) -> str:
    if route_target.proxied:
        return f"{route_target.name} [{', '.join(route_target.instances)}]"
    return f"{route_target.name} ({route_target.reason})"


def describe(stack: Stack, down: frozenset[str] | set[str] = frozenset()) -> str:
    """The routing table as text, one line per route, in match order."""
    table = routing_table(stack, down)
    lines = [f"down: {', '.join(table.down)}" if table.down else "down: none"]
    for server in SERVERS:
        lines.append(f"{server} server (:{SERVER_PORTS[server]}), first match wins:")
        routes = table.of(server)
        width = min(max([len(r.pattern) for r in routes] + [20]), 72)
        for n, route in enumerate(routes, 1):
            who = _describe_target(route.target)
            if route.writes is not None:
                who = f"GET/HEAD: {who}; other methods: {_describe_target(route.writes)}"
            elif route.target.name != route.worker_type:
                who = f"{who}; normally {route.worker_type}"
            sticky = f"  sticky: {route.sticky}" if route.sticky else ""
            lines.append(f"  {n:3}. {route.pattern:<{width}}  -> {who}{sticky}")
        lines.append(f"  {len(routes) + 1:3}. {'(everything else)':<{width}}  -> "
                     f"{_describe_target(table.defaults[server])}")
    return "\n".join(lines)


# --- nginx ------------------------------------------------------------------------------------


def _q(value: str) -> str:
    """An nginx config string in double quotes (nginx unescapes \\\\ and \\")."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sq(value: str) -> str:
    """An nginx config string in single quotes (for JSON bodies)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _matrix_error(reason: str) -> str:
    return json.dumps({"errcode": "M_UNKNOWN", "error": reason}, separators=(",", ":"))


# nginx map regexes (the map's source is "$http_authorization $arg_access_token" or $uri).
TOKEN_IN_HEADER = r"~*^Bearer +syt_([^_]+)_"
TOKEN_IN_QUERY = r"~*^ ?syt_([^_]+)_"  # no Authorization header: the source starts with a space
ROOM_IN_PATH = r"~*^/_matrix/client/[^/]+/rooms/([^/]+)/"

STICKY_KEYS = {
    USER: "$synapse_sticky_user",
    SOURCE_IP: "$remote_addr",
    ROOM: "$synapse_sticky_room",
}


def _render_maps(settings: ProxySettings) -> list[str]:
    out = [
        "    # sticky: user. The localpart sits between syt_ and the next _ of the access token",
        "    # (Authorization: Bearer or ?access_token=); other tokens hash as a whole.",
        '    map "$http_authorization $arg_access_token" $synapse_sticky_user {',
        f"        {_q(TOKEN_IN_HEADER)} $1;",
        f"        {_q(TOKEN_IN_QUERY)} $1;",
        '        default "$http_authorization $arg_access_token";',
        "    }",
        "    # sticky: room. The room ID of /_matrix/client/<version>/rooms/<room>/...",
        "    map $uri $synapse_sticky_room {",
        f"        {_q(ROOM_IN_PATH)} $1;",
        "        default $uri;",
        "    }",
    ]
    if settings.admin_allow is not None:
        out.append("    # /_synapse/admin: only from these sources (ProxySettings.admin_allow)")
        out.append("    geo $synapse_admin_source_ok {")
        out.append("        default 0;")
        out += [f"        {cidr} 1;" for cidr in settings.admin_allow]
        out.append("    }")
        out.append('    map "$synapse_admin_source_ok$uri" $synapse_admin_refused {')
        out.append("        default 0;")
        out.append(f"        {_q('~*^0/_synapse/admin')} 1;")
        out.append("    }")
    return out


def _render_upstream(up: Upstream, settings: ProxySettings) -> list[str]:
    out = [f"    upstream {up.name} {{"]
    if up.sticky is not None and len(up.servers) > 1:
        out.append(f"        hash {STICKY_KEYS[up.sticky]} consistent;  # sticky: {up.sticky}")
    out += [f"        server {s} max_fails=1 fail_timeout=5s;" for s in up.servers]
    out.append(f"        keepalive {settings.keepalive};")
    out.append("        keepalive_timeout 30s;")
    out.append("    }")
    return out


def _unavailable_location(name: str, reason: str, settings: ProxySettings) -> list[str]:
    return [
        f"        location @{name} {{",
        "            default_type application/json;",
        f"            add_header Retry-After {settings.retry_after} always;",
        "            add_header Access-Control-Allow-Origin * always;",
        f"            return 503 {_sq(_matrix_error(reason))};",
        "        }",
    ]


def _location_body(route_or_default: Route | None, target: Target, writes: Target | None,
                   unavailable: dict[str, str], settings: ProxySettings) -> list[str]:
    def named(t: Target) -> str:
        key = "unavailable_" + re.sub(r"[^a-z0-9]+", "_", t.unavailable.lower())
        unavailable[key] = t.reason
        return key

    out = []
    if not target.proxied:
        out.append(f"            error_page 503 @{named(target)};")
        out.append("            return 503;")
        return out
    if writes is not None:
        out.append(f"            error_page 503 @{named(writes)};")
        out.append("            if ($request_method !~ \"^(GET|HEAD)$\") { return 503; }")
    out.append(f"            proxy_pass http://{target.upstream};")
    if route_or_default is not None and route_or_default.long_poll:
        out.append(f"            proxy_read_timeout {settings.sync_read_timeout}s;")
    return out


SERVER_ROLES = {CLIENT: "client API, media, admin API",
                FEDERATION: "federation and key APIs, media for other servers"}
NOT_FOUND = '{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}'
ADMIN_REFUSED = '{"errcode":"M_FORBIDDEN","error":"The admin API is not exposed to this address"}'


def _render_server(table: RoutingTable, server: str, settings: ProxySettings) -> list[str]:
    port = SERVER_PORTS[server]
    unavailable: dict[str, str] = {}
    health = _health_target(table)
    out = [
        f"    # {server} server: {SERVER_ROLES[server]}",
        "    server {",
        f"        listen {port} default_server;",
        "        server_name _;",
        "        default_type application/json;  # the proxy's own answers are Matrix errors",
        "",
        "        # The proxy's health: the stack as the daemon sees it (re-rendered on change).",
        f"        location = {HEALTH_PATH} {{",
        "            access_log off;",
        "            default_type text/plain;",
        f"            return {health.name} {_q(health.reason)};",
        "        }",
    ]
    if server == CLIENT:
        out += [
            "        # Replication is never exposed (unauthenticated unless a secret is set).",
            "        location ^~ /_synapse/replication {",
            f"            return 404 {_sq(NOT_FOUND)};",
            "        }",
        ]
        if settings.admin_allow is not None:
            out += [
                "        if ($synapse_admin_refused) {",
                f"            return 403 {_sq(ADMIN_REFUSED)};",
                "        }",
            ]
    for n, route in enumerate(table.of(server), 1):
        who = (f"{route.target.name}: {', '.join(route.target.instances)}"
               if route.target.proxied else f"{route.target.name}: {route.target.reason}")
        if route.writes is not None:
            who += f"; writes: {route.writes.reason}"
        sticky = f", sticky: {route.sticky}" if route.sticky else ""
        out.append("")
        out.append(f"        # {n}. {route.worker_type} -> {who}{sticky}")
        out.append(f"        location ~* {_q(route.pattern)} {{")
        out += _location_body(route, route.target, route.writes, unavailable, settings)
        out.append("        }")
    out.append("")
    default = table.defaults[server]
    out.append(f"        # {len(table.of(server)) + 1}. everything else -> main")
    out.append("        location / {")
    out += _location_body(None, default, None, unavailable, settings)
    out.append("        }")
    for name, reason in sorted(unavailable.items()):
        out.append("")
        out += _unavailable_location(name, reason, settings)
    out.append("    }")
    return out


def render_nginx(stack: Stack, down: frozenset[str] | set[str] = frozenset(),
                 settings: ProxySettings | None = None) -> str:
    """The whole nginx.conf for the stack's proxy, with the instances in `down` left out.

    Every upstream names instances by their network alias (`sync-1:8008`); nginx resolves them
    when it loads the config, so an instance without a running container must be in `down`
    (otherwise `nginx -t` and the reload fail with "host not found in upstream")."""
    table = routing_table(stack, down)
    s = settings or settings_for(stack)
    out = [
        f"# nginx.conf of the reverse proxy of stack {stack.name!r}, generated by",
        "# synapse-supervisor (supervisor/proxy_config.py). Do not edit: the daemon rewrites it",
        "# and reloads nginx whenever the stack or the set of running instances changes.",
        f"# down: {', '.join(table.down) if table.down else 'none'}",
        "",
        f"worker_processes {s.worker_processes};",
        "pid /tmp/nginx.pid;",
        "error_log stderr warn;",
        "pcre_jit on;",
        f"worker_shutdown_timeout {s.shutdown_timeout}s;",
        "",
        "events {",
        f"    worker_connections {s.worker_connections};",
        "}",
        "",
        "http {",
        "    server_tokens off;",
        "    default_type application/octet-stream;",
        "    # No query string in the log: it may hold an access token.",
        "    log_format synapse '$remote_addr [$time_local] \"$request_method $uri "
        "$server_protocol\" '",
        "                       '$status $body_bytes_sent $request_time "
        "upstream=$upstream_addr';",
        "    access_log /dev/stdout synapse;",
        "",
        "    # Read-only root filesystem: every temporary path under /tmp (a tmpfs).",
        "    client_body_temp_path /tmp/nginx-client-body;",
        "    proxy_temp_path /tmp/nginx-proxy;",
        "    fastcgi_temp_path /tmp/nginx-fastcgi;",
        "    uwsgi_temp_path /tmp/nginx-uwsgi;",
        "    scgi_temp_path /tmp/nginx-scgi;",
        "",
        f"    client_max_body_size {s.client_max_body_size};",
        "    client_body_buffer_size 128k;",
        "",
        "    # proxy_pass never has a URI part: nginx then passes the request URI unchanged (a",
        "    # canonicalised URI would break federation request signatures).",
        "    proxy_http_version 1.1;",
        '    proxy_set_header Connection "";',
        "    proxy_set_header Host $host;",
        "    proxy_set_header X-Forwarded-For $remote_addr;",
        "    proxy_set_header X-Forwarded-Proto $scheme;",
        "    proxy_redirect off;",
        f"    proxy_connect_timeout {s.connect_timeout}s;",
        f"    proxy_send_timeout {s.read_timeout}s;",
        f"    proxy_read_timeout {s.read_timeout}s;",
        "    # Nothing spills to /tmp: uploads stream to the upstream, responses are never",
        "    # buffered to disk (the proxy runs on a read-only root with a small tmpfs).",
        "    proxy_request_buffering off;",
        "    proxy_max_temp_file_size 0;",
        "",
    ]
    out += _render_maps(s)
    out.append("")
    for up in table.upstreams:
        out += _render_upstream(up, s)
    for server in SERVERS:
        out.append("")
        out += _render_server(table, server, s)
    out.append("}")
    return "\n".join(out) + "\n"


def location_patterns(config: str) -> dict[str, list[str]]:
    """The regex locations of a rendered config, per server in file order (for tests and
    `synapsectl routes --check`)."""
    found: dict[str, list[str]] = {}
    server = None
    for line in config.splitlines():
        m = re.match(r"\s*listen (\d+) default_server;", line)
        if m:
            server = next(s for s, p in SERVER_PORTS.items() if p == int(m.group(1)))
            found[server] = []
            continue
        m = re.match(r'\s*location ~\* "(.*)" \{$', line)
        if m and server is not None:
            found[server].append(m.group(1).replace('\\"', '"').replace("\\\\", "\\"))
    return found
