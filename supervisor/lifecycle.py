"""The runbook, as pure functions: what starts in which order, what stops in which order.

A stack is a dependency graph of containers: PostgreSQL and Redis first, then main (which
prepares the database schema), then every worker (which needs main's schema and replication),
then the reverse proxy when there is one. `start_tiers` turns that graph into tiers whose members
may start in parallel; `stop_tiers` is the same graph inverted, so workers stop before main and
main before the infrastructure. `Plan` is plain data that `synapsectl plan` prints.

The convergence planner (`converge`) compares what should run with what Docker shows and says,
for every container, whether to adopt, create, recreate or remove it, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .stack import MAIN, POSTGRES, PROXY, REDIS, Stack


class CycleError(ValueError):
    pass


@dataclass(frozen=True)
class Tier:
    name: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    start: tuple[Tier, ...]
    stop: tuple[Tier, ...]

    def describe(self) -> str:
        lines = ["start:"]
        lines += [f"  {n}. {t.name}: {', '.join(t.members)}" for n, t in enumerate(self.start, 1)]
        lines.append("stop:")
        lines += [f"  {n}. {t.name}: {', '.join(t.members)}" for n, t in enumerate(self.stop, 1)]
        return "\n".join(lines)


def dependencies(stack: Stack) -> dict[str, tuple[str, ...]]:
    """Each container's direct dependencies (only those the stack runs)."""
    infra = stack.managed_services
    deps: dict[str, tuple[str, ...]] = {name: () for name in infra}
    deps[MAIN] = infra
    for worker in stack.workers:
        deps[worker.name] = (MAIN, *infra)
    if stack.has_proxy:
        # Ordering only: the proxy starts after every worker and stops before them.
        deps[PROXY] = (MAIN, *(w.name for w in stack.workers))
    return deps


def restart_dependencies(stack: Stack) -> dict[str, tuple[str, ...]]:
    """What must be ready before a crashed container is started again. The proxy needs only
    main: it routes around workers that are down."""
    deps = dependencies(stack)
    if PROXY in deps:
        deps[PROXY] = (MAIN,)
    return deps


def dependents(deps: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The inverted graph: who depends on each container."""
    out: dict[str, list[str]] = {name: [] for name in deps}
    for name, needs in deps.items():
        for need in needs:
            out[need].append(name)
    return {k: tuple(v) for k, v in out.items()}


def levels(deps: dict[str, tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Topological levels: each level depends only on earlier ones. Order within a level is the
    order of `deps`. A cycle raises CycleError naming its members."""
    remaining = dict(deps)
    done: set[str] = set()
    out = []
    while remaining:
        level = tuple(n for n, needs in remaining.items() if set(needs) <= done)
        if not level:
            raise CycleError("dependency cycle among: " + ", ".join(sorted(remaining)))
        out.append(level)
        done.update(level)
        for name in level:
            del remaining[name]
    return out


def _tier_name(members: tuple[str, ...]) -> str:
    if set(members) <= {POSTGRES, REDIS}:
        return "infrastructure"
    if members == (MAIN,):
        return "main"
    if members == (PROXY,):
        return "proxy"
    return "workers"


def start_tiers(stack: Stack) -> tuple[Tier, ...]:
    return tuple(Tier(_tier_name(lv), lv) for lv in levels(dependencies(stack)))


def stop_tiers(stack: Stack) -> tuple[Tier, ...]:
    return tuple(Tier(_tier_name(lv), lv) for lv in levels(dependents(dependencies(stack))))


def plan(stack: Stack) -> Plan:
    return Plan(start=start_tiers(stack), stop=stop_tiers(stack))


def restore_order(stack: Stack, down: set[str]) -> list[tuple[str, ...]]:
    """When containers in `down` are not running: the tiers to bring back, in order. A
    dependency comes back before anything that needs it; what depends on a restored
    dependency and is itself down follows in a later tier."""
    deps = restart_dependencies(stack)
    return [tuple(n for n in lv if n in down) for lv in levels(deps)
            if any(n in down for n in lv)]


# --- convergence -------------------------------------------------------------------------

ADOPT = "adopt"
CREATE = "create"
RECREATE = "recreate"
REMOVE = "remove"


@dataclass(frozen=True)
class Action:
    kind: str
    instance: str
    reason: str


@dataclass(frozen=True)
class Observed:
    """What Docker shows of one of our containers (plain data from the adapter)."""

    instance: str
    container_id: str
    config_hash: str
    running: bool


@dataclass(frozen=True)
class Convergence:
    actions: tuple[Action, ...] = field(default=())

    def of(self, kind: str) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.kind == kind)

    def describe(self) -> str:
        return "\n".join(f"{a.kind:9} {a.instance}: {a.reason}" for a in self.actions) \
            or "nothing to do"


def converge(desired: dict[str, str], observed: list[Observed]) -> Convergence:
    """`desired` maps each instance to its config hash. Containers with our labels whose
    instance is not desired are removed; duplicates of one instance are removed but one."""
    actions = []
    by_instance: dict[str, list[Observed]] = {}
    for obs in observed:
        by_instance.setdefault(obs.instance, []).append(obs)
    for instance, want in desired.items():
        found = by_instance.get(instance, [])
        keep = next((o for o in found if o.config_hash == want), None)
        for extra in found:
            if extra is not keep and keep is not None:
                actions.append(Action(REMOVE, instance, f"duplicate container "
                                      f"{extra.container_id[:12]}"))
        if keep is not None:
            state = "running" if keep.running else "stopped"
            actions.append(Action(ADOPT, instance, f"config unchanged ({state})"))
        elif found:
            actions.append(Action(RECREATE, instance,
                                  f"config changed ({found[0].config_hash[:12]} -> {want[:12]})"))
        else:
            actions.append(Action(CREATE, instance, "no container yet"))
    for instance in sorted(set(by_instance) - set(desired)):
        actions.append(Action(REMOVE, instance, "no longer in the stack file"))
    return Convergence(tuple(actions))
