"""Every example config in the repository loads, and its header is the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from datagen.config_file import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path):
    load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# datagen ") and str(path.relative_to(path.parents[1])) in first
