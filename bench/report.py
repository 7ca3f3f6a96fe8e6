"""Turn one run's results (bench/sidebyside.py) into files under bench/results/:

  run-<UTC stamp>.json   everything measured, with the machine and its load   (one per run)
  latest.json            a copy of the newest full run
  latest.md              the tables (pasted into the README)
  timeline.png           per-container start -> ready bars: ours, one at a time, compose

--quick runs write quick-<stamp>.json, quick-latest.md and quick-timeline.png instead (not
committed; see bench/.gitignore). `python bench/report.py FILE.json` re-renders from a file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _f(v, d=2, unit=" s") -> str:
    if v is None:
        return "-"
    return f"{v:.{d}f}{unit}"


def _med(s: dict | None, d=2, unit=" s") -> str:
    return _f((s or {}).get("median"), d, unit)


def _range(s: dict | None, d=1) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['min']:.{d}f}-{s['max']:.{d}f}"


def _x(ratio: dict | None) -> str:
    """A median ratio ours/theirs as 'N.NN (x.x times faster|slower)'."""
    if not ratio or ratio.get("median") is None:
        return "-"
    r = ratio["median"]
    return f"{r:.2f}"


def section_windows(res: dict) -> dict[str, list[float]]:
    """Wall-clock window of each section: recorded, or (older runs) derived from the start
    time, the quiet wait and the sections' durations (to within the few seconds of set-up)."""
    if res.get("section_windows"):
        return res["section_windows"]
    import calendar
    t = calendar.timegm(time.strptime(res["started_at"], "%Y-%m-%dT%H:%M:%SZ"))
    t += (res.get("quiet_wait") or {}).get("waited_seconds", 0)
    out = {}
    for name in (res.get("config") or {}).get("sections", []):
        secs = (res.get("section_seconds") or {}).get(name)
        if secs is None:
            continue
        out[name] = [t, t + secs]
        t += secs
    return out


def noise(res: dict, t_from: float, t_to: float) -> dict:
    samples = [x for x in ((res.get("load") or {}).get("during") or {}).get("samples", [])
               if t_from - 10 <= x["t"] <= t_to]
    others = [x["other_stack_containers"] or 0 for x in samples]
    return {"samples": len(samples), "others_max": max(others, default=0),
            "share_with_others": round(sum(1 for o in others if o) / len(others), 2)
            if others else None, "load_max": max((x["load1"] for x in samples), default=None)}


def noise_line(res: dict, section: str) -> str:
    w = section_windows(res).get(section)
    if not w:
        return ""
    n = noise(res, *w)
    if not n["samples"]:
        return ""
    if not n["others_max"]:
        return (f"Noise: no other stack ran during this section (1-minute load max "
                f"{n['load_max']}, the bench's own containers included).")
    return (f"Noise: **another engineer's stack ran during {round(100 * n['share_with_others'])} "
            f"% of this section** (up to {n['others_max']} containers; 1-minute load max "
            f"{n['load_max']}, the bench's own containers included).")


def machine_line(res: dict) -> str:
    m = res.get("machine", {})
    load = res.get("load", {})
    during = (load.get("during") or {}).get("load1") or {}
    others = (load.get("during") or {}).get("other_stack_containers_max")
    qw = res.get("quiet_wait") or {}
    quiet = ("quiet at start (no other stacks, load < 1.5)" if qw.get("quiet") else
             f"NOT quiet at start after waiting {qw.get('waited_seconds')} s" if qw else
             "no quiet wait (quick run)")
    code = res.get("code") or {}
    return (f"code {str(code.get('commit', '?'))[:10]} ({code.get('mode', '?')}); "
            f"{m.get('nproc')} cores ({m.get('cpu_model')}), {m.get('memory_gib')} GiB, "
            f"{m.get('os')}, kernel {m.get('kernel')}, Docker {m.get('docker_server')}, "
            f"docker-compose {m.get('docker_compose')}; {res.get('started_at')}; run "
            f"{res.get('run_id')}, {round((res.get('duration_seconds') or 0) / 60)} min. Load "
            f"(1 min) before {load.get('before', ['?'])[0]}, during median "
            f"{during.get('median', '-')} / max {during.get('max', '-')}, after "
            f"{(load.get('after') or ['?'])[0]} (the bench's own containers included: the scale "
            f"section runs 200); other stacks' containers during the run: max {others}; "
            f"{quiet}.")


def markdown(res: dict) -> str:
    out = []
    add = out.append
    add(f"### Benchmarks{' (QUICK smoke run: too few rounds to quote)' if res.get('quick') else ''}")
    add("")
    add(f"Machine: {machine_line(res)}")
    add("")
    cs = res.get("cold_start") or {}
    s = cs.get("summary")
    if s:
        n = s["ours"]["n"]
        add(f"**Cold start to all ready** — default stack (PostgreSQL, Redis, main + 6 workers), "
            f"real Synapse, existing database, containers stopped; {n} rounds, methods in "
            f"rotating order; ratio = ours ÷ theirs per round, median over rounds (< 1: ours is "
            f"faster).")
        add("")
        nl = noise_line(res, "start")
        if nl:
            dirty = []
            for r in cs.get("rounds", []):
                t0s = [r[k]["t0"] for k in r if isinstance(r[k], dict) and "t0" in r[k]]
                t_end = max(r[k]["t0"] + r[k]["seconds"] for k in r
                            if isinstance(r[k], dict) and "t0" in r[k]) + 5
                if t0s and noise(res, min(t0s), t_end)["others_max"]:
                    dirty.append(str(r["round"]))
            add(nl + (f" Rounds with another stack running: {', '.join(dirty) or 'none'} of "
                      f"{len(cs.get('rounds', []))}." if dirty else ""))
            add("")
        add("| method | ready when | median | range | ours ÷ it |")
        add("|---|---|---|---|---|")
        add(f"| **synapse-supervisor** (daemon start → `status` says ready) | every process "
            f"serving, Synapse replication connected | **{_med(s['ours'])}** | "
            f"{_range(s['ours'])} | 1 |")
        add(f"| synapse-supervisor, its own `stack_ready` log | same, from the first tier's "
            f"start | {_med(s['ours_stack_ready_log'])} | {_range(s['ours_stack_ready_log'])} "
            f"| |")
        add(f"| one container at a time (systemd unit per worker) | `/health` 200 (weaker) | "
            f"{_med(s['sequential'])} | {_range(s['sequential'])} | "
            f"{_x(s['ratios']['ours_over_sequential'])} |")
        add(f"| docker-compose 1.29, `service_healthy`, Synapse recipe healthchecks (15 s) | "
            f"Docker health `healthy` | {_med(s['compose'])} | {_range(s['compose'])} | "
            f"{_x(s['ratios']['ours_over_compose'])} |")
        add(f"| critical path: slowest of PG/Redis + main + slowest worker, each alone | as "
            f"ours | {_med(s['critical_path'])} | {_range(s['critical_path'])} | "
            f"{_x(s['ratios']['ours_over_critical_path'])} |")
        first = cs.get("first_start_empty_db") or {}
        add(f"| synapse-supervisor, very first start (empty database, creates containers; "
            f"once) | as ours | {_f(first.get('seconds'))} | | |")
        if s.get("ours_as_init"):
            fi = cs.get("first_start_empty_db_as_init") or {}
            add(f"| synapse-supervisor on the stack exactly as `synapsectl init` writes it "
                f"(+ nginx proxy tier, median {_med(s.get('ours_as_init_proxy_tier'))}) | as "
                f"ours, then the proxy | {_med(s['ours_as_init'])} | "
                f"{_range(s['ours_as_init'])} | (first start: {_f(fi.get('seconds'))}) |")
        add("")
        add(f"`docker-compose up -d` itself returned after {_med(s['compose_up_returned'])} "
            f"(median), before the workers were healthy.")
        add("")
        st = s["stop"]
        add("**Ordered stop** (same rounds)")
        add("")
        add("| method | median | range |")
        add("|---|---|---|")
        add(f"| **synapse-supervisor** SIGTERM → daemon exit (workers ∥, main, PG+Redis) | "
            f"**{_med(st['ours_sigterm_to_exit'])}** | {_range(st['ours_sigterm_to_exit'])} |")
        add(f"| sum over tiers of the slowest single `docker stop` (each container stopped "
            f"alone) | {_med(st['sum_of_tier_max_docker_stop'])} | "
            f"{_range(st['sum_of_tier_max_docker_stop'])} |")
        add(f"| `docker-compose stop` | {_med(st['compose_stop'])} | "
            f"{_range(st['compose_stop'])} |")
        add(f"| ratio ours ÷ sum of tier maxima (per round) | "
            f"{_x(s['ratios']['ours_stop_over_sum_of_tier_max'])} | |")
        add("")
    cr = res.get("crash") or {}
    if cr.get("summary"):
        so, sd = cr["summary"]["ours"], cr["summary"]["docker_restart_always"]
        n_o, n_d = len(cr.get("ours", [])), len(cr.get("docker_restart_always", []))
        add(f"**Crash → restart** — SIGKILL of worker `{cr['target']}`'s process ({n_o} kills "
            f"under the daemon, {n_d} of an identical container with Docker's `restart: always`,"
            f" in alternating blocks; each kill after ≥ {cr.get('settle_seconds'):.0f} s of "
            f"running). Median / p99 from Docker's `die` event:")
        add("")
        if noise_line(res, "crash"):
            add(noise_line(res, "crash"))
            add("")
        add("| | die → start | die → `/health` 200 | die → ready (replication) |")
        add("|---|---|---|---|")

        def cell(summ, k):
            v = summ.get(k) or {}
            return f"{_f(v.get('median'))} / {_f(v.get('p99'))}" if v.get("n") else "-"

        add(f"| **synapse-supervisor** (first retry at once) | {cell(so, 'die_to_start_event')} "
            f"| {cell(so, 'die_to_health')} | {cell(so, 'die_to_ready')} |")
        add(f"| Docker restart policy `always` | {cell(sd, 'die_to_start_event')} | "
            f"{cell(sd, 'die_to_health')} | {cell(sd, 'die_to_ready')} |")
        add("")
        add(f"The daemon's own start call (its `starting` log event) came "
            f"{cell(so, 'die_to_start_call')} after the `die` event.")
        probe = cr.get("docker_kill_once") or {}

        def said(p: dict | None) -> str:
            if not p:
                return "was not measured"
            if p.get("restarted"):
                return f"restarted it ({_f(p.get('die_to_start_event'))} from `die` to start)"
            return f"did not restart it within {p.get('waited_seconds'):.0f} s"

        if probe:
            add(f"With `docker kill` instead (once each): the daemon {said(probe.get('ours'))}; "
                f"Docker's `restart: always` {said(probe.get('docker_restart_always'))} "
                f"(Docker counts `docker kill` as a manual stop).")
        add("")
    co = res.get("cost") or {}
    if co.get("idle"):
        idle, lat = co["idle"], co.get("status_latency") or {}
        cli = lat.get("synapsectl_status_json_seconds") or {}
        api = lat.get("api_v1_status_seconds") or {}
        add(f"**Daemon cost** ({idle['containers']} containers, idle "
            f"{round(idle['seconds'] / 60, 1)} min)")
        add("")
        if noise_line(res, "cost"):
            add(noise_line(res, "cost"))
            add("")
        add("| | value |")
        add("|---|---|")
        add(f"| CPU while idle | {idle['cpu_percent_of_one_core']:.2f} % of one core "
            f"({idle['cpu_seconds']} s CPU) |")
        add(f"| RSS while idle (median / max) | {idle['rss_mib']['median']} / "
            f"{idle['rss_mib']['max']} MiB (peak since start {idle['peak_rss_mib_since_start']}"
            f" MiB), {idle['threads']} threads |")
        add(f"| `synapsectl status --json` (new process each) median / p99, n={cli.get('n')} |"
            f" {_f(cli.get('median'), 3)} / {_f(cli.get('p99'), 3)} (of which Python start-up "
            f"{_f(lat.get('python_startup_seconds'), 3)}, + importing the CLI "
            f"{_f(lat.get('python_import_cli_seconds'), 3)}) |")
        add(f"| `GET /v1/status` on the control socket, median / p99, n={api.get('n')} | "
            f"{_f((api.get('median') or 0) * 1000, 1, ' ms')} / "
            f"{_f((api.get('p99') or 0) * 1000, 1, ' ms')} |")
        add("")
    sc = res.get("scale") or {}
    if sc.get("runs"):
        add(f"**Scale — {sc['label']}.** Start to all ready: the daemon (PostgreSQL + Redis, "
            f"then the main stub, then all worker stubs in parallel) vs a bare docker-py pool of "
            f"32 threads starting the same stub containers (main + workers) and polling "
            f"`/health` (the engine's own limit). 'existing': containers created and stopped, "
            f"median of {sc['runs'][0]['ours'].__len__() - 1} alternating rounds; 'first': the "
            f"daemon also creates its containers one by one and PostgreSQL runs initdb.")
        add("")
        if noise_line(res, "scale"):
            add(noise_line(res, "scale"))
            add("")
        add("| workers | ours, existing | of which the workers tier | bare, existing | ours ÷ "
            "bare | ours, first (creating; initdb) | bare, first (creating) | ours stop "
            "| daemon RSS, `GET /v1/status` |")
        add("|---|---|---|---|---|---|---|---|---|")
        for run in sc["runs"]:
            sm = run.get("summary") or {}
            stops = [r["stop"]["sigterm_to_exit_seconds"] for r in run["ours"]]
            add(f"| {run['workers']} | {_f(sm.get('ours_existing_median'), 1)} | "
                f"{_f(sm.get('ours_existing_workers_tier_median'), 1)} | "
                f"{_f(sm.get('bare_existing_median'), 1)} | "
                f"{_f(sm.get('ratio_existing_median'), 2, '')} | "
                f"{_f(sm.get('ours_first'), 1)} ({_f(sm.get('ours_first_create_span'), 1)}; "
                f"{_f(sm.get('ours_first_infrastructure_tier'), 1)}) | "
                f"{_f(sm.get('bare_first'), 1)} | {_f(sorted(stops)[len(stops) // 2], 1)} | "
                f"{_f(sm.get('daemon_rss_mib_when_ready_max'), 0, ' MiB')}, "
                f"{_f((sm.get('api_v1_status_median_seconds') or 0) * 1000, 1, ' ms')} |")
        add("")
    if res.get("errors"):
        add("**Errors in this run:** " + "; ".join(f"{k}: {v.splitlines()[0][:200]}"
                                                  for k, v in res["errors"].items()))
        add("")
    add("Method and caveats: docs/benchmarks.md. Raw numbers: bench/results/latest.json.")
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> bool:
    cs = res.get("cold_start") or {}
    s = cs.get("summary")
    if not s:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rnd = next(r for r in cs["rounds"] if r["round"] == s["timeline_round"])
    panels = [("synapse-supervisor", rnd["ours"]), ("one at a time (systemd-style)",
                                                    rnd["sequential"]),
              ("docker-compose + healthchecks", rnd["compose"])]
    xmax = max(max(c["ready"] for c in p["containers"]) for _, p in panels) * 1.05
    n = max(len(p["containers"]) for _, p in panels)
    fig, axes = plt.subplots(3, 1, figsize=(10, 1.2 + 3 * (0.32 * n + 0.6)), sharex=True)
    colors = {"postgres": "#4c72b0", "redis": "#c44e52", "main": "#55a868"}
    for ax, (title, p) in zip(axes, panels):
        rows = p["containers"]
        for y, c in enumerate(rows):
            ax.barh(y, c["ready"] - c["start"], left=c["start"], height=0.6,
                    color=colors.get(c["instance"], "#8172b2"))
            ax.text(c["ready"] + xmax * 0.005, y, f"{c['ready']:.1f}", va="center",
                    fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([c["instance"] for c in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{title}: all ready at {p['seconds']:.1f} s", fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlim(0, xmax)
    axes[-1].set_xlabel("seconds since the start command (bar: start call → ready)")
    fig.suptitle(f"Cold start, default stack, round {rnd['round']} of run {res['run_id']} "
                 f"({res['machine']['nproc']} cores, {res['started_at'][:10]})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(res: dict, results_dir: Path, quick: bool = False) -> list[Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.strptime(res["started_at"],
                                                          "%Y-%m-%dT%H:%M:%SZ"))
    prefix = "quick-" if quick else ""
    run_file = results_dir / f"{prefix}run-{stamp}.json"
    text = json.dumps(res, indent=1)
    run_file.write_text(text)
    paths = [run_file]
    latest = results_dir / f"{prefix}latest.json"
    latest.write_text(text)
    paths.append(latest)
    md = results_dir / f"{prefix}latest.md"
    md.write_text(markdown(res))
    paths.append(md)
    png = results_dir / f"{prefix}timeline.png"
    try:
        if plot(res, png):
            paths.append(png)
    except Exception as err:  # noqa: BLE001 - a missing plot must not lose the numbers
        print(f"report: plot failed: {err}", file=sys.stderr)
    return paths


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(sys.argv[1]).parent
    print(markdown(data))
    if plot(data, out / ("quick-timeline.png" if data.get("quick") else "timeline.png")):
        print("plot written", file=sys.stderr)
