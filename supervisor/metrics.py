"""Prometheus metrics of the daemon, and discovery of every Synapse process's metrics endpoint.

A `Collector` rebuilds the families from the supervisor's records at each scrape, so nothing is
kept in sync by hand; the time-to-ready histogram is the only stored series. Served over HTTP on
the stack file's `daemon.metrics_address` (127.0.0.1 by default):
  /metrics   the metrics below (docs/metrics.md)
  /sd        Prometheus http_sd target groups for every Synapse process (also written to
             <state_dir>/prometheus-targets.json for file_sd)
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from . import __version__
from .state import State

PREFIX = "synapse_supervisor"
STACK_STATES = ("starting", "ready", "degraded", "stopping", "stopped")


class StackCollector:
    def __init__(self, sup) -> None:
        self.sup = sup

    def collect(self):
        sup = self.sup
        recs = list(sup.records.values())
        labels = ["stack", "instance", "role"]
        state = GaugeMetricFamily(f"{PREFIX}_container_state",
                                  "1 for the state each container is in", labels=labels + ["state"])
        ready = GaugeMetricFamily(f"{PREFIX}_container_ready",
                                  "1 when the container is listening and replicating",
                                  labels=labels)
        restarts = CounterMetricFamily(f"{PREFIX}_container_restarts",
                                       "Restarts after a crash since the daemon started",
                                       labels=labels)
        exit_code = GaugeMetricFamily(f"{PREFIX}_container_last_exit_code",
                                      "Exit code of the container's last death", labels=labels)
        exit_reason = GaugeMetricFamily(f"{PREFIX}_container_last_exit",
                                        "1 labelled with the reason of the last death "
                                        "(OOM-killed, signal, exit code)",
                                        labels=labels + ["reason"])
        backoff = GaugeMetricFamily(f"{PREFIX}_container_backoff_seconds",
                                    "Current backoff delay before the next restart",
                                    labels=labels)
        for r in recs:
            base = [sup.stack.name, r.instance, r.role]
            for s in State:
                state.add_metric(base + [s.value], 1.0 if r.state is s else 0.0)
            ready.add_metric(base, 1.0 if r.state is State.READY else 0.0)
            restarts.add_metric(base, r.restarts)
            if r.last_exit_code is not None:
                exit_code.add_metric(base, r.last_exit_code)
            if r.last_exit_reason:
                exit_reason.add_metric(base + [r.last_exit_reason], 1.0)
            backoff.add_metric(base, r.backoff_delay if r.state is State.BACKOFF else 0.0)
        stack_state = GaugeMetricFamily(f"{PREFIX}_stack_state", "1 for the stack's state",
                                        labels=["stack", "state"])
        for s in STACK_STATES:
            stack_state.add_metric([sup.stack.name, s], 1.0 if sup.phase == s else 0.0)
        stack_ready = GaugeMetricFamily(f"{PREFIX}_stack_ready",
                                        "1 when every container of the stack is ready",
                                        labels=["stack"])
        stack_ready.add_metric([sup.stack.name], 1.0 if sup.phase == "ready" else 0.0)
        reconnects = CounterMetricFamily(f"{PREFIX}_event_stream_reconnects",
                                         "Reconnections to Docker's event stream",
                                         labels=["stack"])
        reconnects.add_metric([sup.stack.name], sup.event_reconnects)
        info = InfoMetricFamily(f"{PREFIX}_build", "The daemon's version")
        info.add_metric([], {"version": __version__})
        yield from (state, ready, restarts, exit_code, exit_reason, backoff, stack_state,
                    stack_ready, reconnects, info)


class Metrics:
    def __init__(self, sup) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StackCollector(sup))
        self.time_to_ready = Histogram(
            f"{PREFIX}_time_to_ready_seconds", "From start call to ready, per start",
            ["stack", "role"], registry=self.registry,
            buckets=(0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300, 900))
        self.sup = sup
        self.server: ThreadingHTTPServer | None = None

    def observe_ready(self, role: str, seconds: float) -> None:
        self.time_to_ready.labels(self.sup.stack.name, role).observe(seconds)

    def serve(self, address: str) -> None:
        from .lint import host_port
        host, port = host_port(address)
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/sd"):
                    from .operations import metrics_targets
                    body = json.dumps(metrics_targets(metrics.sup)).encode()
                    ctype = "application/json"
                elif self.path.startswith("/metrics") or self.path == "/":
                    body = generate_latest(metrics.registry)
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), name="metrics",
                         daemon=True).start()

    def close(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
