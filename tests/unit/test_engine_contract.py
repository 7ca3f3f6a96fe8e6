"""DockerEngine implements the backend contract (`engine.Engine`) method for method, so a second
backend written against the contract fits where DockerEngine does."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import supervisor

from supervisor.docker_adapter import DockerEngine
from supervisor.engine import Engine


def contract_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(Engine).items()
            if callable(fn) and not name.startswith("_")}


def test_the_contract_names_every_call_the_supervisor_makes():
    package = Path(supervisor.__file__).parent
    called = set()
    for path in package.glob("*.py"):
        if path.name not in ("docker_adapter.py", "engine.py"):
            called |= set(re.findall(r"\bengine\.([a-z_]+)\b", path.read_text()))
    assert called, "no engine calls found: the pattern is wrong"
    assert called - set(contract_methods()) == set()


def test_docker_engine_has_every_contract_method_with_the_same_parameters():
    for name, wanted in contract_methods().items():
        found = getattr(DockerEngine, name, None)
        assert callable(found), f"DockerEngine lacks {name}"
        assert list(inspect.signature(found).parameters) == list(wanted.parameters), name
        for param, spec in wanted.parameters.items():
            assert inspect.signature(found).parameters[param].default == spec.default, \
                (name, param)
