"""LoRA / QLoRA supervised fine-tuning of a student on chat data: `datagen finetune`.

    datagen finetune out/dataset --base smollm2-135m --method lora --out out/student

A plain torch loop over small parts (`datagen.finetune.data` for tokens and batches,
peft for the adapter): completion-only loss weighted by supervised tokens across
gradient accumulation, length-grouped batches (or packing without cross-example
attention), warm-up then cosine/linear decay, gradient clipping.

Several processes: `datagen finetune --nproc N` (or `torchrun ... -m datagen.finetune`)
trains on N ranks with DDP or FSDP2 (`finetune.distributed`), each on its share of the
same global batches, with the same loss as one process accumulating over them; rank 0
writes everything (`datagen.finetune.distributed`).

Kill it and rerun the same command: it resumes from the last checkpoint in
`OUT/checkpoints/` (adapter, optimiser, scheduler and RNG state, written atomically)
and ends with the same weights an uninterrupted run would have. It writes:

    OUT/adapter/        the LoRA adapter (peft) and the tokenizer
    OUT/merged/         base reloaded in full precision + adapter merged; plain transformers loads it
    OUT/train_log.jsonl one line per optimiser step: loss, lr, tokens/s, grad norm
    OUT/summary.json    settings, data statistics, final loss, throughput, peak memory

QLoRA loads the base in 4-bit NF4 with double quantisation (bitsandbytes; not the
library defaults) and prepares it for k-bit training. Weights are stored in NF4; matmuls
compute in bf16, or in fp16 with loss scaling on a GPU without bf16, or in float32 on a CPU
without fast bf16. On a GPU it uses a paged AdamW; on CPU (bitsandbytes >= 0.50, whose CPU
backend runs 4-bit layers) torch's AdamW. It is refused under FSDP (see `FinetuneConfig`).

Precision (`choose_precision`): float32 on CPU (bf16 for QLoRA on a CPU with fast bf16: AVX-512
or newer), bf16 on a GPU that has it, otherwise fp16.
fp16 compute always trains with a `torch.amp.GradScaler` (the LoRA weights themselves stay
float32): each micro-batch's loss is scaled before backward, gradients are unscaled once
per optimiser step before clipping, and a step whose gradients overflowed is skipped.

Start-up self-checks, on the data's own first batch, in eval mode without gradients:

- Loss path (`check_fast_loss`): the output layer on supervised positions only must give
  the model's own loss (its forward with labels). Families that post-process logits
  (soft-capping, logit scaling, multipliers) do not, and take the full-logits path; one
  line says so.
- Packing (`check_packing`): two examples packed into one row must get the logits they
  get alone, or packing is refused with the transformers version to upgrade to.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from datagen.config import DEFAULT_MODEL, Strict
from datagen.errors import ConfigError, DatagenError
from datagen.io import atomic_write_json, write_dir_atomic

CHECKPOINT_PREFIX = "step-"

# How the loss is computed (summary.json "loss_path").
LOSS_PATH_FAST = "supervised positions"  # the output layer on supervised positions only
LOSS_PATH_FULL = "full logits"  # the model's own forward, logits for every position
# Relative agreement of the two loss paths that counts as "the same loss": float32 sums
# agree to ~1e-6; half-precision matmuls of different shapes round differently.
FAST_LOSS_RTOL = {"float32": 1e-4, "half": 2e-3}
# Largest logit difference, relative to the largest logit, of an example packed after
# another versus alone: attending across the boundary moves logits by whole units.
PACKING_RTOL = {"float32": 1e-3, "half": 5e-2}
# transformers masks attention per example from restarted position ids (no attention
# mask) on the eager / sdpa paths since this release (PR #39194, masking_utils).
PACKING_TRANSFORMERS = "4.54"
# Non-reentrant activation checkpointing: the reentrant kind runs backward hooks outside
# autograd's graph, which DDP's gradient hooks and FSDP's resharding cannot see.
CHECKPOINTING_KWARGS = {"use_reentrant": False}
# The first bitsandbytes whose CPU backend was seen training 4-bit NF4 layers under LoRA here
# (0.50.2, torch 2.13); CUDA QLoRA works with older ones.
QLORA_CPU_BITSANDBYTES = "0.50"
# FSDP2's fully_shard over bitsandbytes' Params4bit is reported to give wrong outputs or lose
# the quantisation state (bitsandbytes #1945, accelerate #3983); no GPU run here has shown
# otherwise, so the combination is refused when the config is read, before anything loads.
QLORA_FSDP_REFUSAL = ("method qlora under fsdp is not supported yet (sharding bitsandbytes' 4-bit weights is "
                      "reported to corrupt them: bitsandbytes #1945, accelerate #3983); use distributed: ddp")


class FinetuneConfig(Strict):
    """SFT settings. Defaults suit a small student on a few thousand examples."""

    base: str = DEFAULT_MODEL
    method: Literal["lora", "qlora"] = "lora"
    # LoRA
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # optimisation
    learning_rate: float = Field(2e-4, gt=0)
    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # data
    max_length: int | None = Field(None, ge=16)  # None: the longest example, within max_length_cap
    max_length_cap: int = Field(2048, ge=16)
    overlong: Literal["drop", "error"] = "drop"
    packing: bool = False
    # Orca 2 prompt erasure when training on task JSONL: Orca tasks get the generic system
    # message (datagen.chat.GENERIC_SYSTEM) instead of their own (exports apply it themselves)
    prompt_erasure: bool = False
    # None: generate.orca.generic_system of the same config file (the export's), else the default
    generic_system: str | None = Field(None, min_length=1)
    seed: int = 0
    # runtime
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    # several processes (torchrun, `datagen finetune --nproc N`): ddp replicates the student
    # on every rank; fsdp (FSDP2 fully_shard) shards it, each decoder block on its own
    distributed: Literal["ddp", "fsdp"] = "ddp"
    save_every: int = Field(50, ge=1)  # optimiser steps between checkpoints
    keep_checkpoints: int = Field(2, ge=1)
    merge: bool = True

    @field_validator("distributed")
    @classmethod
    def _no_qlora_under_fsdp(cls, value: str, info: ValidationInfo) -> str:
        """Refuse QLoRA under FSDP as the config is read (see QLORA_FSDP_REFUSAL)."""
        if value == "fsdp" and info.data.get("method") == "qlora":
            raise ValueError(QLORA_FSDP_REFUSAL)
        return value


# ----------------------------------------------------------------------------- model


def pick_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Precision:
    """What a run computes in, and whether its loss needs scaling."""

    dtype: Literal["float32", "bfloat16", "float16"]
    loss_scaling: bool  # fp16: a GradScaler keeps small gradients from flushing to zero


def choose_precision(setting: str, device: str, bf16_supported: bool, quantized: bool = False) -> Precision:
    """The compute dtype for `setting` ("auto" or a dtype name) on `device`.

    "auto": on CPU float32, or bf16 for QLoRA (`quantized`) where the CPU has fast bf16
    (`bf16_supported`); on CUDA bf16 where the GPU has it, else fp16 with loss scaling. QLoRA's
    4-bit matmuls compute in that dtype (float32 if asked). Refused: bf16 on a GPU without it,
    fp16 on CPU (no speed to gain and no fused kernels for it).
    """
    cuda = device.startswith("cuda")
    if setting == "auto":
        if not cuda:
            # QLoRA dequantises each NF4 weight to the compute dtype for its matmul: bf16 is the
            # QLoRA recipe's, but only worth it where bf16 matmuls are not emulated (12x slower)
            setting = "bfloat16" if quantized and bf16_supported else "float32"
        else:
            setting = "bfloat16" if bf16_supported else "float16"
    if setting == "bfloat16" and cuda and not bf16_supported:
        raise ConfigError("finetune.dtype: this GPU has no bfloat16; use float16 (trained with loss scaling) "
                          "or auto")
    if setting == "float16" and not cuda:
        raise ConfigError("finetune.dtype: float16 training needs a CUDA device; use float32 or bfloat16 on CPU")
    return Precision(setting, loss_scaling=setting == "float16")


def _bf16_supported(device: str) -> bool:
    """Whether `device` computes in bf16 at speed: a GPU that has it, or a CPU that oneDNN has
    bf16 kernels for (AVX-512 and newer). Elsewhere torch falls back to a reference bf16 matmul:
    on this project's AVX2 CPU a 576x1536 layer's forward and backward took 12x float32's time."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_for(config: FinetuneConfig, device: str) -> Precision:
    return choose_precision(config.dtype, device, _bf16_supported(device), quantized=config.method == "qlora")


def pick_dtype(setting: str, device: str):
    """The torch dtype `choose_precision` picks for a LoRA run (bench/sft.py uses it too)."""
    import torch

    return getattr(torch, choose_precision(setting, device, _bf16_supported(device)).dtype)


def make_grad_scaler(precision: Precision, device: str):
    """A GradScaler for fp16 compute, else None."""
    import torch

    return torch.amp.GradScaler("cuda") if precision.loss_scaling and device.startswith("cuda") else None


def qlora_problem(device: str, cuda_available: bool, bitsandbytes_version: str | None) -> str | None:
    """Why QLoRA cannot run on `device` with this bitsandbytes (None: not installed), or None if it can.

    CUDA: any bitsandbytes. CPU: its CPU backend trains 4-bit layers from QLORA_CPU_BITSANDBYTES on."""
    from packaging.version import Version

    install = f"pip install 'bitsandbytes>={QLORA_CPU_BITSANDBYTES}'"
    if device.startswith("cuda"):
        if not cuda_available:
            return f"--method qlora: device {device} is not available (no CUDA device here); use device cpu or auto"
        return None if bitsandbytes_version else f"--method qlora needs bitsandbytes: {install}"
    if device != "cpu":
        return f"--method qlora runs on CUDA or CPU, not {device}"
    if not bitsandbytes_version:
        return f"--method qlora needs bitsandbytes: {install}"
    if Version(bitsandbytes_version) < Version(QLORA_CPU_BITSANDBYTES):
        return (f"--method qlora on CPU needs bitsandbytes >= {QLORA_CPU_BITSANDBYTES} (its CPU backend), "
                f"this is {bitsandbytes_version}: {install}")
    return None


def require_qlora_support(device: str) -> None:
    """Fail before loading anything where QLoRA cannot run (`qlora_problem`)."""
    import importlib.metadata

    import torch

    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        version = None
    problem = qlora_problem(device, torch.cuda.is_available(), version)
    if problem:
        raise DatagenError(problem)


def quantization_config(compute_dtype: str = "bfloat16"):
    """QLoRA's 4-bit setting: NF4 storage, double quantisation, `compute_dtype` matmuls
    (bf16, or fp16 on a GPU without it; not bitsandbytes' defaults)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def keep_4bit_weights_trainable(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking in every 4-bit layer of `model`.

    On a CPU with AVX512-BF16, a Linear4bit run in eval mode without gradients repacks its
    weights (and de-nests their scales) into a layout only its inference kernel reads, and
    does not unpack them when the module goes back to train(). Training runs eval passes
    between steps (the start-up checks, DPO's reference log-probs), after which the 4-bit
    matmuls would go through that kernel, which has no backward (and the repacking itself
    asserts on layers narrower than 32 outputs)."""
    for layer in model.modules():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False


def load_student(config: FinetuneConfig, base_path: str, device: str, precision: Precision | None = None,
                 *, empty: bool = False):
    """The base model wrapped in a fresh LoRA adapter, ready to train on `device`.

    The frozen base is in the compute dtype; peft keeps the adapter weights in float32.
    QLoRA: the base's linear layers in NF4 (on the GPU or the CPU), the rest in float32
    (peft's k-bit preparation), LoRA on top.
    empty (LoRA only): the same modules, names and dtypes on the meta device, with no
    weights read and no memory taken; FSDP ranks other than 0 build this and receive their
    shards, adapter and buffers from rank 0 (`distributed.wrap(..., from_main=True)`).
    """
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    precision = precision or precision_for(config, device)
    if config.method == "qlora":
        if empty:
            raise ValueError("load_student: empty (meta) students are for LoRA; QLoRA quantises real weights")
        model = AutoModelForCausalLM.from_pretrained(
            base_path, quantization_config=quantization_config(precision.dtype), device_map={"": device},
            dtype=getattr(torch, precision.dtype),
        )
        keep_4bit_weights_trainable(model)  # only CPU layers repack; a no-op for CUDA ones
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS,
        )
    else:
        if empty:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path),
                                                         dtype=getattr(torch, precision.dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, precision.dtype)).to(device)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
            model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.device("meta") if empty else contextlib.nullcontext():
        return get_peft_model(model, lora)


def make_optimizer(config: FinetuneConfig, parameters: list, device: str):
    """AdamW over the trainable (LoRA) parameters; QLoRA on a GPU: bitsandbytes' paged AdamW.

    Paging keeps the optimiser state in CUDA unified memory, which the driver moves to host
    memory when the GPU runs short. On CPU the state is in host memory already, so there is
    nothing to page: QLoRA there uses the same fused AdamW as LoRA (32-bit state both ways)."""
    import torch

    if config.method == "qlora" and device.startswith("cuda"):
        import bitsandbytes

        return bitsandbytes.optim.PagedAdamW32bit(
            parameters, lr=config.learning_rate, weight_decay=config.weight_decay
        )
    # fused: one kernel for all parameters (CPU and CUDA), as transformers' Trainer defaults to
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- loss


def logits_of(model, batch: dict[str, Any]):
    """The model's logits for a collated batch.

    No KV cache: transformers only turns restarting position ids into per-example
    attention (packing) when no cache is passed, and training never needs one.
    """
    return model(**_model_inputs(batch), use_cache=False).logits


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def summed_loss(model, batch: dict[str, Any], fast: bool = True):
    """Summed cross-entropy over supervised tokens, and their count (for token-weighted means).

    fast: the output layer runs only on the positions that predict a supervised token:
    prompt positions never need their logits, and over a 49k-token vocabulary those logits
    are most of the memory of a step. That is the model's own loss only when its forward
    does nothing to logits after the output layer; `check_fast_loss` decides, once per run.
    Otherwise: the logits of the model's own forward at every position.
    """
    import torch

    logits, targets, supervised = supervised_logits(model, batch, fast)
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, int(supervised.sum())


def supervised_logits(model, batch: dict[str, Any], fast: bool):
    """The float logits at the positions that predict a supervised token, those tokens, and
    the (rows x positions) mask of them; `fast` as in `summed_loss`. SFT and DPO share it."""
    labels = batch["labels"][:, 1:]
    supervised = labels != -100
    if fast:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = causal_lm.base_model(**_model_inputs(batch), use_cache=False).last_hidden_state
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][supervised])
    else:
        logits = logits_of(model, batch)[:, :-1][supervised]
    return logits.float(), labels[supervised], supervised


def _half(model) -> bool:
    """Whether `model` computes in half precision: half weights, or 4-bit layers (QLoRA) whose
    matmuls run in a half compute dtype while their weights are stored as integers."""
    import torch

    half = (torch.float16, torch.bfloat16)
    return any(p.dtype in half for p in model.parameters() if p.is_floating_point()) or \
        any(getattr(m, "compute_dtype", None) in half for m in model.modules())


def check_fast_loss(model, batch: dict[str, Any]) -> str | None:
    """None if the supervised-positions loss on `batch` is the model's own loss; else why not.

    The model's own loss is its forward with labels (whatever it does to logits: soft-capping,
    scaling, multipliers). Compared in eval mode (no dropout) without gradients.
    """
    import torch

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if causal_lm.get_output_embeddings() is None or not hasattr(causal_lm, "base_model"):
        return f"{type(causal_lm).__name__} has no separate output layer"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = model(**_model_inputs(batch), labels=batch["labels"], use_cache=False).loss
            fast_sum, count = summed_loss(model, batch, fast=True)
    finally:
        model.train(was_training)
    if own is None or count == 0:
        return "no supervised token to compare on"
    own, fast = float(own), float(fast_sum) / count
    tolerance = FAST_LOSS_RTOL["half" if _half(model) else "float32"]
    if not math.isfinite(fast) or abs(fast - own) > tolerance * max(abs(own), 1e-6):
        return (f"{type(causal_lm).__name__}: loss on supervised positions {fast:.6f} differs from the "
                f"model's own {own:.6f} (it post-processes logits)")
    return None


def check_packing(model, examples: Sequence, pad_id: int, device: str, probe_tokens: int = 64) -> None:
    """Refuse packing unless this transformers keeps packed examples apart.

    Two examples (cut to `probe_tokens`) packed into one row must get the logits each gets
    alone; the second one would see the first where attention is not masked per example.
    """
    import torch
    import transformers

    from datagen.finetune.data import Batch, Encoded, collate

    probes = [Encoded(e.input_ids[:probe_tokens], e.labels[:probe_tokens], e.source) for e in examples[:2]]
    if len(probes) < 2:
        return
    packed = _to_device(collate(probes, Batch(((0, 1),)), pad_id), device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = logits_of(model, packed)[0].float()
            alone = model(input_ids=torch.tensor([probes[1].input_ids], device=device), use_cache=False).logits[0]
    finally:
        model.train(was_training)
    start = len(probes[0].input_ids)
    second = together[start : start + len(probes[1].input_ids)]
    difference = float((second - alone.float()).abs().max())
    tolerance = PACKING_RTOL["half" if _half(model) else "float32"] * float(alone.float().abs().max())
    if not difference <= tolerance:
        raise ConfigError(
            f"finetune.packing: this transformers ({transformers.__version__}) does not isolate packed "
            f"examples; upgrade to >= {PACKING_TRANSFORMERS} or set packing: false"
        )


def supervised_count(batches: Sequence[dict[str, Any]]) -> int:
    """Supervised tokens the loss is summed over in `batches` (labels shifted by one)."""
    return sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)


def accumulate_gradients(model, batches: Sequence[dict[str, Any]], fast: bool = True, scaler=None, *,
                         loss_fn: Callable[[dict[str, Any]], Any] | None = None, supervised: int | None = None,
                         scale: float = 1.0, sync: Callable[[bool], None] | None = None) -> float:
    """Backpropagate one optimiser step's micro-batches; return their summed loss over `supervised`.

    Each micro-batch's summed loss is divided by the supervised tokens of the whole step,
    so every token weighs the same however the tokens fall into micro-batches. With a
    GradScaler (fp16) each backward runs on the scaled loss; the caller unscales once.

    Several ranks: `supervised` is the step's count over all ranks, `loss_fn` the wrapped
    module's forward, `scale` the world size (DDP and FSDP average gradients over ranks;
    this turns the average back into the global token mean) and `sync(last)` turns the
    gradient all-reduce on for the last micro-batch only. One process: the defaults.
    DPO (`datagen.finetune.dpo`) passes its summed pair losses as `loss_fn` and the step's
    pair count over all ranks as `supervised`: its loss is a mean over pairs, not tokens.
    """
    supervised = supervised_count(batches) if supervised is None else supervised
    loss_fn = loss_fn or (lambda batch: summed_loss(model, batch, fast)[0])
    step_loss = 0.0
    for index, batch in enumerate(batches):
        if sync is not None:
            sync(index == len(batches) - 1)
        loss_sum = loss_fn(batch)
        loss = loss_sum * scale / supervised
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += float(loss_sum.detach()) / supervised
    return step_loss


def loss_module(model, fast: bool):
    """An nn.Module whose forward is `summed_loss(model, batch, fast)`'s sum.

    DDP and FSDP2 see only the work done inside the forward of the module they wrap; the
    supervised-positions loss calls the base model and the output layer separately, so
    both go through this one forward. Call it as `module(**batch)` (extra keys ignored).
    """
    import torch

    class SupervisedLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, labels, attention_mask=None, position_ids=None, **_ignored):
            batch = {"input_ids": input_ids, "labels": labels}
            if attention_mask is not None:
                batch["attention_mask"] = attention_mask
            if position_ids is not None:
                batch["position_ids"] = position_ids
            return summed_loss(self.model, batch, fast)[0]

    return SupervisedLoss()


def optimizer_step(optimizer, trainable: list, max_grad_norm: float, scaler=None) -> float:
    """Clip and step; returns the gradient norm before clipping.

    With a GradScaler: unscale first, so the clip sees true gradients; `scaler.step` skips
    the step when they overflowed (inf/nan norm), and `update` lowers the scale then.
    """
    import torch

    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def mean_completion_loss(model, examples: Sequence, pad_id: int, device: str, batch_size: int = 8) -> float:
    """Token-weighted mean loss on the supervised tokens of `examples` (no gradients).

    The loss path is checked on the first batch, as in training."""
    import torch

    from datagen.finetune.data import collate, plan_batches

    batches = plan_batches([len(e.input_ids) for e in examples], batch_size, 0, packing=False, max_length=0)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    fast = None
    with torch.inference_mode():
        for batch in batches:
            tensors = _to_device(collate(examples, batch, pad_id), device)
            if fast is None:
                fast = check_fast_loss(model, tensors) is None
            loss, tokens = summed_loss(model, tensors, fast)
            total += float(loss)
            count += tokens
    model.train(was_training)
    return total / max(1, count)


def _to_device(tensors: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in tensors.items()}


# ----------------------------------------------------------------------------- checkpoints


def fingerprint(config: FinetuneConfig, data_ids: Sequence[Sequence[int]], base_path: str,
                world_size: int = 1) -> str:
    """What a checkpoint must match to be resumed: the settings that shape training and the data.

    The number of ranks shapes the global batch; ddp and fsdp train the same numbers but save
    the optimiser state in different layouts, so one does not resume the other."""
    digest = hashlib.sha256()
    # prompt_erasure and generic_system shape the data, which is hashed below; leaving them (and
    # distributed, and a world size of 1) out keeps checkpoints made before those options existed resumable
    ignored = {"save_every", "keep_checkpoints", "merge", "device", "prompt_erasure", "generic_system", "distributed"}
    digest.update(config.model_dump_json(exclude=ignored).encode())
    digest.update(base_path.encode())
    if world_size > 1:
        digest.update(f"world_size={world_size} distributed={config.distributed}".encode())
    for ids in data_ids:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(bytes(str(ids), "ascii"))
    return digest.hexdigest()


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.pt").exists())
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep: int,
                    scaler=None, *, model_state: dict[str, Any] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Adapter + optimiser + scheduler position + RNG into `step-NNNNNN`, atomically (temp dir, rename).

    state: what else to keep, with `RNG_BY_RANK`: every rank's `rng_state`, in rank order
    (gathered). model_state / optimizer_state: the adapter's and the optimiser's state gathered
    from FSDP shards (else the live objects')."""
    import torch

    final = folder / f"{CHECKPOINT_PREFIX}{step:06d}"

    def write(staging: Path) -> None:
        model.save_pretrained(staging, state_dict=model_state)
        torch.save(
            {**state, "step": step,
             "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None},
            staging / "state.pt",
        )

    write_dir_atomic(final, write)
    for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, expected_fingerprint: str, scaler=None) -> int:
    """Restore a checkpoint into the live objects; return its step. Refuses one made from
    other data or settings: resuming it would silently train something else."""
    state = read_checkpoint(path, expected_fingerprint)
    restore_adapter(path, model)
    restore_training_state(state, optimizer, scheduler, scaler)
    return state["step"]


def read_checkpoint(path: Path, expected_fingerprint: str) -> dict[str, Any]:
    """A checkpoint's state.pt, refused when made from other data or settings."""
    import torch

    state = torch.load(path / "state.pt", weights_only=False)
    if state["fingerprint"] != expected_fingerprint:
        raise DatagenError(
            f"{path.parent}: checkpoints were made with other data or settings; "
            "use another --out or delete that folder to start over"
        )
    return state


def restore_adapter(path: Path, model) -> None:
    """The checkpoint's adapter weights into the (not yet sharded) peft model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))


def restore_training_state(state: dict[str, Any], optimizer, scheduler, scaler=None, rank: int = 0,
                           load_optimizer: Callable[[dict[str, Any]], None] | None = None,
                           device: str = "cpu") -> None:
    """Optimiser, scheduler, loss scale and this rank's RNG from a checkpoint's state.

    load_optimizer: how a full (FSDP-gathered) optimiser state goes back into shards.
    device: this rank's, whose CUDA generator gets the rank's saved CUDA state."""
    (load_optimizer or optimizer.load_state_dict)(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    restore_rng(rank_rng_state(state, rank), device)


RNG_BY_RANK = "rng_by_rank"  # a checkpoint's per-rank `rng_state`s, in rank order


def rng_state(device: str = "cpu") -> dict[str, Any]:
    """This process's random state: torch's CPU generator and, on a GPU, the generator of its
    device (`device`), which draws the dropout masks there. Each rank has its own (seeded
    seed + rank), so a checkpoint keeps one per rank (`RNG_BY_RANK`)."""
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None}


def rank_rng_state(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank `rank`'s own `rng_state` in a checkpoint's state.

    Checkpoints written before `RNG_BY_RANK` kept torch's state per rank ("torch_rng_by_rank")
    but the CUDA state of rank 0's GPUs only ("cuda_rng"): that is rank 0's alone, and the
    other ranks keep the CUDA state their own seed gave them."""
    by_rank = state.get(RNG_BY_RANK)
    if by_rank:
        return by_rank[rank]
    torch_by_rank = state.get("torch_rng_by_rank")
    return {"torch": torch_by_rank[rank] if torch_by_rank else state["torch_rng"],
            "cuda": state.get("cuda_rng") if rank == 0 else None, "cuda_all_devices": True}


def restore_rng(saved: dict[str, Any], device: str = "cpu") -> None:
    """Put `rng_state(device)`'s result back (a CUDA state only where there is CUDA)."""
    import torch

    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        if saved.get("cuda_all_devices"):  # an old checkpoint's state of every visible GPU
            torch.cuda.set_rng_state_all(saved["cuda"])
        else:
            torch.cuda.set_rng_state(saved["cuda"], device)


# ----------------------------------------------------------------------------- training


def micro_batches(plan_epoch: Callable[[int], list], start: int, count: int) -> list[tuple[int, Any]]:
    """Micro-batches number `start`..`start+count-1` of the endless stream epoch 0, 1, 2, …"""
    chosen, epoch, offset = [], 0, 0
    batches = plan_epoch(0)
    while len(chosen) < count:
        index = start + len(chosen)
        while index >= offset + len(batches):
            offset += len(batches)
            epoch += 1
            batches = plan_epoch(epoch)
        chosen.append((epoch, batches[index - offset]))
    return chosen


def train(
    config: FinetuneConfig,
    data: str | Path,
    out_dir: str | Path,
    *,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune (resuming from the last checkpoint in `out_dir`), save the adapter and
    the merged model; return the summary also written to `out_dir/summary.json`.

    Under torchrun every rank calls this (`datagen.finetune.distributed`): each trains on
    its share of the same global batches; rank 0 alone writes logs, checkpoints, adapter,
    merged model and summary, and shows progress."""
    from datagen.finetune.distributed import start

    context = start(config.device)
    try:
        return _train(config, data, Path(out_dir), show_progress and context.is_main, context)
    finally:
        context.close()


def _train(config: FinetuneConfig, data: str | Path, out_dir: Path, show_progress: bool, context) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from datagen.finetune.data import collate, encode_all, load_conversations, plan_batches
    from datagen.finetune.distributed import (
        full_optimizer_state,
        load_full_optimizer_state,
        rank_share,
        sync_gradients,
        trainable_state_dict,
        wrap,
    )
    from datagen.model_paths import resolve_model

    device, world, main = context.device, context.world_size, context.is_main
    if config.method == "qlora":
        require_qlora_support(device)
    precision = precision_for(config, device)
    base_path = resolve_model(config.base)
    conversations = load_conversations(data, prompt_erasure=config.prompt_erasure,
                                       generic_system=config.generic_system)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model_limit = _context_length(base_path)
    encoded = encode_all(
        tokenizer, conversations, max_length=config.max_length, model_limit=model_limit,
        auto_cap=config.max_length_cap, overlong=config.overlong,
    )
    examples = encoded.examples
    lengths = [len(e.input_ids) for e in examples]

    def plan_epoch(epoch: int):
        return plan_batches(lengths, config.batch_size, config.seed + epoch,
                            packing=config.packing, max_length=encoded.max_length)

    # one optimiser step: grad_accum micro-batches on each of `world` ranks
    per_step = config.grad_accum * world
    batches_per_epoch = len(plan_epoch(0))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / per_step))
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup = int(config.warmup_ratio * total_steps)
    sharded = context.distributed and config.distributed == "fsdp"
    if sharded and precision.loss_scaling:
        # a GradScaler would see only this rank's shard of the gradients when checking for overflow
        raise ConfigError("finetune.distributed: fsdp with float16 compute is not supported; use bfloat16 or ddp")

    torch.manual_seed(config.seed)  # the same fresh adapter on every rank
    # FSDP + LoRA: only rank 0 reads the student, into host memory; the other ranks build it
    # on the meta device (no memory) and, once sharded, receive their shards, the fresh
    # adapter and the buffers from rank 0 (`wrap(..., from_main=True)`). No GPU ever holds
    # all of it, and host memory holds it once, not once per rank. Rank 0 alone runs the
    # start-up checks, which need real weights. (QLoRA is never sharded: FinetuneConfig
    # refuses it under FSDP; under DDP every rank loads its own 4-bit copy.)
    from_main = sharded and config.method == "lora"
    empty = from_main and not main
    load_device = "cpu" if from_main else device
    # what rank 0 alone runs goes through `_on_main`, so a failure there reaches every rank
    # instead of leaving them waiting in the next collective
    model = _on_main(context, from_main, lambda: load_student(config, base_path, load_device, precision))
    if empty:
        model = load_student(config, base_path, load_device, precision, empty=True)
    model.train()
    if config.packing:
        _on_main(context, from_main, lambda: check_packing(model, examples, pad_id, load_device), share=True)
    if context.distributed:
        torch.manual_seed(config.seed + context.rank)  # each rank its own dropout masks

    checkpoints = out_dir / "checkpoints"
    print_ = _printer(show_progress)
    run_fingerprint = fingerprint(config, [e.input_ids for e in examples], base_path, world)
    step, resumed_from, resume_state = 0, None, None
    last = latest_checkpoint(checkpoints)
    if last is not None:
        resume_state = read_checkpoint(last, run_fingerprint)
        # an empty rank gets the restored adapter from rank 0 with its shards
        _on_main(context, from_main, lambda: restore_adapter(last, model))
        step = resumed_from = resume_state["step"]
        print_(f"resuming from {last} (step {step} of {total_steps})")
    if encoded.dropped_overlong:
        print_(f"dropped {len(encoded.dropped_overlong)} examples longer than {encoded.max_length} tokens "
               f"(first: {encoded.dropped_overlong[0]})")

    def step_batches(at: int) -> list[dict[str, Any]]:
        chunk = micro_batches(plan_epoch, at * per_step, per_step)
        mine = rank_share(chunk, context.rank, world)
        return [_to_device(collate(examples, batch, pad_id), device) for _epoch, batch in mine]

    # The loss path is decided once, before wrapping, on the step's first global micro-batch
    # (the same one on every rank, so every rank decides alike).
    fast_loss, loss_note = None, None
    if step < total_steps:
        _epoch, first = micro_batches(plan_epoch, step * per_step, 1)[0]
        first_batch = _to_device(collate(examples, first, pad_id), load_device)
        loss_note = _on_main(context, from_main, lambda: check_fast_loss(model, first_batch), share=True)
        fast_loss = loss_note is None
        if loss_note:
            print_(f"loss: {loss_note}; using the model's own forward ({LOSS_PATH_FULL})")
    wrapped = wrap(loss_module(model, fast_loss is not False), model, config.distributed, context, from_main=from_main)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding: its DTensors
    optimizer = make_optimizer(config, trainable, device)
    scaler = make_grad_scaler(precision, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.scheduler)
    )
    if resume_state is not None:
        load_optimizer = (lambda full: load_full_optimizer_state(wrapped, optimizer, full)) if sharded else None
        restore_training_state(resume_state, optimizer, scheduler, scaler, context.rank, load_optimizer, device)
        del resume_state

    def checkpoint() -> None:
        # gathering shards and RNG states is collective: every rank takes part, rank 0 writes
        model_state = _adapter_state(trainable_state_dict(wrapped, context, config.distributed))
        optimizer_state = full_optimizer_state(wrapped, optimizer) if sharded else None
        rngs = context.gather(rng_state(device))  # each rank's own, CUDA's included
        if main:
            save_checkpoint(checkpoints, step, model, optimizer, scheduler,
                            {"fingerprint": run_fingerprint, "world_size": world, RNG_BY_RANK: rngs},
                            config.keep_checkpoints, scaler, model_state=model_state, optimizer_state=optimizer_state)
        context.barrier()

    log_path = out_dir / "train_log.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, step)
    global_batch = config.batch_size * per_step
    if context.distributed:
        print_(f"{world} ranks ({config.distributed}, {context.backend}), global batch {global_batch} "
               f"{'rows' if config.packing else 'sequences'} = {config.batch_size} x {config.grad_accum} accumulation "
               f"x {world} ranks")
    started = time.monotonic()
    tokens_seen = 0
    sync = (lambda last: sync_gradients(wrapped, last)) if context.distributed else None
    with _progress(show_progress, total_steps, step, world) as advance, \
            (log_path.open("a") if main else _NullLog()) as log:
        while step < total_steps:
            tensors = step_batches(step)
            local_supervised = supervised_count(tensors)
            local_tokens = sum(t["tokens"] for t in tensors)
            global_supervised, step_tokens = (int(v) for v in context.sum([local_supervised, local_tokens]))
            local_loss = accumulate_gradients(model, tensors, fast_loss, scaler, loss_fn=lambda b: wrapped(**b),
                                              supervised=max(1, global_supervised), scale=world, sync=sync)
            [step_loss] = context.sum([local_loss])
            grad_norm = optimizer_step(optimizer, trainable, config.max_grad_norm, scaler)
            scheduler.step()
            step += 1
            tokens_seen += step_tokens
            elapsed = time.monotonic() - started
            record = {
                "step": step, "epoch": round(step / steps_per_epoch, 4), "loss": round(step_loss, 6),
                "lr": scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 4), "tokens": step_tokens,
                "supervised": global_supervised, "tokens_per_s": round(tokens_seen / elapsed, 1),
                "elapsed_s": round(elapsed, 2),
            }
            if context.distributed:
                record["tokens_per_s_per_rank"] = round(tokens_seen / elapsed / world, 1)
            if main:
                log.write(json.dumps(record) + "\n")
                log.flush()
            advance(record)
            if step % config.save_every == 0 or step == total_steps:
                checkpoint()
    train_seconds = time.monotonic() - started
    finished = step >= total_steps
    peaks = context.gather(peak_memory_mib(device))
    summary: dict[str, Any] = {
        "finished": finished, "step": step, "total_steps": total_steps, "resumed_from_step": resumed_from,
        "method": config.method, "base": config.base, "base_path": base_path, "device": device,
        "world_size": world, "distributed": config.distributed if context.distributed else None,
        "global_batch": global_batch,
        "compute_dtype": precision.dtype, "loss_scaling": precision.loss_scaling,
        "loss_path": None if fast_loss is None else (LOSS_PATH_FAST if fast_loss else LOSS_PATH_FULL),
        "loss_path_note": loss_note,
        "data": str(data), "examples": len(examples), "dropped_overlong": encoded.dropped_overlong,
        "max_length": encoded.max_length, "length_stats": encoded.length_stats,
        "trainable_parameters": sum(p.numel() for p in trainable) if not sharded else None,
        "tokens_this_run": tokens_seen, "train_seconds_this_run": round(train_seconds, 2),
        "tokens_per_s": round(tokens_seen / train_seconds, 1) if train_seconds > 0 else None,
        "tokens_per_s_per_rank": round(tokens_seen / train_seconds / world, 1) if train_seconds > 0 else None,
        "peak_memory_mib": max(peaks), "peak_memory_mib_per_rank": peaks,
        "final_loss": _last_logged_loss(log_path) if main else None,
        "config": config.model_dump(mode="json"),
    }
    if sharded:
        summary["trainable_parameters"] = int(context.sum([sum(p.to_local().numel() if hasattr(p, "to_local")
                                                               else p.numel() for p in trainable)])[0])
    if finished:
        adapter_dir = out_dir / "adapter"
        model_state = _adapter_state(trainable_state_dict(wrapped, context, config.distributed))
        if main:
            write_dir_atomic(adapter_dir, lambda target: (model.save_pretrained(target, state_dict=model_state),
                                                          tokenizer.save_pretrained(target)))
        summary["adapter"] = str(adapter_dir)
        del model, optimizer, wrapped
        context.barrier()
        if config.merge and main:
            summary["merged"] = str(merge_adapter(base_path, adapter_dir, out_dir / "merged"))
    if main:
        atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _on_main(context, only_main: bool, action: Callable[[], Any], share: bool = False) -> Any:
    """action()'s result, run on every rank; with `only_main`, on rank 0 (the one holding real
    weights) alone, and the other ranks learn how it ended, so none waits in a collective for
    a rank that failed: rank 0's ConfigError is raised on every rank, any other failure as a
    DatagenError naming it (rank 0 raises its own). With `share` the others get rank 0's
    (picklable) result, else None."""
    if not only_main:
        return action()
    if not context.is_main:
        outcome = context.from_main(None)
        if outcome[0] == "config":
            raise ConfigError(outcome[1])
        if outcome[0] == "error":
            raise DatagenError(f"rank 0 failed: {outcome[1]}")
        return outcome[1]
    try:
        result = action()
    except Exception as error:
        context.from_main(("config" if isinstance(error, ConfigError) else "error",
                           str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"))
        raise
    context.from_main(("result", result if share else None))
    return result


def _adapter_state(full: dict[str, Any] | None) -> dict[str, Any] | None:
    """The peft model's keys of the loss module's gathered state dict (its `model.` prefix off)."""
    if full is None:
        return None
    prefix = "model."
    return {key[len(prefix):]: value for key, value in full.items() if key.startswith(prefix)}


class _NullLog:
    """Where ranks other than 0 write their log lines: nowhere."""

    def __enter__(self) -> _NullLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def write(self, text: str) -> None:
        return None

    def flush(self) -> None:
        return None


def merge_adapter(base_path: str, adapter_dir: Path, target: Path) -> Path:
    """Reload the base in full precision, merge the adapter into it, save a plain model.

    Never merges into 4-bit weights: a QLoRA adapter is merged into the float base.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    write_dir_atomic(target, lambda folder: (merged.save_pretrained(folder), tokenizer.save_pretrained(folder)))
    return target


def peak_memory_mib(device: str) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on CPU."""
    import resource

    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _context_length(base_path: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(base_path), "max_position_embeddings", 8192) or 8192)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (a resumed run rewrites the ones after it)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _last_logged_loss(path: Path) -> float | None:
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["loss"] if lines else None


def _printer(enabled: bool) -> Callable[[str], None]:
    import sys

    return (lambda text: print(text, file=sys.stderr)) if enabled else (lambda text: None)


class _progress:
    """Progress with loss, tokens/s (and per rank when there are several) and ETA
    (datagen.progress); silent when disabled."""

    def __init__(self, enabled: bool, total: int, done: int, world_size: int = 1):
        self.enabled, self.total, self.done, self.world_size = enabled, total, done, world_size

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        if not self.enabled:
            return lambda record: None
        from datagen.progress import progress

        several = self.world_size > 1
        label = f"sft x{self.world_size} ranks" if several else "sft"
        fields = ("loss", "tok/s", "tok/s/rank") if several else ("loss", "tok/s")
        self.shown = progress(label, total=self.total, done=self.done, fields=fields)
        bar = self.shown.__enter__()

        def advance(record: dict[str, Any]) -> None:
            shown = {"tok/s": f"{record['tokens_per_s']:.0f}"}
            if several:
                shown["tok/s/rank"] = f"{record['tokens_per_s_per_rank']:.0f}"
            bar.advance(1, loss=f"{record['loss']:.4f}", **shown)

        return advance

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            self.shown.__exit__(*exc_info)
