"""The spending cap (`teacher.max_cost`, `--max-cost`): no request is sent that could take the
run past it, the run stops with one line and its spend, and a higher cap resumes it without
paying for anything twice. Scripted backends with a price table: the cap is arithmetic on
reported usage, no model needed."""

from __future__ import annotations

import json

import pytest

from datagen.config import SamplingParams
from datagen.errors import ConfigError
from datagen.teachers.spending import SpendingCapReached, SpendingLedger, worst_cost
from datagen.teachers.teacher import PriceTable, Teacher, TeacherConfig
from tests.helpers import ScriptedBackend

ONE_PER_TOKEN = PriceTable(input_per_million=1e6, output_per_million=1e6)  # a token costs 1


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_a_call_sends_what_fits_under_the_cap_and_a_higher_cap_goes_on(tmp_path):
    backend = ScriptedBackend(lambda prompt: "fine thanks")  # usage: prompt words + 2
    config = TeacherConfig(prices=ONE_PER_TOKEN, max_cost=70, cache_dir=str(tmp_path / "cache"))
    params = SamplingParams(temperature=0.0, max_tokens=4)
    teacher = Teacher(backend, config)
    teacher.ledger = SpendingLedger(tmp_path / "run.spend.json", 70, fresh=True)
    prompts = [ask("Say hello."), ask("Say bye."), ask("Say yes.")]
    # worst cost: every prompt byte a token, +16 for the template, + all 4 max_tokens: 30, 28, 28
    from datagen.teachers.base import Request

    assert worst_cost(Request.build(prompts[0], params), ONE_PER_TOKEN) == 10 + 16 + 4
    with pytest.raises(SpendingCapReached, match=r"spending cap 70 reached: 8\.0000 spent by this run .* the next "
                                                 r"request could cost up to 28\.0000; rerun with a higher --max-cost"):
        teacher.complete(prompts, params)
    assert backend.seen == ["Say hello.", "Say bye."]  # 30 + 28 reserved; a third 28 could pass 70
    assert teacher.ledger.spent == 8.0 and teacher.stats.cost == 8.0  # 2 prompt + 2 completion tokens each

    # the same cap again: 8 spent + 28 fits now that the reservations became real costs
    again = Teacher(backend, config)
    again.ledger = SpendingLedger(tmp_path / "run.spend.json", 70, fresh=True)
    replies = again.complete(prompts, params)
    assert [r.text for [r] in replies] == ["fine thanks"] * 3
    assert backend.seen == ["Say hello.", "Say bye.", "Say yes."]  # nothing answered was paid again
    assert again.ledger.spent == 12.0


def test_a_killed_runs_requests_in_flight_count_as_spent(tmp_path):
    ledger = SpendingLedger(tmp_path / "run.spend.json", 10, fresh=True)
    assert ledger.reserve(9) and not ledger.reserve(2)  # held by requests in flight when it died
    resumed = SpendingLedger(tmp_path / "run.spend.json", 10, fresh=True)  # they may have been billed
    assert resumed.spent == 9 and not resumed.reserve(2) and resumed.reserve(1)


def preferences_config(tmp_path, max_cost):
    from datagen.config_file import load_config
    from datagen.io import write_jsonl_atomic
    from tests.test_preferences import SEEDS, SETTINGS

    seeds = tmp_path / "seeds.jsonl"
    write_jsonl_atomic(seeds, SEEDS)
    config = load_config()
    config.teacher = TeacherConfig(cache_dir=str(tmp_path / "cache"), prices=ONE_PER_TOKEN, max_cost=max_cost)
    config.generate = config.generate.model_copy(update={
        "method": "preferences", "seeds": str(seeds), "out": str(tmp_path / "pairs.jsonl"), "num": 10, "seed": 7,
        "preferences": SETTINGS})
    return config


def test_a_capped_run_stops_under_its_cap_with_its_spend_and_resumes_with_a_higher_one(tmp_path):
    from datagen.generate import run_generate
    from tests.test_preferences import SampledScript

    backend = SampledScript()
    with pytest.raises(SpendingCapReached) as stop:
        run_generate(preferences_config(tmp_path, 2500), "test", lambda: Teacher(backend, TeacherConfig(
            cache_dir=str(tmp_path / "cache"), prices=ONE_PER_TOKEN, max_cost=2500)))
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    spent_first = summary["spend"]["spent"]
    assert summary["spend"]["max_cost"] == 2500 and spent_first <= 2500
    assert summary["spend"]["stopped"] == str(stop.value)
    assert summary["cost"] == pytest.approx(spent_first)
    sent_first = backend.sent
    assert 0 < sent_first < 29 and not (tmp_path / "pairs.jsonl").read_text()

    resumed = run_generate(preferences_config(tmp_path, 100_000), "test", lambda: Teacher(backend, TeacherConfig(
        cache_dir=str(tmp_path / "cache"), prices=ONE_PER_TOKEN, max_cost=100_000)))
    # a full run sends 29; everything the capped run was answered comes from the cache
    assert backend.sent == 29 and resumed["requests_sent"] == 29 - sent_first
    assert resumed["cache_hits"] == sent_first
    assert resumed["spend"]["spent"] == pytest.approx(spent_first + resumed["cost"])
    assert "stopped" not in resumed["spend"]


def test_an_api_teacher_without_prices_cannot_be_capped(tmp_path):
    from datagen.generate import run_generate

    backend = ScriptedBackend(lambda prompt: "x", name="openai")
    config = preferences_config(tmp_path, 5)
    config.teacher = config.teacher.model_copy(update={"prices": None})
    with pytest.raises(ConfigError, match=r"teacher.max_cost: the teacher has no prices"):
        run_generate(config, "test", lambda: Teacher(backend, config.teacher))


def test_the_estimate_pilots_teacher_keeps_the_cap(tmp_path):
    from datagen.estimate import TallyingTeacher

    inner = Teacher(ScriptedBackend(lambda prompt: "x"), TeacherConfig(cache_dir=str(tmp_path)))
    tallying = TallyingTeacher(inner)
    tallying.ledger = SpendingLedger(tmp_path / "pilot.spend.json", 1.0)
    assert inner.ledger is tallying.ledger  # the wrapped teacher reserves, not the wrapper


def test_orca_on_ray_cannot_be_capped(tmp_path):
    from datagen.generate import run_generate

    config = preferences_config(tmp_path, 5)
    config.generate = config.generate.model_copy(update={"method": "orca"})
    config.engine = config.engine.model_copy(update={"kind": "ray"})
    with pytest.raises(ConfigError, match="engine: ray streams all of orca's requests ahead of the loop"):
        run_generate(config, "test")
    assert not (tmp_path / "pairs.jsonl").exists()
