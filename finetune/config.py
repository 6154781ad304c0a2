"""The `finetune:` and `dpo:` config sections: what an adapter run shares, and what each recipe adds.

    AdapterConfig     the student, LoRA / QLoRA, optimisation, lengths, runtime, checkpoints
    FinetuneConfig    + SFT's data options (packing, Orca prompt erasure)      `finetune:`
    DPOConfig         + the DPO loss and its reference policy                  `dpo:`

YAML keys are the field names. A `dpo:` section that sets an SFT-only field gets one error
line naming it (`SFT_ONLY_FIELDS`), not a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from datagen.config import DEFAULT_MODEL, Strict
from datagen.errors import ConfigError

# FSDP2's fully_shard over bitsandbytes' Params4bit is reported to give wrong outputs or lose
# the quantisation state (bitsandbytes #1945, accelerate #3983); no GPU run here has shown
# otherwise, so the combination is refused when the config is read, before anything loads.
QLORA_FSDP_REFUSAL = ("method qlora under fsdp is not supported yet (sharding bitsandbytes' 4-bit weights is "
                      "reported to corrupt them: bitsandbytes #1945, accelerate #3983); use distributed: ddp")
# FSDP2 unshards parameters only inside the sharded module's forward; DPO's reference pass,
# on-the-fly references and final metrics call the peft model outside it
DPO_FSDP_REFUSAL = ("dpo: distributed: fsdp is not supported (the reference and final-metric passes run "
                    "the model outside FSDP's sharded forward); use distributed: ddp")
# SFT's data options with the values DPO configs carried (and ignored) before the sections split
SFT_ONLY_FIELDS: dict[str, Any] = {"packing": False, "prompt_erasure": False, "generic_system": None,
                                   "input_format": None, "split": None}
# Settings that do not change what is trained; a checkpoint's fingerprint leaves them out.
# prompt_erasure and generic_system shape the data, which is hashed itself; leaving them (and
# distributed, and a world size of 1) out keeps checkpoints made before those options existed resumable
NOT_FINGERPRINTED = frozenset({"save_every", "keep_checkpoints", "merge", "device", "prompt_erasure",
                               "generic_system", "distributed", "input_format", "split"})


class AdapterConfig(Strict):
    """What every adapter run (SFT or DPO) is made of. Defaults suit a small student."""

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

    # why this recipe cannot be sharded, or None where it can
    fsdp_refusal: ClassVar[str | None] = None

    @field_validator("distributed")
    @classmethod
    def _no_qlora_under_fsdp(cls, value: str, info: ValidationInfo) -> str:
        """Refuse QLoRA under FSDP as the config is read (see QLORA_FSDP_REFUSAL)."""
        if value == "fsdp" and info.data.get("method") == "qlora":
            raise ValueError(QLORA_FSDP_REFUSAL)
        return value

    def check_distributed(self, several_ranks: bool) -> None:
        """Refuse `distributed: fsdp` on several ranks for a recipe that cannot be sharded:
        said once, by the launcher before torchrun starts and by the run on every rank."""
        if several_ranks and self.distributed == "fsdp" and self.fsdp_refusal:
            raise ConfigError(self.fsdp_refusal)

    def fingerprint_settings(self) -> dict[str, Any]:
        """The settings a checkpoint's fingerprint hashes, in the field order of the config
        they were hashed from before SFT and DPO shared a base (so those checkpoints resume)."""
        settings = {**self.model_dump(mode="json"), **{k: v for k, v in SFT_ONLY_FIELDS.items()
                                                       if k not in type(self).model_fields}}
        order = [*FINGERPRINT_ORDER, *(k for k in settings if k not in FINGERPRINT_ORDER)]
        return {key: settings[key] for key in order if key in settings and key not in NOT_FINGERPRINTED}


# the fields of FinetuneConfig in their order before the split (DPOConfig added its own after them)
FINGERPRINT_ORDER = (
    "base", "method", "r", "alpha", "dropout", "target_modules", "learning_rate", "epochs", "max_steps",
    "batch_size", "grad_accum", "warmup_ratio", "scheduler", "weight_decay", "max_grad_norm", "max_length",
    "max_length_cap", "overlong", "packing", "prompt_erasure", "generic_system", "seed", "device", "dtype",
    "gradient_checkpointing", "distributed", "save_every", "keep_checkpoints", "merge",
)


class FinetuneConfig(AdapterConfig):
    """SFT settings (`finetune:`): the adapter run's plus how conversations become rows."""

    packing: bool = False
    # Orca 2 prompt erasure when training on task JSONL: Orca tasks get the generic system
    # message (datagen.chat.GENERIC_SYSTEM) instead of their own (exports apply it themselves)
    prompt_erasure: bool = False
    # None: generate.orca.generic_system of the same config file (the export's), else the default
    generic_system: str | None = Field(None, min_length=1)
    # what the data is and which split (datagen.readers; --input-format / --split): detected when None
    input_format: str | None = None
    split: str | None = None


class DPOConfig(AdapterConfig):
    """DPO settings (`dpo:`): the adapter run's (`method` is the adapter kind, lora or qlora)
    plus the DPO loss. Defaults suit LoRA DPO of a small student."""

    # No LoRA dropout: the reference log-probs come from the same model without dropout (eval
    # mode), so dropout on the policy alone would put noise into every log-ratio the loss compares
    # (TRL's DPO turns dropout off by default for the same reason). SFT keeps its 0.05.
    dropout: float = Field(0.0, ge=0, lt=1)
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # sigmoid loss only
    precompute_reference: bool = True
    learning_rate: float = Field(5e-5, gt=0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)  # pairs per micro-batch (2x sequences)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)

    fsdp_refusal: ClassVar[str | None] = DPO_FSDP_REFUSAL

    @model_validator(mode="before")
    @classmethod
    def _no_sft_only_fields(cls, data: Any) -> Any:
        """An SFT-only key is named, not reported as a typo: DPO configs used to accept (and ignore) it."""
        if isinstance(data, dict):
            for key in SFT_ONLY_FIELDS:
                if key in data:
                    raise ValueError(f"{key} is an SFT setting (the finetune: section); DPO does not use it: "
                                     "remove it")
        return data
