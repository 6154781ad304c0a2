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
    copy_overlap: null  # its recording predates the 0.7 default (tests/test_self_instruct.py covers it)
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
def test_distill_end_to_end_then_resume_skips_finished_stages(tmp_path, recorded, monkeypatch):
    """The whole chain: the teacher's replies are the embedded model's, recorded (tests/recorded.py);
    the student's LoRA steps, merge and eval run live."""
    recorded("distill_end_to_end").install(monkeypatch)
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
    # the untuned embedded model against the merged student: two different models were scored
    assert report["base"]["model"] == "smollm2-135m" and report["tuned"]["model"] == str(work / "student" / "merged")
    assert report["tuned"]["loss"] != report["base"]["loss"]
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


# ---------------------------------------------------------------- distill.dpo: the `student` responder


def tiny_llama(folder, tokenizer, seed: int) -> str:
    """A randomly initialised tiny Llama with the embedded tokenizer (nothing downloaded)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


PREFERENCE_STAGES_ONLY = """\
teacher: {{backend: local, model: {teacher}, batch_size: 8, cache_dir: {cache}}}
generate:
  preferences:
    responders:
      - name: teacher
        sampling: {{temperature: 0.0, max_tokens: 12, stop: ["e"]}}
      - name: student
        teacher: {{backend: local, model: student, batch_size: 8}}
        sampling: {{temperature: 0.0, max_tokens: 12, stop: ["e"]}}
    chosen_responder: teacher
    responses_per_prompt: 2
export: {{validation: 0.0, test: 0.34}}
dpo: {{max_steps: 1, batch_size: 2}}
eval: {{max_new_tokens: 4, max_examples: 2}}
distill: {{workdir: {workdir}, dpo: true, pairs: 6}}
"""


def test_the_student_responder_answers_with_this_runs_sft_student(tmp_path, embedded_model_path):
    """The preferences stage resolves a responder whose model is `student` to this run's SFT
    student (`student/merged`, cached under the SFT stage's fingerprint), counts it in the pairs'
    summary, and dpo and dpo-eval run on from it. Tiny random models stand in for teacher and
    student; the stages before run here as done (a resumed workdir)."""
    from transformers import AutoTokenizer

    from datagen.distill import STAGES, run_distill
    from datagen.io import write_jsonl_atomic
    from datagen.records import Instance, Task

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path)
    work = tmp_path / "work"
    teacher = tiny_llama(tmp_path / "teacher", tokenizer, seed=1)
    student = tiny_llama(work / "student" / "merged", tokenizer, seed=2)
    write_jsonl_atomic(work / "kept.jsonl", [
        Task(id=f"task-{n}", instruction=f"Name a word with {n} letters.", instances=[Instance(output="word")])
        for n in range(6)])
    path = tmp_path / "distill.yaml"
    path.write_text(PREFERENCE_STAGES_ONLY.format(teacher=teacher, cache=tmp_path / "cache", workdir=work))
    config = load_config(path)
    wanted = fingerprints(config)
    (work / "distill.json").write_text(json.dumps(
        {"stages": {stage: {"fingerprint": wanted[stage], "status": "done"} for stage in STAGES}}))
    (work / "eval").mkdir()
    (work / "eval" / "report.json").write_text("{}")  # the SFT eval, done before

    said = []
    result = run_distill(config, "test", say=said.append)
    assert result["stages"] == {**{stage: "skipped" for stage in STAGES},
                                "preferences": "ran", "dpo": "ran", "dpo-eval": "ran"}
    pairs = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    assert pairs, (work / "pairs.rejects.jsonl").read_text()
    for pair in pairs:
        responders = pair["lineage"]["responders"]
        assert (responders["chosen"]["name"], responders["chosen"]["model"]) == ("teacher", teacher)
        assert (responders["rejected"]["name"], responders["rejected"]["model"]) == ("student", student)
    # the student's replies are cached under this SFT run's fingerprint, not where the teacher's are
    assert (work / "student-cache" / wanted["finetune"][:16] / "requests.sqlite").exists()
    summary = json.loads((work / "pairs.summary.json").read_text())
    counted = summary["responders"]["student"]
    assert (counted["backend"], counted["model"], counted["requests_sent"]) == ("local", student, 6)
    assert any(line.startswith(f"responder student local:{student}: 6 requests") for line in "\n".join(
        said).splitlines())
    dpo = json.loads((work / "dpo-student" / "summary.json").read_text())
    assert dpo["base_path"] == student and dpo["step"] == 1
    assert result["dpo_report"]["base"] == student
