"""Unit-test fixtures: a real stack directory made once by `synapsectl init`, copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from supervisor.init import init_stack


@pytest.fixture(scope="session")
def pristine_stack(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pristine") / "stack"
    init_stack(directory, "example.test", isolated=True)
    return directory


@pytest.fixture
def stack_dir(pristine_stack, tmp_path) -> Path:
    target = tmp_path / "stack"
    shutil.copytree(pristine_stack, target)
    return target


def edit_yaml(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
