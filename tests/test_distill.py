"""`datagen distill`: the whole chain on the embedded model, resumable stage by stage."""

from __future__ import annotations

import json

import pytest

from datagen.config_file import load_config
from datagen.distill import STAGES, fingerprints
from tests.helpers import run_cli

TINY = """\
teacher: {{backend: local, batch_size: 4, cache_dir: {cache}}}
generate:
  method: self-instruct
  num: 3
  instances_per_task: 2
  self_instruct:
    prompts_per_batch: 1
    max_instance_rounds: 1
    max_stalled_batches: 30
    similarity_threshold: 0.95
    bootstrap_sampling: {{temperature: 0.7, top_p: 0.5, max_tokens: 200, stop: ["\\n\\n", "\\n16", "16.", "16 ."]}}
    instance_sampling: {{temperature: 0.0, max_tokens: 48}}
filter:
  passes: [exact-dedup, near-dedup]
export: {{validation: 0.0, test: 0.34}}
finetune: {{max_steps: {steps}, batch_size: 4, learning_rate: 1.0e-3, save_every: 1}}
eval: {{max_new_tokens: 24}}
distill: {{workdir: {workdir}}}
"""


def write_config(tmp_path, steps=2):
    path = tmp_path / "distill.yaml"
    path.write_text(TINY.format(cache=tmp_path / "cache", workdir=tmp_path / "work", steps=steps))
    return path


def test_a_change_reruns_its_stage_and_every_later_one(tmp_path):
    before = fingerprints(load_config(write_config(tmp_path, steps=2)))
    after = fingerprints(load_config(write_config(tmp_path, steps=3)))
    assert [stage for stage in STAGES if before[stage] != after[stage]] == ["finetune", "eval"]
    config = write_config(tmp_path)
    teacher_changed = load_config(config, {"teacher.model": ("--model", "other")})
    assert all(fingerprints(teacher_changed)[s] != before[s] for s in STAGES)
    cache_moved = load_config(config, {"teacher.cache_dir": ("--cache-dir", str(tmp_path / "elsewhere"))})
    assert fingerprints(cache_moved) == before  # where replies are cached does not change them


def test_unknown_stage_is_a_usage_error(tmp_path):
    result = run_cli("distill", str(write_config(tmp_path)), "--from", "deploy")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --from: expected one of generate, filter, export, finetune, eval, preferences, dpo, dpo-eval, "
        "got 'deploy'"
    )


def test_bad_config_names_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("finetune:\n  epochs: 2\n  lora_rank: 8\n")
    result = run_cli("distill", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {config}: finetune.lora_rank: unknown key"


@pytest.mark.slow
def test_distill_end_to_end_then_resume_skips_finished_stages(tmp_path):
    config = write_config(tmp_path)
    work = tmp_path / "work"
    first = run_cli("distill", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in STAGES:
        assert f"== {stage}\n" in first.stderr
    assert "before -> after" in first.stderr and "loss on teacher replies: base" in first.stderr

    raw = [json.loads(line) for line in (work / "raw.jsonl").read_text().splitlines()]
    assert len(raw) == 3
    splits = {name: [json.loads(line) for line in (work / "dataset" / f"{name}.jsonl").read_text().splitlines()]
              for name in ("train", "test")}
    assert splits["train"] and splits["test"]
    assert not {e["task_id"] for e in splits["train"]} & {e["task_id"] for e in splits["test"]}
    assert (work / "student" / "merged" / "config.json").exists()
    report = json.loads((work / "eval" / "report.json").read_text())
    assert report["examples"] == len(splits["test"])
    assert report["base"]["loss"] > 0 and report["tuned"]["loss"] > 0
    state = json.loads((work / "distill.json").read_text())
    assert all(state["stages"][s]["status"] == "done" for s in STAGES)

    again = run_cli("distill", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in STAGES:
        assert f"== {stage}: done before, skipped" in again.stderr

    # more training steps: only finetune and eval run again; the data is not regenerated
    raw_before = (work / "raw.jsonl").read_text()
    config.write_text(config.read_text().replace("max_steps: 2", "max_steps: 3"))
    third = run_cli("distill", str(config))
    assert third.returncode == 0, third.stderr[-3000:]
    for stage in ("generate", "filter", "export"):
        assert f"== {stage}: done before, skipped" in third.stderr
    assert "== finetune\n" in third.stderr and "== eval\n" in third.stderr
    assert (work / "raw.jsonl").read_text() == raw_before
    assert json.loads((work / "student" / "summary.json").read_text())["step"] == 3
