"""Adding a filter pass the way the README's "Extending" section says: a function with the
pass signature, one registry entry; the runner, the config and the CLI pick it up with no
other change, and so does the sharded runner (`--engine`), as the entry's `sharding` says."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from datagen import filtering
from datagen.config_file import load_config
from datagen.errors import ConfigError
from datagen.filters.base import FilterPass, PassContext, PassResult, Rejection
from datagen.io import read_records, rejects_path, stats_path
from datagen.records import Reject, Task
from tests.helpers import make_task, write_tasks

MIN_WORDS = 6


def short_instruction_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """The toy pass: drop tasks whose instruction has fewer than MIN_WORDS words."""
    kept, rejected = [], []
    for task in tasks:
        if len(task.instruction.split()) < MIN_WORDS:
            rejected.append(Rejection(task, "instruction too short"))
        else:
            kept.append(task)
    context.report["min_words"] = MIN_WORDS
    return kept, rejected


def test_a_registered_pass_runs_through_the_runner_config_and_stats(tmp_path, monkeypatch):
    # the one registry line (a pass with settings also names its section and model there)
    monkeypatch.setitem(filtering.PASSES, "short-instruction", FilterPass(short_instruction_pass))
    source = write_tasks(tmp_path / "raw.jsonl", [
        make_task("a", "Sort the list of numbers in ascending order."),
        make_task("b", "Sort these numbers, smallest first."),
    ])
    config = load_config(None, {"filter.passes": ("--passes", ["heuristics", "short-instruction"])})
    kept_path = tmp_path / "kept.jsonl"
    stats = filtering.run_filter(config, source, kept_path, rejects_path(kept_path), "test")

    assert [task.id for task in read_records(kept_path, Task)] == ["a"]
    [reject] = read_records(rejects_path(kept_path), Reject)
    assert (reject.stage, reject.reason, reject.task.id) == ("short-instruction", "instruction too short", "b")
    entry = stats["passes"][-1]
    assert (entry["pass"], entry["in"], entry["out"], entry["reasons"], entry["min_words"]) == (
        "short-instruction", 2, 1, {"instruction too short": 1}, 6)
    assert stats_path(kept_path).exists()


def test_a_registered_pass_runs_sharded_as_its_registry_line_says(tmp_path, monkeypatch):
    pytest.importorskip("datatrove")
    from datagen.engines.datatrove_run import EngineOptions
    from datagen.engines.sharded_filter import ScaleFilterPlan, run_scaled_filter
    from datagen.filters.base import PER_TASK

    monkeypatch.setitem(filtering.PASSES, "short-instruction", FilterPass(short_instruction_pass, sharding=PER_TASK))
    source = write_tasks(tmp_path / "raw.jsonl", [
        make_task(f"t{i}", "Sort the numbers." if i % 3 == 0 else f"Sort the list of {i} numbers in ascending order.")
        for i in range(9)])
    config = load_config(None, {"filter.passes": ("--passes", ["heuristics", "short-instruction"])})
    one = tmp_path / "one.jsonl"
    single = filtering.run_filter(config, source, one, rejects_path(one), "test")
    out = tmp_path / "sharded.jsonl"

    def sharded():
        plan = ScaleFilterPlan(source, out, rejects_path(out), tmp_path / "work", config, tasks=2)
        return run_scaled_filter(plan, "datatrove", EngineOptions(workers=1))

    stats = sharded()
    assert out.read_text() == one.read_text() and rejects_path(out).read_text() == rejects_path(one).read_text()
    assert [(e["pass"], e["in"], e["out"], e["reasons"]) for e in stats["passes"]] == [
        (e["pass"], e["in"], e["out"], e["reasons"]) for e in single["passes"]]

    # a registry line that does not say how the pass shards: refused sharded, in one line
    monkeypatch.setitem(filtering.PASSES, "short-instruction", FilterPass(short_instruction_pass))
    with pytest.raises(ConfigError, match="the short-instruction pass does not say how it shards"):
        sharded()


def test_an_unregistered_pass_name_lists_the_registered_ones():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"filter.passes": ("--passes", ["heuristics", "short-instruction"])})
    message = str(caught.value)
    assert message.startswith("--passes: Input should be 'heuristics'")
    assert all(repr(name) in message for name in filtering.PASSES)


def test_every_pass_section_is_a_config_key():
    sections = {entry.section for entry in filtering.PASSES.values() if entry.section}
    assert sections <= set(filtering.FilterConfig.model_fields)


def test_the_reject_vocabulary_names_registered_passes():
    from datagen import rejects

    generator_stages = {rejects.STAGE_READ, rejects.STAGE_BOOTSTRAP, rejects.STAGE_INSTANCES,
                        rejects.STAGE_ALPACA, rejects.STAGE_EVOL, rejects.STAGE_ORCA}
    assert rejects.NOT_ABOUT_OUTPUT_STAGES <= set(filtering.PASSES) | generator_stages
