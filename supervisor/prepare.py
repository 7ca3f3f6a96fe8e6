"""Everything that must hold before any container is touched, in one call.

`prepare(stack_file)` loads the stack, reads its inputs, renders every process's config and lints
the lot. `synapsectl validate`, `synapsectl plan` and the daemon all start here, so they accept
and refuse exactly the same stacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import lifecycle, lint, mounts, stackfile, synapse_config
from .inputs import Inputs, read_inputs
from .stack import Stack


@dataclass(frozen=True)
class Prepared:
    stack: Stack
    inputs: Inputs
    rendered: synapse_config.Rendered
    plan: lifecycle.Plan
    warnings: tuple[str, ...]


def prepare(stack_file: str | Path,
            paths: synapse_config.Paths = synapse_config.Paths()) -> Prepared:
    stack = stackfile.load(stack_file)
    inputs = read_inputs(stack)
    rendered = synapse_config.render(stack, inputs, paths)
    mounts.check_settings(stack, rendered.files["shared.yaml"])
    warnings = lint.lint(stack, inputs, rendered)
    return Prepared(stack=stack, inputs=inputs, rendered=rendered,
                    plan=lifecycle.plan(stack), warnings=tuple(warnings))
