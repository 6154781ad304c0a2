"""The student: device and precision, QLoRA's requirements, loading the base with a fresh LoRA
adapter, the tokenizer, and merging a trained adapter back into a plain model.

    device = pick_device("auto")
    model = load_student(config, resolve_model(config.base), device)   # peft model, ready to train

QLoRA loads the base in 4-bit NF4 with double quantisation (bitsandbytes; not the library
defaults) and prepares it for k-bit training. Weights are stored in NF4; matmuls compute in
bf16, or in fp16 with loss scaling on a GPU without bf16, or in float32 on a CPU without fast
bf16. It is refused under FSDP (`datagen.finetune.config.QLORA_FSDP_REFUSAL`).

Precision (`choose_precision`): float32 on CPU (bf16 for QLoRA on a CPU with fast bf16: AVX-512
or newer), bf16 on a GPU that has it, otherwise fp16. fp16 compute always trains with a
`torch.amp.GradScaler` (the LoRA weights themselves stay float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from datagen.errors import ConfigError, DatagenError
from datagen.finetune.config import AdapterConfig
from datagen.io import write_dir_atomic

# Non-reentrant activation checkpointing: the reentrant kind runs backward hooks outside
# autograd's graph, which DDP's gradient hooks and FSDP's resharding cannot see.
CHECKPOINTING_KWARGS = {"use_reentrant": False}
# The first bitsandbytes whose CPU backend was seen training 4-bit NF4 layers under LoRA here
# (0.50.2, torch 2.13); CUDA QLoRA works with older ones.
QLORA_CPU_BITSANDBYTES = "0.50"


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


def has_fast_bf16(device: str) -> bool:
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


def precision_for(config: AdapterConfig, device: str) -> Precision:
    return choose_precision(config.dtype, device, has_fast_bf16(device), quantized=config.method == "qlora")


def pick_dtype(setting: str, device: str):
    """The torch dtype `choose_precision` picks for a LoRA run (bench/sft.py uses it too)."""
    import torch

    return getattr(torch, choose_precision(setting, device, has_fast_bf16(device)).dtype)


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


def load_student(config: AdapterConfig, base_path: str, device: str, precision: Precision | None = None,
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


def context_length(base_path: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(base_path), "max_position_embeddings", 8192) or 8192)


def load_tokenizer(base_path: str):
    """The base's tokenizer and the id batches are padded with (its pad token, else EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id
