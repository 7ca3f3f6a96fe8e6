#!/opt/synapse/bin/python
"""Entrypoint of the synapse-supervisor Synapse image.

Two modes (see image/README.md for the full contract):

* Supervisor mode: SYNAPSE_CONFIG_FILES="/conf/a.yaml:/conf/b.yaml" -> exec Synapse with
  exactly those files. Nothing is generated.
* Standalone (legacy contract) mode: read /data/homeserver.yaml (SYNAPSE_CONFIG_PATH) and
  SYNAPSE_* variables, write a forced config and a console log config into a temp dir
  (never into /data) and exec Synapse with `-c homeserver.yaml -c forced.yaml`.

Synapse is exec'd, so it runs as PID 1 and handles SIGTERM itself (exit code 0).
Bad input: one line on stderr, exit code 2, nothing written.

Self-contained: stdlib + PyYAML (a Synapse dependency, present in /opt/synapse).
"""

import os
import socket
import sys

PYTHON = os.environ.get("SYNAPSE_PYTHON", "/opt/synapse/bin/python")
MAIN_APP = "synapse.app.homeserver"
WORKER_APP = "synapse.app.generic_worker"
DEFAULT_CONFIG = "/data/homeserver.yaml"
DEFAULT_SIGNING_KEY = "/data/signing.key"
DEFAULT_MEDIA = "/synapse_media"
GENERATED_DIR = os.environ.get("SYNAPSE_GENERATED_DIR", "/tmp/synapse-conf")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

PORT_CLIENT = 8008
PORT_FEDERATION = 8448
PORT_METRICS = 9000
PORT_REPLICATION = 9093

# Worker roles (legacy app names) -> resources of the 8008 listener, whether the worker
# also serves federation on 8448, and extra keys for the worker's own file.
# None = an http listener that serves /health only.
ROLES = {
    "generic_worker": {"resources": ["client", "federation"], "federation_port": True},
    "synchrotron": {"resources": ["client"]},
    "client_reader": {"resources": ["client"]},
    "event_creator": {"resources": ["client"]},
    "frontend_proxy": {"resources": ["client"]},
    "user_dir": {"resources": ["client"]},
    "federation_reader": {"resources": ["federation"], "federation_port": True},
    "media_repository": {"resources": ["media", "client"]},
    "pusher": {"resources": None},
    "federation_sender": {"resources": None},
    "appservice": {"resources": None},
}
VALID_APPS = [MAIN_APP] + ["synapse.app." + r for r in ROLES]

# Keys that Synapse 1.163 rejects at startup (removed features).
REJECTED_KEYS = {
    "worker_replication_host": "removed in Synapse 1.88; the image sets instance_map.main",
    "worker_replication_port": "TCP replication was removed in Synapse 1.67; Redis replaces it",
    "worker_replication_http_port": "removed in Synapse 1.88; the image sets instance_map.main",
    "worker_replication_http_tls": "removed in Synapse 1.88; use instance_map.main.tls",
    "log_file": "removed in Synapse 1.3; the image logs to stdout",
}


class InputError(Exception):
    """Bad input from the operator: reported as one line, exit code 2."""


_warnings = []


def warn(msg):
    """Warnings are printed just before the exec, so bad input stays one line on stderr."""
    _warnings.append("entrypoint: warning: %s" % msg)


def env(name, default=None):
    value = os.environ.get(name, "")
    value = value.strip()
    return value if value else default


def normalise_app(value):
    app = value if value.startswith("synapse.app.") else "synapse.app." + value
    if app not in VALID_APPS:
        raise InputError(
            "unknown SYNAPSE_WORKER %r; valid names: %s" % (value, ", ".join(VALID_APPS))
        )
    return app


def parse_cpus(spec):
    cpus = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = part.split("-", 1)
                lo, hi = int(lo), int(hi)
                if lo < 0 or hi < lo:
                    raise ValueError
                cpus.update(range(lo, hi + 1))
            else:
                n = int(part)
                if n < 0:
                    raise ValueError
                cpus.add(n)
    except ValueError:
        cpus = set()
    if not cpus:
        raise InputError(
            "SYNAPSE_CPU_AFFINITY=%r is not a CPU list; use e.g. '0,1' or '0-1'" % spec
        )
    return cpus


def apply_cpu_affinity():
    spec = env("SYNAPSE_CPU_AFFINITY")
    if spec is None:
        return
    cpus = parse_cpus(spec)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        raise InputError(
            "SYNAPSE_CPU_AFFINITY=%r cannot be applied (%s); allowed CPUs: %s"
            % (spec, e.strerror, ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
        )


def check_readable(path, what, hint):
    if not os.path.exists(path):
        raise InputError("%s %s not found: %s" % (what, path, hint))
    if not os.access(path, os.R_OK):
        raise InputError(
            "%s %s is not readable by uid %d: %s" % (what, path, os.getuid(), hint)
        )


def exec_synapse(module, config_paths, extra_args):
    argv = [PYTHON, "-m", module]
    for path in config_paths:
        argv += ["-c", path]
    argv += extra_args
    for line in _warnings:
        print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(PYTHON, argv)


# ---------------------------------------------------------------- supervisor mode


def supervisor_mode(files_spec, extra_args):
    paths = [p for p in files_spec.split(":") if p.strip()]
    if not paths:
        raise InputError("SYNAPSE_CONFIG_FILES is set but names no file")
    for path in paths:
        check_readable(
            path, "config file", "mount it or fix SYNAPSE_CONFIG_FILES (colon-separated paths)"
        )
    app = normalise_app(env("SYNAPSE_WORKER", MAIN_APP))
    module = MAIN_APP if app == MAIN_APP else WORKER_APP
    apply_cpu_affinity()
    exec_synapse(module, paths, extra_args)


# ---------------------------------------------------------------- standalone mode


def load_yaml(path):
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        reason = str(e).replace("\n", " ")
        raise InputError("cannot read %s: %s" % (path, reason))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("%s must contain a YAML mapping (the homeserver config)" % path)
    return data


def split_host_port(value, default_port, what):
    host, port = value, default_port
    if value.count(":") == 1:
        host, port_s = value.split(":")
        try:
            port = int(port_s)
        except ValueError:
            raise InputError("%s=%r: port must be a number (host or host:port)" % (what, value))
    if not host:
        raise InputError("%s=%r: host is empty" % (what, value))
    return host, port


def http_listener(port, resources, tls=False):
    listener = {
        "port": port,
        "type": "http",
        "bind_addresses": ["0.0.0.0"],
        # 8008 sits behind a reverse proxy; 8448 may face other servers directly
        "x_forwarded": port != PORT_FEDERATION,
    }
    if resources:
        listener["resources"] = [{"names": list(resources), "compress": False}]
    if tls:
        listener["tls"] = True
    return listener


def metrics_listener():
    return {"port": PORT_METRICS, "type": "metrics", "bind_addresses": ["0.0.0.0"]}


def log_config(hostname, level):
    fmt = (
        "%(asctime)s - " + hostname.replace("%", "%%") + " - %(name)s - %(lineno)d"
        " - %(levelname)s - %(request)s - %(message)s"
    )
    return {
        "version": 1,
        "formatters": {"precise": {"format": fmt}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "precise",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {
            # DEBUG on synapse.storage.SQL logs secrets such as access tokens.
            "synapse.storage.SQL": {"level": "INFO"},
        },
        "root": {"level": level, "handlers": ["console"]},
        "disable_existing_loggers": False,
    }


def operator_uses_tls(config):
    for listener in config.get("listeners") or []:
        if isinstance(listener, dict) and listener.get("tls"):
            return True
    return False


def sanitise(config):
    """Drop keys Synapse 1.163 rejects. Returns (config, dropped?)."""
    dropped = False
    clean = dict(config)
    for key, why in REJECTED_KEYS.items():
        if key in clean:
            warn("ignoring %s from the homeserver config (%s)" % (key, why))
            del clean[key]
            dropped = True
    listeners = clean.get("listeners")
    if isinstance(listeners, list):
        kept = [
            l for l in listeners if not (isinstance(l, dict) and l.get("type") == "replication")
        ]
        if len(kept) != len(listeners):
            warn(
                "ignoring listeners of type replication (TCP replication on 9092 was removed"
                " in Synapse 1.67; HTTP replication is on %d)" % PORT_REPLICATION
            )
            clean["listeners"] = kept
            dropped = True
    return clean, dropped


def write_file(path, data):
    import yaml

    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, default_flow_style=False, sort_keys=False)
    os.replace(tmp, path)


def standalone_mode(extra_args):
    # 1. Environment (cheap checks first; nothing is read or written yet).
    app = normalise_app(env("SYNAPSE_WORKER", MAIN_APP))
    is_main = app == MAIN_APP
    role = app[len("synapse.app.") :]
    level = env("SYNAPSE_LOG_LEVEL", "INFO").upper()
    if level not in LOG_LEVELS:
        raise InputError(
            "SYNAPSE_LOG_LEVEL=%r is not a log level; use one of %s"
            % (env("SYNAPSE_LOG_LEVEL"), ", ".join(LOG_LEVELS))
        )
    replication = None
    if not is_main:
        repl = env("SYNAPSE_REPLICATION_HOST")
        if repl is None:
            raise InputError(
                "SYNAPSE_WORKER=%s needs SYNAPSE_REPLICATION_HOST: set it to the host name of the"
                " main process (its HTTP replication listener is on port %d)" % (app, PORT_REPLICATION)
            )
        replication = split_host_port(repl, PORT_REPLICATION, "SYNAPSE_REPLICATION_HOST")
    redis_env = env("SYNAPSE_REDIS_HOST")
    if redis_env is not None:
        redis_env = split_host_port(redis_env, 6379, "SYNAPSE_REDIS_HOST")
    hostname = env("SYNAPSE_HOSTNAME", socket.gethostname())
    worker_name = env("SYNAPSE_WORKER_NAME", "%s-%s" % (role, socket.gethostname()))
    apply_cpu_affinity()  # inherited through the exec

    # 2. The operator's files.
    config_path = env("SYNAPSE_CONFIG_PATH", DEFAULT_CONFIG)
    check_readable(
        config_path,
        "homeserver config",
        "mount your homeserver.yaml at %s (or set SYNAPSE_CONFIG_PATH)" % DEFAULT_CONFIG,
    )
    config = load_yaml(config_path)
    if not config.get("server_name"):
        raise InputError("%s sets no server_name; add it" % config_path)

    key_path = config.get("signing_key_path") or DEFAULT_SIGNING_KEY
    key_path = os.path.abspath(key_path)
    check_readable(
        key_path,
        "signing key",
        "mount it, or create it once with `docker run --rm -v <data>:/data IMAGE generate-keys`"
        " (runs synapse.app.homeserver --generate-keys)",
    )

    redis = config.get("redis") if isinstance(config.get("redis"), dict) else {}
    redis = dict(redis)
    if redis_env is not None:
        redis.update({"enabled": True, "host": redis_env[0], "port": redis_env[1]})
    if not is_main and not redis.get("enabled"):
        raise InputError(
            "SYNAPSE_WORKER=%s needs Redis: set redis: {enabled: true, host: ...} in %s or env"
            " SYNAPSE_REDIS_HOST=host[:port]" % (app, config_path)
        )

    # 3. What we force on top of the operator's file (shallow merge: our keys win).
    clean, dropped = sanitise(config)
    forced = {
        "signing_key_path": key_path,
        "no_redirect_stdio": True,
        "enable_metrics": True,
    }
    if not config.get("media_store_path"):
        forced["media_store_path"] = DEFAULT_MEDIA
    if redis_env is not None:
        forced["redis"] = redis
    log_path = os.path.join(GENERATED_DIR, "log.yaml")

    if is_main:
        if config.get("listeners"):
            warn("listeners from %s are replaced by the image's fixed listeners" % config_path)
        forced["listeners"] = [
            http_listener(PORT_CLIENT, ["client"]),
            http_listener(PORT_FEDERATION, ["federation"], tls=operator_uses_tls(config)),
            metrics_listener(),
            http_listener(PORT_REPLICATION, ["replication"]),
        ]
        forced["log_config"] = log_path
        module = MAIN_APP
    else:
        spec = ROLES[role]
        instance_map = config.get("instance_map")
        instance_map = dict(instance_map) if isinstance(instance_map, dict) else {}
        instance_map["main"] = {"host": replication[0], "port": replication[1]}
        listeners = [http_listener(PORT_CLIENT, spec["resources"])]
        if spec.get("federation_port"):
            listeners.append(http_listener(PORT_FEDERATION, ["federation"]))
        if role == "generic_worker":
            # may be a stream writer: other processes reach it here
            listeners.append(http_listener(PORT_REPLICATION, ["replication"]))
        listeners.append(metrics_listener())
        forced.update(
            {
                "worker_app": WORKER_APP,
                "worker_name": worker_name,
                "instance_map": instance_map,
                "redis": redis,
                "worker_listeners": listeners,
                "worker_log_config": log_path,
            }
        )
        if role == "media_repository":
            forced["enable_media_repo"] = True
        duty = {
            "pusher": ("pusher_instances", [worker_name], {"start_pushers": False}),
            "federation_sender": (
                "federation_sender_instances",
                [worker_name],
                {"send_federation": False},
            ),
            "appservice": ("notify_appservices_from_worker", worker_name, {}),
            "user_dir": ("update_user_directory_from_worker", worker_name, {}),
        }.get(role)
        if duty:
            key, value, extra = duty
            if config.get(key):
                configured = config[key]
                names = configured if isinstance(configured, list) else [configured]
                if worker_name not in names:
                    warn(
                        "%s in %s does not name this worker (%s): it will not do %s work"
                        % (key, config_path, worker_name, role)
                    )
            else:
                forced[key] = value
                forced.update(extra)
                warn(
                    "set %s: %r in %s for main too, else main keeps doing this work as well"
                    % (key, value, config_path)
                )
        module = WORKER_APP

    # 4. Write the generated files (temp dir only) and exec.
    try:
        os.makedirs(GENERATED_DIR, mode=0o700, exist_ok=True)
        base_path = config_path
        if dropped:
            base_path = os.path.join(GENERATED_DIR, "homeserver.yaml")
            write_file(base_path, clean)
        write_file(log_path, log_config(hostname, level))
        forced_path = os.path.join(GENERATED_DIR, "forced.yaml")
        write_file(forced_path, forced)
    except OSError as e:
        raise InputError(
            "cannot write the generated config to %s (%s); set SYNAPSE_GENERATED_DIR to a"
            " writable directory" % (GENERATED_DIR, e.strerror)
        )
    exec_synapse(module, [base_path, forced_path], extra_args)


def generate_keys(extra_args):
    """`generate-keys`: create a missing signing key (and nothing else we need)."""
    config_path = env("SYNAPSE_CONFIG_PATH", DEFAULT_CONFIG)
    check_readable(
        config_path,
        "homeserver config",
        "mount your homeserver.yaml at %s (or set SYNAPSE_CONFIG_PATH)" % DEFAULT_CONFIG,
    )
    config = load_yaml(config_path)
    argv = [config_path]
    if not config.get("signing_key_path"):
        # keep the default in line with standalone mode
        os.makedirs(GENERATED_DIR, mode=0o700, exist_ok=True)
        path = os.path.join(GENERATED_DIR, "keys.yaml")
        write_file(path, {"signing_key_path": DEFAULT_SIGNING_KEY})
        argv.append(path)
    exec_synapse(MAIN_APP, argv, ["--generate-keys"] + extra_args)


USAGE = (
    "usage: entrypoint [run|generate-keys] [--synapse-option ...]; configure with SYNAPSE_* variables"
    " (see image/README.md)"
)


def main(args):
    # Optional command, then options passed through to Synapse unchanged.
    command = None
    if args and not args[0].startswith("-"):
        command, args = args[0], args[1:]
    if command not in (None, "generate-keys", "run"):
        raise InputError("unexpected argument %r; %s" % (command, USAGE))
    if command == "generate-keys":
        generate_keys(args)
        return
    files = os.environ.get("SYNAPSE_CONFIG_FILES")
    if files is not None and files.strip():
        supervisor_mode(files, args)
    else:
        standalone_mode(args)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except InputError as e:
        print("entrypoint: error: %s" % e, file=sys.stderr, flush=True)
        sys.exit(2)
