"""DPO (`datagen finetune PAIRS --method dpo`): the loss and rewards against hand-computed
values, log-probabilities over the response tokens only, pair reading, a real LoRA DPO run on
the embedded model whose reward accuracy rises and margin grows, resume after a SIGKILL, and
no LoRA dropout by default (QLoRA DPO on CPU: tests/test_qlora_cpu.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from datagen.errors import InputError
from datagen.finetune.config import DPOConfig, FinetuneConfig
from datagen.finetune.dpo import train_dpo
from datagen.finetune.losses import dpo_loss, sequence_logps
from datagen.finetune.pairs import Pair, encode_pair, load_pairs
from tests.helpers import run_cli


def log1p_exp(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), by hand."""
    return math.log(1 + math.exp(x))


# policy and reference log-probs of two pairs: h = (pc - pr) - (rc - rr) = 2 and -1
POLICY_C, POLICY_R, REF_C, REF_R = [-10.0, -20.0], [-12.0, -15.0], [-11.0, -20.0], [-11.0, -16.0]


def terms(**options):
    import torch

    return dpo_loss(*(torch.tensor(v) for v in (POLICY_C, POLICY_R, REF_C, REF_R)), **options)


def test_sigmoid_loss_and_rewards_by_hand():
    result = terms(beta=0.5)
    # -log sigmoid(beta h) = log(1 + e^(-beta h)), beta h = 1 and -0.5
    assert result.losses.tolist() == pytest.approx([log1p_exp(-1.0), log1p_exp(0.5)], abs=1e-6)
    assert result.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])  # 0.5 * (pc - rc)
    assert result.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])  # 0.5 * (pr - rr)


def test_label_smoothing_mixes_in_the_flipped_preference():
    result = terms(beta=0.5, label_smoothing=0.1)
    expected = [0.9 * log1p_exp(-1.0) + 0.1 * log1p_exp(1.0), 0.9 * log1p_exp(0.5) + 0.1 * log1p_exp(-0.5)]
    assert result.losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_ipo_loss_by_hand():
    result = terms(beta=0.5, loss="ipo")
    assert result.losses.tolist() == pytest.approx([(2 - 1) ** 2, (-1 - 1) ** 2])  # (h - 1/(2 beta))^2


def test_ipo_compares_log_probs_averaged_over_response_tokens():
    import torch

    from datagen.finetune.pairs import pair_terms

    config = DPOConfig(beta=0.5, loss="ipo")
    logps, counts = torch.tensor([-10.0, -12.0]), torch.tensor([5, 4])  # chosen, rejected of one pair
    reference = (torch.tensor([-5.0]), torch.tensor([-8.0]), torch.tensor([5]), torch.tensor([4]))
    result = pair_terms(logps, counts, [0], reference, config)
    h = (-10 / 5 - -12 / 4) - (-5 / 5 - -8 / 4)  # = 1 - 1 = 0
    assert result.losses.tolist() == pytest.approx([(h - 1) ** 2])


# ---------------------------------------------------------------- log-probs and pairs, real tokenizer


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


def tiny_model(folder, tokenizer):
    """A randomly initialised tiny Llama with the embedded tokenizer (nothing downloaded)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def test_only_the_final_reply_and_its_eos_count(tokenizer):
    pair = Pair((("user", "Hi"), ("assistant", "Hello."), ("user", "Add 2 and 3.")), "It is 5.", "It is 6.",
                "t:1")
    encoded = encode_pair(tokenizer, pair)
    for side, reply in ((encoded.chosen, "It is 5."), (encoded.rejected, "It is 6.")):
        supervised = [token for token, label in zip(side.input_ids, side.labels) if label != -100]
        assert tokenizer.decode(supervised) == reply + tokenizer.eos_token


def test_sequence_log_prob_sums_the_response_tokens(tokenizer, tmp_path):
    import torch

    from datagen.finetune.pairs import collate_pairs

    model = tiny_model(tmp_path, tokenizer)
    pairs = [encode_pair(tokenizer, Pair((("user", f"Add {a} and 1."),), f"It is {a + 1}.", "No idea at all.",
                                          f"t:{a}")) for a in (3, 40)]
    batch = collate_pairs(pairs, [0, 1], tokenizer.pad_token_id)
    with torch.no_grad():
        fast, counts = sequence_logps(model, batch, fast=True)
        full, _ = sequence_logps(model, batch, fast=False)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = []
    for row in range(4):  # chosen 0, chosen 1, rejected 0, rejected 1
        total = 0.0
        for position, label in enumerate(batch["labels"][row].tolist()):
            if label != -100:
                total += float(torch.log_softmax(logits[row, position - 1], -1)[label])
        by_hand.append(total)
    assert fast.tolist() == pytest.approx(by_hand, abs=1e-4)
    assert full.tolist() == pytest.approx(by_hand, abs=1e-4)
    replies = ["It is 4.", "It is 41.", "No idea at all.", "No idea at all."]
    assert counts.tolist() == [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in replies]  # + EOS


def test_pairs_read_ours_and_trl_strings_and_name_bad_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "A"}],
                    "rejected": [{"role": "assistant", "content": "B"}], "score_chosen": 9}) + "\n"
        + json.dumps({"prompt": "Q2", "chosen": "A2", "rejected": "B2"}) + "\n")
    assert load_pairs(path) == [Pair((("user", "Q"),), "A", "B", f"{path}:1"),
                                Pair((("user", "Q2"),), "A2", "B2", f"{path}:2")]
    path.write_text(json.dumps({"prompt": "Q", "chosen": "A"}) + "\n")
    with pytest.raises(InputError, match=r'pairs.jsonl:1: missing "rejected"'):
        load_pairs(path)
    path.write_text(json.dumps({"prompt": "Q", "chosen": 3, "rejected": "B"}) + "\n")
    with pytest.raises(InputError, match=r'pairs.jsonl:1: field "chosen": expected a string or one assistant'):
        load_pairs(path)


@pytest.mark.parametrize(("yaml", "args", "expected"), [
    ("dpo:\n  packing: true\n", [], "dpo: Value error, packing is an SFT setting (the finetune: section); "
                                   "DPO does not use it: remove it"),
    ("", ["--packing"], "--packing: only for SFT (--method lora or qlora)"),
])
def test_an_sft_only_setting_for_dpo_is_one_error_line_naming_it(tmp_path, yaml, args, expected):
    """DPO's config has no SFT data options; one that was set (in a file written when DPO
    silently ignored them, or as a flag) is named, before anything loads."""
    from tests.helpers import single_error_line

    config = tmp_path / "dpo.yaml"
    config.write_text(yaml)
    data = write_pairs(tmp_path / "pairs.jsonl", 2)
    result = run_cli("finetune", str(data), "--method", "dpo", "--out", str(tmp_path / "out"), "--config",
                     str(config), *args)
    assert result.returncode == 2
    assert single_error_line(result) == (f"error: {config}: {expected}" if yaml else f"error: {expected}")
    assert not (tmp_path / "out").exists()


def test_resumed_checkpoints_of_other_settings_are_refused(tokenizer, tmp_path):
    from datagen.errors import DatagenError

    tiny_model(tmp_path / "base", tokenizer)
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    settings = dict(base=str(tmp_path / "base"), max_steps=1, batch_size=2, merge=False)
    summary = train_dpo(DPOConfig(**settings), data, tmp_path / "out", show_progress=False)
    assert summary["finished"] and summary["reference"] == "precomputed"
    assert (tmp_path / "out" / "reference_logps.pt").exists()
    # the policy trained without LoRA dropout, as the reference is scored (SFT keeps its 0.05)
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    assert summary["config"]["dropout"] == 0.0 and FinetuneConfig().dropout == 0.05
    with pytest.raises(DatagenError, match="checkpoints were made with other data or settings"):
        train_dpo(DPOConfig(**settings, beta=0.5), data, tmp_path / "out", show_progress=False)


def test_reference_on_the_fly_trains_the_same_as_precomputed(tokenizer, tmp_path):
    tiny_model(tmp_path / "base", tokenizer)
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    settings = dict(base=str(tmp_path / "base"), max_steps=3, batch_size=2, merge=False, dropout=0.0,
                    learning_rate=1e-2)
    logs = []
    for name, precompute in (("pre", True), ("fly", False)):
        train_dpo(DPOConfig(**settings, precompute_reference=precompute), data, tmp_path / name, show_progress=False)
        logs.append([json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()])
    assert [e["loss"] for e in logs[0]] == pytest.approx([e["loss"] for e in logs[1]], abs=1e-5)
    assert [e["margin"] for e in logs[0]] == pytest.approx([e["margin"] for e in logs[1]], abs=1e-5)
    assert logs[0][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 1


# ---------------------------------------------------------------- real LoRA DPO, the embedded model


def arithmetic_pairs(count: int, seed: int = 0) -> list[dict]:
    """Right sums chosen over wrong ones, in our preference record shape."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        wrong = a + b + rng.choice([-11, -3, 7, 13])
        rows.append({"prompt": [{"role": "user", "content": f"Add {a} and {b}."}],
                     "chosen": [{"role": "assistant", "content": f"The sum of {a} and {b} is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"The sum of {a} and {b} is {wrong}."}]})
    return rows


def write_pairs(path, count: int, seed: int = 0):
    path.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_pairs(count, seed)))
    return path


TINY_DPO = dict(batch_size=4, learning_rate=2e-3, r=8, alpha=16, max_steps=6, save_every=2, warmup_ratio=0.0,
                beta=0.1)


@pytest.fixture(scope="module")
def dpo_trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo")
    data = write_pairs(folder / "pairs.jsonl", 16)
    summary = train_dpo(DPOConfig(**TINY_DPO, merge=False), data, folder / "out", show_progress=False)
    return folder, data, summary


@pytest.mark.slow
def test_lora_dpo_raises_reward_accuracy_and_margin(dpo_trained):
    folder, _data, summary = dpo_trained
    log = [json.loads(line) for line in (folder / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert summary["finished"] and summary["pairs"] == 16 and summary["tokens_per_s"] > 0
    # step 1 sees the policy equal to the reference (the adapter starts at zero)
    assert log[0]["margin"] == pytest.approx(0.0, abs=0.05)
    assert summary["reward_accuracy"] > max(0.75, log[0]["reward_accuracy"])
    assert summary["margin"] > log[0]["margin"] + 0.1
    assert log[-1]["loss"] < log[0]["loss"]
    assert (folder / "out" / "adapter" / "adapter_model.safetensors").exists()

    from datagen.finetune.dpo_eval import evaluate_pairs

    # scored again from the saved adapter, the training pairs give the run's own final figures ...
    again = evaluate_pairs(folder / "out", folder / "pairs.jsonl")
    assert again["pairs"] == 16
    for key in ("reward_accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert again[key] == pytest.approx(summary[key], rel=1e-4, abs=1e-5), key
    # ... and unseen pairs of the same kind are preferred too: it learnt the kind, not the pairs
    held_out = write_pairs(folder / "held_out.jsonl", 8, seed=1)  # same shape, other numbers
    report = evaluate_pairs(folder / "out", held_out)
    assert report["pairs"] == 8 and report["reward_accuracy"] > 0.5 and report["margin"] > 0


@pytest.mark.slow
def test_dpo_resume_after_sigkill_ends_where_an_unbroken_run_ends(dpo_trained, tmp_path):
    _folder, data, _summary = dpo_trained
    config = tmp_path / "dpo.yaml"
    config.write_text("dpo:\n" + "".join(f"  {k}: {v}\n" for k, v in TINY_DPO.items()) + "  merge: false\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "datagen.cli", "finetune", str(data), "--method", "dpo", "--out", str(out),
               "--config", str(config)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "step-000002" / "state.pt").exists():
        assert first.poll() is None, "dpo ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "adapter").exists()

    second = run_cli("finetune", str(data), "--method", "dpo", "--out", str(out), "--config", str(config))
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["finished"] and resumed["resumed_from_step"] >= 2
    unbroken = [json.loads(line) for line in (_folder / "out" / "train_log.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in again] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "margin", "reward_accuracy"):
        assert [e[key] for e in again] == pytest.approx([e[key] for e in unbroken], abs=1e-4)


@pytest.mark.gpu
@pytest.mark.slow  # the embedded model
def test_qlora_dpo_trains_on_a_gpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("bitsandbytes")
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    summary = train_dpo(DPOConfig(method="qlora", **TINY_DPO), data, tmp_path / "out", show_progress=False)
    assert summary["finished"] and summary["compute_dtype"] in ("bfloat16", "float16")
    assert summary["margin"] > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")


def test_distill_dpo_stages_chain_onto_sft_and_each_other(tmp_path):
    from datagen.config_file import load_config
    from datagen.distill import ALL_STAGES, fingerprints

    def prints(**overrides):
        return fingerprints(load_config(None, {key: (f"--{key}", value) for key, value in overrides.items()}))

    before = prints()
    changed = {
        "dpo.beta": ["dpo", "dpo-eval"],
        "generate.preferences.margin": ["preferences", "dpo", "dpo-eval"],
        "finetune.max_steps": ["finetune", "eval", "preferences", "dpo", "dpo-eval"],
        "eval.max_examples": ["eval", "dpo-eval"],
    }
    values = {"dpo.beta": 0.3, "generate.preferences.margin": 2.0, "finetune.max_steps": 7, "eval.max_examples": 5}
    for key, stages in changed.items():
        after = prints(**{key: values[key]})
        assert [s for s in ALL_STAGES if after[s] != before[s]] == stages, key


# ---------------------------------------------------------------- datagen eval --judge on a DPO student


def test_judged_win_rate_of_dpo_over_sft_in_both_orders(tokenizer, tmp_path, monkeypatch):
    import datagen.teachers.teacher as teachers
    from datagen.finetune.dpo_eval import evaluate_dpo
    from datagen.finetune.evaluate import EvalConfig
    from datagen.teachers.teacher import Teacher, TeacherConfig
    from tests.helpers import ScriptedBackend

    tiny_model(tmp_path / "base", tokenizer)  # the "SFT student" the DPO run starts from
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    train_dpo(DPOConfig(base=str(tmp_path / "base"), max_steps=2, batch_size=2, learning_rate=0.5, warmup_ratio=0.0,
                        dropout=0.0), data, tmp_path / "out", show_progress=False)
    settings = EvalConfig(judge=True, max_new_tokens=8, samples_in_report=4)

    def judged_by(reply):
        """evaluate_dpo with a scripted judge (the only double: the verdicts); the prompts it saw."""
        backend = ScriptedBackend(reply)
        monkeypatch.setattr(teachers, "make_teacher", lambda config: Teacher(backend, config))
        report = evaluate_dpo(settings, data, tmp_path / "out", tmp_path / "eval", teacher_config=TeacherConfig(
            cache="off"))
        return report, backend.seen

    # a judge that always prefers the answer shown first: each pair is one win and one loss
    report, seen = judged_by(lambda prompt: "Verdict: A\nReason: first is best.")
    assert report["judge"] == {"win_rate": 0.5, "judgements": 8, "unreadable": 0, "judge": "scripted:script"}
    samples = report["samples"]
    assert [s["request"] for s in samples] == [row["prompt"][0]["content"] for row in map(json.loads, data.open())]
    assert all(s["dpo"] != s["sft"] for s in samples)  # the judge below can tell them apart
    for sample, dpo_first, sft_first in zip(samples, seen[0::2], seen[1::2]):  # each pair in both orders
        assert f"Request:\n{sample['request']}\n\nAnswer A:\n{sample['dpo']}\n\nAnswer B:\n{sample['sft']}\n" \
            in dpo_first
        assert f"Answer A:\n{sample['sft']}\n\nAnswer B:\n{sample['dpo']}\n" in sft_first

    # a judge that prefers the DPO student's reply, says tie on one request and is unreadable on another
    dpo_replies = {s["dpo"] for s in samples}

    def verdict(prompt):
        if samples[1]["request"] in prompt:
            return "I cannot decide."
        if samples[2]["request"] in prompt:
            return "Verdict: tie"
        answer_a = prompt.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
        return "Verdict: A" if answer_a in dpo_replies else "Verdict: B"

    report, _seen = judged_by(verdict)
    assert report["judge"]["win_rate"] == pytest.approx(round(5 / 6, 4))  # wins 1, 1, 1, 1; tie 0.5, 0.5
    assert (report["judge"]["judgements"], report["judge"]["unreadable"]) == (6, 2)
    assert "| judged win rate of DPO over SFT (scripted:script, both orders) | 0.833 |" in (
        tmp_path / "eval" / "report.md").read_text()
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["judge"] == report["judge"]
