"""SFT on the embedded SmolLM2-135M: masking token by token, packing, a real LoRA run whose
loss goes down, merge equivalence, resume after a SIGKILL, eval (QLoRA on CPU: tests/test_qlora_cpu.py).

Start-up self-checks (loss path, packing) and precision run on tiny models built from
configs (a few layers of width 16, the embedded tokenizer; nothing downloaded)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from datagen.errors import ConfigError, InputError
from datagen.finetune.config import FinetuneConfig
from datagen.finetune.data import (
    IGNORE_INDEX,
    Conversation,
    choose_max_length,
    collate,
    encode_all,
    encode_conversation,
    load_conversations,
    micro_batches,
    plan_batches,
)
from datagen.finetune.losses import LOSS_PATH_FAST, LOSS_PATH_FULL, check_fast_loss, check_packing, logits_of
from datagen.finetune.model import Precision, choose_precision
from datagen.finetune.optim import lr_factor, optimizer_step
from datagen.finetune.sft import train
from datagen.structured import VERDICT_SCHEMA
from datagen.teachers.teacher import schema_text
from tests.helpers import run_cli


def arithmetic_rows(count: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        rows.append({"messages": [
            {"role": "user", "content": f"Add {a} and {b}."},
            {"role": "assistant", "content": f"The sum of {a} and {b} is {a + b}."},
        ]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


def conversation(*turns: tuple[str, str]) -> Conversation:
    return Conversation(tuple(turns), "test:1")


def supervised_text(tokenizer, encoded) -> list[str]:
    """The supervised runs of tokens, decoded, in order."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# ---------------------------------------------------------------- masking, on the real chat template


def test_only_the_reply_and_its_eos_are_supervised(tokenizer):
    encoded = encode_conversation(tokenizer, conversation(
        ("system", "Answer briefly."), ("user", "Capital of France?"), ("assistant", "Paris."),
    ))
    assert supervised_text(tokenizer, encoded) == ["Paris.<|im_end|>"]
    # token by token: everything before the reply is masked, and so is ChatML's trailing newline
    eos_at = max(k for k, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert encoded.input_ids[eos_at] == tokenizer.eos_token_id
    assert all(label == IGNORE_INDEX for label in encoded.labels[eos_at + 1 :])
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}],
        add_generation_prompt=True, tokenize=False,
    )
    prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in encoded.labels[:prompt_length])
    assert all(label != IGNORE_INDEX for label in encoded.labels[prompt_length : eos_at + 1])


def test_every_assistant_turn_of_a_dialogue_is_supervised(tokenizer):
    encoded = encode_conversation(tokenizer, conversation(
        ("user", "Hi"), ("assistant", "Hello!"), ("user", "Two plus two?"), ("assistant", "Four."),
    ))
    assert supervised_text(tokenizer, encoded) == ["Hello!<|im_end|>", "Four.<|im_end|>"]


def test_empty_reply_is_an_error_naming_the_example(tokenizer):
    with pytest.raises(InputError, match=r"^test:1: the assistant reply is empty"):
        encode_conversation(tokenizer, conversation(("user", "Hi"), ("assistant", "")))


def test_template_that_drops_eos_is_an_error(tokenizer):
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_eos.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(InputError, match="does not end the assistant reply with EOS"):
        encode_conversation(no_eos, conversation(("user", "Hi"), ("assistant", "Hello")))


# ---------------------------------------------------------------- reading data


def test_every_training_format_loads(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", arithmetic_rows(2))
    pairs = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi.", "completion": "Hi!"}])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
                                  {"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"id": "t1", "instruction": "Negate.",
                                                    "instances": [{"input": "yes", "output": "no"},
                                                                  {"input": "up", "output": "down"}]}])
    assert len(load_conversations(chat)) == 2
    assert load_conversations(pairs)[0].messages == (("user", "Say hi."), ("assistant", "Hi!"))
    loaded = load_conversations(alpaca)
    assert loaded[0].messages == (("user", "Translate to French.\n\nInput:\ncat"), ("assistant", "chat"))
    assert loaded[1].messages == (("user", "Say hi."), ("assistant", "Hi!"))
    from_tasks = load_conversations(tasks)
    assert [c.messages[-1] for c in from_tasks] == [("assistant", "no"), ("assistant", "down")]
    assert from_tasks[1].source.endswith("tasks.jsonl:1#1")


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "the last message must be the assistant's reply"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0]: role must be one of"),
    ('{"text": "hi"}', 'not a messages row (expected messages: [{role, content}])'),
    ('{"messages": [', "invalid JSON"),
])
def test_bad_example_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(arithmetic_rows(1)[0]) + "\n" + line + "\n")
    with pytest.raises(InputError) as caught:
        load_conversations(path)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert problem in str(caught.value)


def test_max_length_comes_from_the_data_and_overlong_examples_are_named(tokenizer):
    assert choose_max_length([10, 61, 30], model_limit=8192, cap=2048) == 64
    assert choose_max_length([5000], model_limit=8192, cap=2048) == 2048
    short = conversation(("user", "Hi"), ("assistant", "Hello"))
    long = Conversation((("user", "Hi"), ("assistant", "word " * 200)), "test:2")
    result = encode_all(tokenizer, [short, long], max_length=64)
    assert len(result.examples) == 1 and result.dropped_overlong == ["test:2"]
    with pytest.raises(InputError, match=r"^test:2: \d+ tokens, longer than max_length 64"):
        encode_all(tokenizer, [short, long], max_length=64, overlong="error")
    assert encode_all(tokenizer, [short, long], max_length=None).max_length >= 200


# ---------------------------------------------------------------- batching


@pytest.mark.parametrize("packing", [False, True])
def test_each_epoch_covers_every_example_once(packing):
    lengths = [5, 40, 12, 33, 8, 8, 21, 2, 17, 30, 9]
    batches = plan_batches(lengths, 3, seed=1, packing=packing, max_length=40)
    seen = [i for batch in batches for row in batch.rows for i in row]
    assert sorted(seen) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 40 for batch in batches for row in batch.rows)
    assert batches == plan_batches(lengths, 3, seed=1, packing=packing, max_length=40)
    assert batches != plan_batches(lengths, 3, seed=2, packing=packing, max_length=40)


def test_micro_batches_run_on_across_epochs():
    def plan(epoch):
        return [f"e{epoch}b{k}" for k in range(3)]

    assert micro_batches(plan, 2, 3) == [(0, "e0b2"), (1, "e1b0"), (1, "e1b1")]


def test_learning_rate_warms_up_then_decays():
    factors = [lr_factor(step, 10, 2, "cosine") for step in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] > 0
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)


@pytest.mark.slow
def test_packed_examples_do_not_attend_to_each_other(embedded_model_path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32).eval()
    first = encode_conversation(tokenizer, conversation(("user", "Name a colour."), ("assistant", "Blue.")))
    second = encode_conversation(tokenizer, conversation(("user", "Add 2 and 3."), ("assistant", "The sum is 5.")))
    batch = plan_batches([len(first.input_ids), len(second.input_ids)], 1, 0, packing=True, max_length=512)[0]
    assert len(batch.rows[0]) == 2
    packed = collate([first, second], batch, tokenizer.pad_token_id)
    assert "attention_mask" not in packed
    with torch.inference_mode():
        together = logits_of(model, packed)[0]
        alone = {index: model(input_ids=torch.tensor([e.input_ids])).logits[0]
                 for index, e in enumerate([first, second])}
    offset = 0
    for index in batch.rows[0]:
        width = alone[index].shape[0]
        assert torch.allclose(together[offset : offset + width], alone[index], atol=1e-4)
        offset += width


@pytest.mark.slow
def test_loss_on_supervised_positions_only_equals_the_full_logits_loss(embedded_model_path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from datagen.finetune.losses import summed_loss

    model = AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32).eval()
    examples = [encode_conversation(tokenizer,
                                    conversation(("user", f"Add {i} and 3."), ("assistant", f"It is {i + 3}.")))
                for i in range(5)]
    batch = plan_batches([len(e.input_ids) for e in examples], 5, 0, packing=False, max_length=0)[0]
    tensors = collate(examples, batch, tokenizer.pad_token_id)
    with torch.inference_mode():
        ours, count = summed_loss(model, tensors)
        logits = logits_of(model, tensors)[:, :-1]
        labels = tensors["labels"][:, 1:]
        full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    assert count == sum(e.supervised for e in examples)
    assert float(ours) == pytest.approx(float(full), rel=1e-5)
    assert check_fast_loss(model, tensors) is None  # the start-up check keeps the fast path here


# ---------------------------------------------------------------- start-up self-checks, tiny models


TINY_SIZES = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.5)
# families whose forward does something to logits after the output layer
LOGIT_POSTPROCESSING = {
    "granite logits_scaling": ("GraniteConfig", {"logits_scaling": 4.0}),
    "gemma2 final_logit_softcapping": ("Gemma2Config", {"final_logit_softcapping": 2.0, "head_dim": 8}),
    "cohere logit_scale": ("CohereConfig", {"logit_scale": 4.0}),
}


def tiny_model(folder, tokenizer, config_class: str = "LlamaConfig", **extra):
    """A randomly initialised tiny causal LM from a config, saved with the embedded tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **TINY_SIZES, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def arithmetic_batch(tokenizer, count: int = 4):
    from datagen.finetune.data import Batch

    rows = arithmetic_rows(count)
    examples = [encode_conversation(tokenizer, Conversation(
        tuple((m["role"], m["content"]) for m in row["messages"]), f"t:{i}")) for i, row in enumerate(rows)]
    return examples, collate(examples, Batch(tuple((i,) for i in range(count))), tokenizer.pad_token_id)


def test_fast_loss_path_is_kept_where_it_is_the_models_own_loss(tokenizer, tmp_path):
    model = tiny_model(tmp_path, tokenizer)
    _examples, batch = arithmetic_batch(tokenizer)
    assert check_fast_loss(model, batch) is None


@pytest.mark.parametrize("family", list(LOGIT_POSTPROCESSING))
def test_fast_loss_check_fails_where_the_model_postprocesses_logits(tokenizer, tmp_path, family):
    import transformers

    config_class, extra = LOGIT_POSTPROCESSING[family]
    if not hasattr(transformers, config_class):
        pytest.skip(f"this transformers has no {config_class}")
    model = tiny_model(tmp_path, tokenizer, config_class, **extra)
    _examples, batch = arithmetic_batch(tokenizer)
    reason = check_fast_loss(model, batch)
    assert reason is not None and "differs from the model's own" in reason
    assert model.training is False  # the check leaves the mode as it found it


@pytest.mark.parametrize(("config_class", "extra", "path"), [
    ("LlamaConfig", {}, LOSS_PATH_FAST),
    ("GraniteConfig", {"logits_scaling": 4.0}, LOSS_PATH_FULL),
])
def test_training_loss_is_the_models_own_loss(tokenizer, tmp_path, config_class, extra, path):
    """One step over one batch of all examples: the logged loss is the model's forward-with-labels
    loss, on whichever path the start-up check chose."""
    import torch

    model = tiny_model(tmp_path / "base", tokenizer, config_class, **extra)
    rows = arithmetic_rows(4)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    examples, batch = arithmetic_batch(tokenizer)
    with torch.no_grad():
        own = float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss)
    summary = train(FinetuneConfig(base=str(tmp_path / "base"), max_steps=1, batch_size=4, merge=False),
                    data, tmp_path / "out", show_progress=False)
    assert summary["loss_path"] == path
    assert (summary["loss_path_note"] is None) == (path == LOSS_PATH_FAST)
    assert summary["compute_dtype"] == "float32" and summary["loss_scaling"] is False
    [step] = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert step["loss"] == pytest.approx(own, rel=1e-5)


def test_packing_check_passes_on_this_transformers(tokenizer, tmp_path):
    model = tiny_model(tmp_path, tokenizer)
    examples, _batch = arithmetic_batch(tokenizer)
    check_packing(model, examples, tokenizer.pad_token_id, "cpu")  # no error: examples are isolated


def test_packing_is_refused_where_packed_examples_attend_to_each_other(tokenizer, tmp_path, monkeypatch):
    """Fault injected: transformers' packed-sequence detection switched off, as before it existed."""
    import transformers
    from transformers import masking_utils

    model = tiny_model(tmp_path / "base", tokenizer)
    examples, _batch = arithmetic_batch(tokenizer)
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    expected = (f"finetune.packing: this transformers ({transformers.__version__}) does not isolate packed "
                "examples; upgrade to >= 4.54 or set packing: false")
    with pytest.raises(ConfigError) as caught:
        check_packing(model, examples, tokenizer.pad_token_id, "cpu")
    assert str(caught.value) == expected
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(4))
    with pytest.raises(ConfigError, match="finetune.packing: "):
        train(FinetuneConfig(base=str(tmp_path / "base"), max_steps=1, packing=True, merge=False), data,
              tmp_path / "out", show_progress=False)


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize(("setting", "device", "bf16", "expected"), [
    ("auto", "cpu", False, Precision("float32", False)),
    ("auto", "cpu", True, Precision("float32", False)),
    ("auto", "cuda", True, Precision("bfloat16", False)),
    ("auto", "cuda:1", False, Precision("float16", True)),  # e.g. a T4 or V100: fp16 needs loss scaling
    ("float16", "cuda", True, Precision("float16", True)),
    ("float32", "cuda", False, Precision("float32", False)),
    ("bfloat16", "cpu", False, Precision("bfloat16", False)),
])
def test_precision_for_each_device(setting, device, bf16, expected):
    assert choose_precision(setting, device, bf16) == expected


@pytest.mark.parametrize(("setting", "device", "bf16", "message"), [
    ("bfloat16", "cuda", False, "finetune.dtype: this GPU has no bfloat16"),
    ("float16", "cpu", False, "finetune.dtype: float16 training needs a CUDA device"),
])
def test_precision_refusals_are_one_clear_line(setting, device, bf16, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        choose_precision(setting, device, bf16)


def test_optimizer_step_unscales_before_clipping_and_skips_overflow():
    """The GradScaler sequence, on a CPU scaler: the clip sees true gradients, not scaled ones."""
    import torch

    weight = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((weight * torch.tensor([3.0, 4.0])).sum()).backward()  # true gradient (3, 4), norm 5
    assert optimizer_step(optimizer, [weight], max_grad_norm=1.0, scaler=scaler) == pytest.approx(5.0)
    assert weight.detach().tolist() == pytest.approx([1.0 - 0.1 * 0.6, 1.0 - 0.1 * 0.8])  # clipped to norm 1
    assert weight.grad is None

    before = weight.detach().clone()
    scaler.scale((weight * torch.tensor([float("inf"), 1.0])).sum()).backward()
    optimizer_step(optimizer, [weight], max_grad_norm=1.0, scaler=scaler)
    assert torch.equal(weight.detach(), before)  # overflowed step skipped
    assert scaler.get_scale() == 512.0  # and the scale lowered


@pytest.mark.gpu
def test_fp16_training_with_loss_scaling_on_a_gpu(tokenizer, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    tiny_model(tmp_path / "base", tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24))
    summary = train(FinetuneConfig(base=str(tmp_path / "base"), dtype="float16", grad_accum=2, **TINY),
                    data, tmp_path / "out", show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert summary["compute_dtype"] == "float16" and summary["loss_scaling"] is True
    assert all(map(math.isfinite, (entry["loss"] for entry in log))) and log[-1]["loss"] < log[0]["loss"]


# ---------------------------------------------------------------- real training


TINY = dict(batch_size=4, learning_rate=1e-3, r=8, alpha=16, max_steps=6, save_every=2, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    data = write_jsonl(folder / "train.jsonl", arithmetic_rows(24))
    summary = train(FinetuneConfig(**TINY), data, folder / "out", show_progress=False)
    return folder, data, summary


@pytest.mark.slow
def test_lora_run_lowers_the_loss_and_writes_adapter_merged_and_logs(trained, embedded_model_path, tokenizer):
    folder, data, summary = trained
    out = folder / "out"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]
    assert summary["finished"] and summary["examples"] == 24 and summary["tokens_per_s"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["final_loss"] == log[-1]["loss"]

    # the loss on the training data, measured the same way before and after, went down
    import torch
    from transformers import AutoModelForCausalLM

    from datagen.finetune.losses import mean_completion_loss

    examples = encode_all(tokenizer, load_conversations(data), max_length=None).examples
    base = AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)  # plain transformers
    before = mean_completion_loss(base, examples, tokenizer.pad_token_id, "cpu")
    after = mean_completion_loss(merged, examples, tokenizer.pad_token_id, "cpu")
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_merged_model_gives_the_logits_of_base_plus_adapter(trained, embedded_model_path, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = trained[0] / "out"
    ids = torch.tensor([tokenizer("Add 7 and 9. The sum of 7 and 9 is")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        plain = base(input_ids=ids).logits
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()  # wraps `base` in place
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.inference_mode():
        adapted = with_adapter(input_ids=ids).logits
        direct = merged(input_ids=ids).logits
    assert torch.allclose(adapted, direct, atol=1e-3)
    assert (adapted - plain).abs().max() > 0.1  # the adapter did change the model


@pytest.mark.slow
def test_resume_after_sigkill_ends_where_an_unbroken_run_ends(trained, tmp_path):
    """Kill -9 a real `datagen finetune` after a checkpoint, rerun it: same steps, same losses."""
    _folder, data, _summary = trained
    config = tmp_path / "sft.yaml"
    config.write_text("finetune:\n" + "".join(f"  {k}: {v}\n" for k, v in TINY.items()) + "  merge: false\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "datagen.cli", "finetune", str(data), "--out", str(out), "--config", str(config)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "step-000002" / "state.pt").exists():
        assert first.poll() is None, "finetune ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "adapter").exists()

    second = run_cli("finetune", str(data), "--out", str(out), "--config", str(config))
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["finished"] and resumed["resumed_from_step"] >= 2
    unbroken = [json.loads(line) for line in (trained[0] / "out" / "train_log.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in again] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in again] == pytest.approx([e["loss"] for e in unbroken], abs=1e-4)


def test_checkpoints_of_other_settings_are_not_resumed(tokenizer, tmp_path):
    """Resuming somebody else's optimiser state would silently train the wrong thing."""
    from datagen.errors import DatagenError

    tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(4))
    settings = dict(base=str(tmp_path / "tiny"), max_steps=1, batch_size=4, merge=False)
    train(FinetuneConfig(**settings), data, tmp_path / "out", show_progress=False)
    with pytest.raises(DatagenError, match="checkpoints were made with other data or settings"):
        train(FinetuneConfig(**settings, learning_rate=1e-5), data, tmp_path / "out", show_progress=False)


# ---------------------------------------------------------------- QLoRA


@pytest.mark.gpu
@pytest.mark.slow  # the embedded model
def test_qlora_trains_on_a_gpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24))
    summary = train(FinetuneConfig(method="qlora", **TINY), data, tmp_path / "out", show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert summary["finished"] and log[-1]["loss"] < log[0]["loss"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")  # merged in full precision, loads plainly


# ---------------------------------------------------------------- eval


def test_verdicts_are_parsed_strictly():
    from datagen.finetune.evaluate import parse_verdict

    assert parse_verdict("Verdict: B\nReason: more complete") == "B"
    assert parse_verdict("verdict: **tie**") == "tie"
    assert parse_verdict("A is better") == "A"
    assert parse_verdict("Both answers are fine.") is None


def test_judge_prompt_is_pinned():
    from datagen.finetune.evaluate import judge_messages

    [message] = judge_messages("Add 2 and 3.", "5", "6")
    assert message["content"].startswith("You are comparing two AI assistants' answers to the same request.")
    assert ("Request:\nAdd 2 and 3.\n\nAnswer A:\n5\n\nAnswer B:\n6\n\n"
            "Reply in exactly this form:\nVerdict: <A, B or tie>") in message["content"]


def test_the_eval_judge_is_capped_like_every_paid_stage(tmp_path):
    from datagen.errors import ConfigError
    from datagen.finetune.evaluate import EvalConfig, open_judge, win_rate
    from datagen.teachers import TeacherConfig
    from datagen.teachers.spending import SpendingCapReached
    from datagen.teachers.teacher import PriceTable
    from tests.helpers import ScriptedBackend

    priced = TeacherConfig(backend="openai", base_url="http://127.0.0.1:9/v1", max_cost=50.0,
                           prices=PriceTable(input_per_million=1e6, output_per_million=1e6),  # a token costs 1
                           cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="the judge has no prices"):
        open_judge(priced.model_copy(update={"prices": None}), tmp_path)
    with open_judge(priced, tmp_path) as judge:
        assert (judge.ledger.path, judge.ledger.limit) == (tmp_path / "report.spend.json", 50.0)
        judge.backend = ScriptedBackend(lambda prompt: "Verdict: A")  # what would answer, were it sent
        with pytest.raises(SpendingCapReached, match="spending cap 50 reached"):
            win_rate(judge, ["Add 2 and 3."] * 2, ["5"] * 2, ["6"] * 2, EvalConfig().judge_sampling)
        assert judge.backend.seen == []  # a verdict's prompt alone could pass the cap: nothing was sent


@pytest.mark.slow
def test_eval_compares_base_and_tuned_on_held_out_data(trained, tmp_path, monkeypatch, capfd):
    from datagen.finetune.evaluate import EvalConfig, evaluate, judge_messages, parse_verdict
    from datagen.rouge import rouge_l_f1
    from datagen.teachers import TeacherConfig
    from datagen.teachers.base import Request
    from datagen.teachers.cache import RequestCache, request_key

    folder, _data, _summary = trained
    held_out = write_jsonl(tmp_path / "test.jsonl", arithmetic_rows(4, seed=99))
    config = EvalConfig(max_new_tokens=24, judge=True, samples_in_report=4)
    monkeypatch.setenv("DATAGEN_PROGRESS_INTERVAL", "0")
    report = evaluate(config, tmp_path, "smollm2-135m", str(folder / "out"), tmp_path / "eval",
                      teacher_config=TeacherConfig(cache_dir=str(tmp_path / "judge")))
    shown = capfd.readouterr().err  # the replies, the slow part, show progress as the other stages do
    assert "eval base: done 4/4 (100%)" in shown and "eval tuned: done 4/4 (100%)" in shown
    assert report["data"] == str(held_out) and report["examples"] == 4
    assert report["tuned"]["loss"] < report["base"]["loss"]
    samples = report["samples"]
    assert len(samples) == 4
    for model in ("base", "tuned"):  # the mean ROUGE-L of the replies shown, computed here again
        expected = sum(rouge_l_f1(s["reference"], s[model]) for s in samples) / 4
        assert report[model]["rouge_l"] == round(expected, 4), model

    # the win rate again from the real judge's own replies (cached): tuned is A, then B
    cache = RequestCache(tmp_path / "judge" / "requests.sqlite")
    params = config.judge_sampling.model_copy(update={"n": 1})
    points, unreadable = [], 0
    for sample in samples:
        orders = (("A", (sample["tuned"], sample["base"])), ("B", (sample["base"], sample["tuned"])))
        for tuned_label, answers in orders:
            request = Request.build(judge_messages(sample["request"], *answers), params, 0,
                                            schema=schema_text(VERDICT_SCHEMA))
            reply = cache.get(request_key("local", "smollm2-135m", request))
            assert reply is not None, f"the judge was not asked about sample {sample['request']!r} that way"
            verdict = parse_verdict(reply.text)
            if verdict is None:
                unreadable += 1
            else:
                points.append(0.5 if verdict == "tie" else float(verdict == tuned_label))
    cache.close()
    judge = report["judge"]
    assert (judge["judgements"], judge["unreadable"]) == (len(points), unreadable)
    assert judge["win_rate"] == (round(sum(points) / len(points), 4) if points else None)
    markdown = (tmp_path / "eval" / "report.md").read_text()
    # arithmetic rows without a teacher's lineage: their outputs are named reference replies, not teacher's
    assert "| loss on reference replies (lower is better) |" in markdown and "## Sample 1" in markdown
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["tuned"]["loss"] == report["tuned"]["loss"]
