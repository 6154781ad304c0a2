"""lm-evaluation-harness benchmarks (datagen.finetune.harness): IFEval on the shipped prompts with
lm-eval's own checks, offline; a user's task folder through `include`; bad names and folders as
one-line InputErrors. One slow test runs both tasks on the embedded model."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from datagen.errors import InputError
from datagen.finetune import harness

TASK_FOLDER = Path(__file__).parent / "data" / "lm_eval_task"  # a user's task with local data


def test_the_shipped_ifeval_prompts_are_the_541_of_the_paper():
    rows = [json.loads(line) for line in harness.IFEVAL_DATA.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 541 and len({row["key"] for row in rows}) == 541
    assert all(len(row["instruction_id_list"]) == len(row["kwargs"]) for row in rows)
    assert (harness.IFEVAL_DIR / "NOTICE").read_text().count("Apache License") == 1


def test_ifeval_checks_load_offline_with_the_shipped_punkt(monkeypatch):
    import nltk

    def no_download(*args, **kwargs):
        raise AssertionError(f"nltk.download{args} at run time")

    monkeypatch.setattr(nltk, "download", no_download)
    harness.use_shipped_punkt()
    # lm-eval's module looks punkt_tab up (and would download it) when imported
    importlib.reload(importlib.import_module("lm_eval.tasks.ifeval.instructions_util"))
    assert nltk.sent_tokenize("Dr. Smith went to Washington. He arrived at 5 p.m. on Monday.") == [
        "Dr. Smith went to Washington.", "He arrived at 5 p.m. on Monday."]


def test_ifeval_is_lm_evals_own_task_reading_the_local_file():
    manager = harness.task_manager(tasks=["ifeval"])
    [config] = harness.task_specs(["ifeval"], manager)
    assert config["task"] == "ifeval" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"] == {"data_files": {"train": str(harness.IFEVAL_DATA)}}
    # the checks are lm-eval's, not a copy
    assert config["process_results"].__module__ == "lm_eval.tasks.ifeval.utils"
    assert [m["metric"] for m in config["metric_list"]] == list(harness.IFEVAL_METRICS)
    assert config["generation_kwargs"]["max_gen_toks"] == 1280


def test_a_missing_task_or_include_folder_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"missing: --lm-eval-include needs a folder") as error:
        harness.task_manager([tmp_path / "missing"], ["ifeval"])
    assert "\n" not in str(error.value)
    manager = harness.task_manager([TASK_FOLDER], ["tiny_capitals"])
    with pytest.raises(InputError, match=r"unknown lm-eval task 'no_such_task'") as error:
        harness.task_specs(["tiny_capitals", "no_such_task"], manager)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="backend 'tpu'"):
        harness.choose_backend("tpu")
    with pytest.raises(InputError, match="not a model folder"):
        harness.run_lm_eval(str(tmp_path), ["ifeval"])


def test_metrics_drop_filters_and_stderr():
    results = {"ifeval": {"alias": "ifeval", "prompt_level_strict_acc,none": 0.25,
                          "prompt_level_strict_acc_stderr,none": "N/A", "inst_level_loose_acc,none": 0.5}}
    assert harness.flat_metrics(results) == {"ifeval": {"prompt_level_strict_acc": 0.25, "inst_level_loose_acc": 0.5}}


@pytest.mark.slow
def test_ifeval_and_a_users_task_on_the_embedded_model(embedded_model_path, tmp_path):
    metrics = harness.run_lm_eval(embedded_model_path, ["ifeval", "tiny_capitals"], include=[TASK_FOLDER],
                                  limit=3, max_gen_toks=24, backend="hf", out_dir=tmp_path)
    assert set(metrics["ifeval"]) == set(harness.IFEVAL_METRICS)
    assert all(0.0 <= value <= 1.0 for value in metrics["ifeval"].values())
    assert set(metrics["tiny_capitals"]) == {"acc"} and 0.0 <= metrics["tiny_capitals"]["acc"] <= 1.0
    samples = [json.loads(line) for line in (tmp_path / "samples_ifeval.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(sample["resps"][0][0] for sample in samples)
    # the chat template was applied: the prompt the model saw is SmolLM2's chat turn
    context, generation = samples[0]["arguments"][0]
    assert "<|im_start|>user\n" + samples[0]["doc"]["prompt"] in context and generation["max_gen_toks"] == 24
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == metrics and saved["run"]["limit"] == 3
