"""QLoRA on CPU (bitsandbytes' CPU backend): `datagen finetune --method qlora` and QLoRA DPO
train a tiny student stored in 4-bit NF4 with LoRA on top (bf16 matmuls in the DPO run and the
student check; SFT's compute dtype is auto's pick for this CPU); the loss falls, the adapter
saves, and merged into the float base it loads in plain transformers. Also: what QLoRA needs
where, and that the start-up checks' eval passes leave the 4-bit weights trainable.

The student is the tiny Llama of tests/test_finetune.py (2 layers of width 16, the embedded
tokenizer), so each run costs seconds."""

from __future__ import annotations

import json
import math

import pytest

from datagen.finetune.config import FinetuneConfig
from datagen.finetune.model import Precision, choose_precision, precision_for, qlora_problem
from tests.helpers import run_cli
from tests.test_dpo import write_pairs
from tests.test_finetune import arithmetic_batch, arithmetic_rows, tiny_model, write_jsonl

SETTINGS = dict(batch_size=4, learning_rate=1e-2, r=8, alpha=16, max_steps=6, warmup_ratio=0.0, save_every=3)


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


def config_file(path, section: str, **settings) -> str:
    path.write_text(f"{section}:\n" + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in settings.items()))
    return str(path)


def log_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_plain_merged_model_is_base_plus_adapter(base_folder, out):
    """merged/ loads in plain transformers (no quantisation left) and gives the logits of the
    float base with the saved adapter on it; the adapter changed the model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not [m for m in merged.modules() if "4bit" in type(m).__name__]
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.inference_mode():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()(input_ids=ids).logits
        direct = merged(input_ids=ids).logits
    assert torch.allclose(adapted, direct, atol=1e-4)
    assert (adapted - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- what QLoRA needs where


@pytest.mark.parametrize(("device", "cuda", "version", "problem"), [
    ("cpu", False, "0.50.2", None),
    ("cpu", True, "0.50.0", None),
    ("cpu", False, None, "--method qlora needs bitsandbytes: pip install 'bitsandbytes>=0.50'"),
    ("cpu", False, "0.45.5", "--method qlora on CPU needs bitsandbytes >= 0.50 (its CPU backend), this is 0.45.5: "
                             "pip install 'bitsandbytes>=0.50'"),
    ("cuda", True, "0.45.5", None),  # CUDA kernels predate the CPU backend
    ("cuda:1", True, None, "--method qlora needs bitsandbytes: pip install 'bitsandbytes>=0.50'"),
    ("cuda", False, "0.50.2", "--method qlora: device cuda is not available (no CUDA device here); "
                              "use device cpu or auto"),
    ("mps", False, "0.50.2", "--method qlora runs on CUDA or CPU, not mps"),
])
def test_what_qlora_needs_on_each_device(device, cuda, version, problem):
    assert qlora_problem(device, cuda, version) == problem


def test_qlora_computes_in_bf16_where_the_cpu_has_fast_bf16():
    """The QLoRA recipe's bf16 where bf16 matmuls run natively; where torch emulates them (an
    AVX2 CPU: 12x float32's time) float32. LoRA on CPU stays float32; an explicit dtype wins."""
    assert choose_precision("auto", "cpu", True, quantized=True) == Precision("bfloat16", False)
    assert choose_precision("auto", "cpu", False, quantized=True) == Precision("float32", False)
    assert choose_precision("auto", "cpu", True) == Precision("float32", False)
    assert choose_precision("bfloat16", "cpu", False, quantized=True) == Precision("bfloat16", False)
    assert choose_precision("float32", "cpu", True, quantized=True) == Precision("float32", False)
    assert choose_precision("auto", "cuda", True, quantized=True) == Precision("bfloat16", False)


# ---------------------------------------------------------------- the 4-bit student


def test_qlora_student_is_nf4_with_lora_on_top_and_stays_trainable_after_eval_passes(tokenizer, tmp_path,
                                                                                    monkeypatch):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for its inference
    kernel the first time the layer runs in eval mode without gradients, and keeps them so.
    That CPU is simulated by its feature check (this one has no AVX512-BF16); the repacking is
    bitsandbytes' own. The start-up check's eval pass must leave the weights trainable."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from bitsandbytes.nn import modules as bnb_modules

    from datagen.finetune.losses import check_fast_loss
    from datagen.finetune.model import load_student
    from datagen.finetune.optim import accumulate_gradients

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    tiny_model(tmp_path / "tiny", tokenizer)
    model = load_student(FinetuneConfig(base=str(tmp_path / "tiny"), method="qlora", r=4, dtype="bfloat16"),
                         str(tmp_path / "tiny"), "cpu")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of 2 blocks
    assert all(m.weight.quant_type == "nf4" and m.weight.dtype == torch.uint8 for m in layers)
    assert all(m.weight.quant_state.nested and m.compute_dtype == torch.bfloat16 for m in layers)  # double quant
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    assert len(lora) == 2 * 2 * 7 and all(p.requires_grad and p.dtype == torch.float32 for p in lora)
    assert [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name] == []

    _examples, batch = arithmetic_batch(tokenizer)
    assert check_fast_loss(model, batch) is None  # an eval pass without gradients, as at start-up
    assert not [m for m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    model.train()
    accumulate_gradients(model, [batch])
    # B starts at zero, so the LoRA paths pass no gradient back: every B (the first block's too)
    # gets one only through the 4-bit matmuls' backward
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in model.named_parameters()
               if "lora_B" in name)


# ---------------------------------------------------------------- real runs


def test_qlora_sft_on_cpu_lowers_the_loss_and_merges_into_the_float_base(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from datagen.finetune.data import encode_all, load_conversations
    from datagen.finetune.losses import mean_completion_loss

    tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24))
    config = config_file(tmp_path / "c.yaml", "finetune", base=str(tmp_path / "tiny"), **SETTINGS)
    out = tmp_path / "out"
    result = run_cli("finetune", str(data), "--out", str(out), "--method", "qlora", "--config", config)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["method"] == "qlora" and summary["device"] == "cpu"
    assert summary["compute_dtype"] == precision_for(FinetuneConfig(method="qlora"), "cpu").dtype  # auto
    assert summary["loss_scaling"] is False
    log = log_of(out)
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(e["loss"]) for e in log)
    assert log[-1]["loss"] < log[0]["loss"]
    assert (out / "checkpoints" / "step-000006" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert_plain_merged_model_is_base_plus_adapter(tmp_path / "tiny", out)

    # the adapter learnt on 4-bit weights still lowers the loss merged into the float ones
    examples = encode_all(tokenizer, load_conversations(data), max_length=None).examples
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    before = mean_completion_loss(base, examples, tokenizer.pad_token_id, "cpu")
    after = mean_completion_loss(merged, examples, tokenizer.pad_token_id, "cpu")
    assert after < before, (before, after)


def test_qlora_dpo_on_cpu_prefers_the_chosen_replies_and_merges(tokenizer, tmp_path):
    tiny_model(tmp_path / "tiny", tokenizer)
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    config = config_file(tmp_path / "c.yaml", "dpo", base=str(tmp_path / "tiny"), method="qlora", dtype="bfloat16",
                         **{**SETTINGS, "batch_size": 2})
    out = tmp_path / "out"
    result = run_cli("finetune", str(data), "--method", "dpo", "--out", str(out), "--config", config)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["adapter_method"] == "qlora" and summary["compute_dtype"] == "bfloat16"
    log = log_of(out)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference (on the same 4-bit base)
    assert summary["margin"] > 0 and summary["reward_accuracy"] > 0.5
    assert_plain_merged_model_is_base_plus_adapter(tmp_path / "tiny", out)
