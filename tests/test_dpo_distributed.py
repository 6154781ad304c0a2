"""DPO under torchrun on CPU (gloo): 2 DDP ranks train exactly what one process accumulating
over the same global batch trains (losses, rewards, reward accuracy, margin step by step, and
the final figures over all pairs gathered across ranks); kill -9 of one rank, then a rerun
resumes from the last checkpoint and ends on those same numbers; bad settings are one line.

The student is a tiny Llama built from a config (the embedded tokenizer): DDP equality needs the
same arithmetic on both sides, not real weights, so each torchrun launch costs its start-up, not
training. Two launches (the killed one and its resume) plus one in-process reference run.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import run_cli, single_error_line
from tests.test_distributed_sft import kill_rank_after_checkpoint, log_of
from tests.test_dpo import tiny_model, write_pairs

# dropout 0: the ranks draw other dropout masks than one process would. 8 pairs in
# micro-batches of 2, 2 per step: 2 steps an epoch, so 6 steps cross two epoch boundaries.
SETTINGS = dict(dropout=0.0, batch_size=2, learning_rate=1e-2, r=8, alpha=16, max_steps=6, save_every=2,
                warmup_ratio=0.0, beta=0.1, merge=False)
FIGURES = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin")


def config_file(path, **settings) -> str:
    path.write_text("dpo:\n" + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in settings.items()))
    return str(path)


def same(found: list[float], expected: list[float]) -> bool:
    # relative 1e-5; the absolute part covers the log's rounding to 6 decimals near zero
    return found == pytest.approx(expected, rel=1e-5, abs=2e-6)


@pytest.mark.parametrize(("args", "expected"), [
    (["--nproc", "2", "--distributed", "fsdp"], "error: dpo: distributed: fsdp is not supported"),
    (["--nproc", "0"], "error: --nproc: must be at least 1 (got 0)"),
])
def test_bad_distributed_dpo_settings_are_one_error_line(tmp_path, args, expected):
    data = write_pairs(tmp_path / "pairs.jsonl", 2)
    result = run_cli("finetune", str(data), "--method", "dpo", "--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert single_error_line(result).startswith(expected)
    assert not (tmp_path / "out").exists()


def test_bad_pairs_are_one_error_line_before_any_rank_starts(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": "A"}) + "\n")
    result = run_cli("finetune", str(data), "--method", "dpo", "--out", str(tmp_path / "out"), "--nproc", "2")
    assert result.returncode == 1
    assert single_error_line(result) == f'error: {data}:1: missing "rejected" (a preference pair has prompt, ' \
                                        'chosen, rejected)'


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains_and_resume_after_kill_9(tmp_path, embedded_model_path):
    from transformers import AutoTokenizer

    from datagen.finetune.config import DPOConfig
    from datagen.finetune.dpo import train_dpo

    student = str(tmp_path / "tiny")
    tiny_model(student, AutoTokenizer.from_pretrained(embedded_model_path))
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    one = train_dpo(DPOConfig(base=student, grad_accum=2, **SETTINGS), data, tmp_path / "one", show_progress=False)
    expected = log_of(tmp_path / "one")

    out = tmp_path / "out"
    config = config_file(tmp_path / "c.yaml", base=student, **SETTINGS)
    command = [sys.executable, "-m", "datagen.cli", "finetune", str(data), "--method", "dpo", "--out", str(out),
               "--config", config, "--nproc", "2"]
    stderr = kill_rank_after_checkpoint(command, out / "checkpoints" / "step-000002" / "state.pt")
    assert "2 ranks (ddp, gloo), global batch 4 pairs" in stderr
    assert not (out / "adapter").exists()
    assert (out / "reference_logps.pt").exists()  # rank 0 wrote the gathered reference

    second = run_cli("finetune", str(data), "--method", "dpo", "--out", str(out), "--config", config,
                     "--nproc", "2", env={"DATAGEN_PROGRESS_INTERVAL": "0"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "on 2 ranks" in second.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and 2 <= summary["resumed_from_step"] < 6
    assert summary["world_size"] == 2 and summary["distributed"] == "ddp" and summary["global_batch"] == 4
    assert summary["reference_seconds"] == 0  # the cached reference, not a second pass
    assert len(summary["peak_memory_mib_per_rank"]) == 2

    log = log_of(out)
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert [e["pairs"] for e in log] == [e["pairs"] for e in expected] == [4] * 6
    assert [e["tokens"] for e in log] == [e["tokens"] for e in expected]
    for key in FIGURES:
        assert same([e[key] for e in log], [e[key] for e in expected]), key
    assert log[-1]["loss"] < log[0]["loss"]  # it learnt something, so the comparison means something
    # after training, over all 8 pairs: each rank scored half, the sums gathered
    for key in ("reward_accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert same([summary[key]], [one[key]]), key
    assert (out / "adapter" / "adapter_model.safetensors").exists()
