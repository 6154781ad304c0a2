"""Losses and the start-up checks that decide how they are computed.

SFT: completion-only cross-entropy summed over supervised tokens (`summed_loss`), weighted by
the step's supervised tokens in `datagen.finetune.optim.accumulate_gradients`. DPO: sequence
log-probabilities over the response tokens (`sequence_logps`) and the pair loss (`dpo_loss`).

Both run the output layer only at the positions that predict a supervised token (prompt
logits are most of a step's memory over a 49k vocabulary) where that gives the model's own
loss; `check_fast_loss` decides once per run, on the data's first batch. Families that
post-process logits (soft-capping, scaling, multipliers) take the full-logits path.
`check_packing` refuses packing where this transformers lets packed examples attend to each other.

DDP and FSDP2 see only the work inside the forward of the module they wrap, so a run wraps
`loss_module` (SFT) or `logps_module` (DPO), whose forward does all of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from datagen.errors import ConfigError

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


def loss_path_name(fast: bool | None) -> str | None:
    """summary.json's "loss_path" for a run that decided `fast` (None: it never decided)."""
    return None if fast is None else (LOSS_PATH_FAST if fast else LOSS_PATH_FULL)


def logits_of(model, batch: dict[str, Any]):
    """The model's logits for a collated batch.

    No KV cache: transformers only turns restarting position ids into per-example
    attention (packing) when no cache is passed, and training never needs one.
    """
    return model(**model_inputs(batch), use_cache=False).logits


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
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
        hidden = causal_lm.base_model(**model_inputs(batch), use_cache=False).last_hidden_state
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][supervised])
    else:
        logits = logits_of(model, batch)[:, :-1][supervised]
    return logits.float(), labels[supervised], supervised


def is_half(model) -> bool:
    """Whether `model` computes in half precision: half weights, or 4-bit layers (QLoRA) whose
    matmuls run in a half compute dtype while their weights are stored as integers."""
    import torch

    half = (torch.float16, torch.bfloat16)
    return any(p.dtype in half for p in model.parameters() if p.is_floating_point()) or \
        any(getattr(m, "compute_dtype", None) in half for m in model.modules())


@contextlib.contextmanager
def evaluating(model) -> Iterator[None]:
    """`model` in eval mode (no dropout) for the block, back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_fast_loss(model, batch: dict[str, Any]) -> str | None:
    """None if the supervised-positions loss on `batch` is the model's own loss; else why not.

    The model's own loss is its forward with labels (whatever it does to logits: soft-capping,
    scaling, multipliers). Compared in eval mode (no dropout) without gradients.
    """
    import torch

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if causal_lm.get_output_embeddings() is None or not hasattr(causal_lm, "base_model"):
        return f"{type(causal_lm).__name__} has no separate output layer"
    with evaluating(model), torch.no_grad():
        own = model(**model_inputs(batch), labels=batch["labels"], use_cache=False).loss
        fast_sum, count = summed_loss(model, batch, fast=True)
    if own is None or count == 0:
        return "no supervised token to compare on"
    own, fast = float(own), float(fast_sum) / count
    tolerance = FAST_LOSS_RTOL["half" if is_half(model) else "float32"]
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
    packed = to_device(collate(probes, Batch(((0, 1),)), pad_id), device)
    with evaluating(model), torch.no_grad():
        together = logits_of(model, packed)[0].float()
        alone = model(input_ids=torch.tensor([probes[1].input_ids], device=device), use_cache=False).logits[0]
    start = len(probes[0].input_ids)
    second = together[start : start + len(probes[1].input_ids)]
    difference = float((second - alone.float()).abs().max())
    tolerance = PACKING_RTOL["half" if is_half(model) else "float32"] * float(alone.float().abs().max())
    if not difference <= tolerance:
        raise ConfigError(
            f"finetune.packing: this transformers ({transformers.__version__}) does not isolate packed "
            f"examples; upgrade to >= {PACKING_TRANSFORMERS} or set packing: false"
        )


def supervised_count(batches: Sequence[dict[str, Any]]) -> int:
    """Supervised tokens the loss is summed over in `batches` (labels shifted by one)."""
    return sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)


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


def mean_completion_loss(model, examples: Sequence, pad_id: int, device: str, batch_size: int = 8) -> float:
    """Token-weighted mean loss on the supervised tokens of `examples` (no gradients).

    The loss path is checked on the first batch, as in training."""
    import torch

    from datagen.finetune.data import collate, plan_batches

    batches = plan_batches([len(e.input_ids) for e in examples], batch_size, 0, packing=False, max_length=0)
    total, count = 0.0, 0
    fast = None
    with evaluating(model), torch.inference_mode():
        for batch in batches:
            tensors = to_device(collate(examples, batch, pad_id), device)
            if fast is None:
                fast = check_fast_loss(model, tensors) is None
            loss, tokens = summed_loss(model, tensors, fast)
            total += float(loss)
            count += tokens
    return total / max(1, count)


def to_device(tensors: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in tensors.items()}


# ----------------------------------------------------------------------------- DPO


@dataclass
class DPOTerms:
    losses: Any  # per pair
    chosen_rewards: Any
    rejected_rewards: Any


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0) -> DPOTerms:
    """Per-pair DPO losses and rewards from sequence log-probabilities (tensors of shape [pairs]).

    With h = (log π(c) − log π(r)) − (log π_ref(c) − log π_ref(r)):
    sigmoid: −(1−ε)·log σ(βh) − ε·log σ(−βh) (ε = label_smoothing); ipo: (h − 1/(2β))²."""
    import torch.nn.functional as F

    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return DPOTerms(losses, beta * (policy_chosen - reference_chosen).detach(),
                    beta * (policy_rejected - reference_rejected).detach())


def sequence_logps(model, batch: dict[str, Any], fast: bool = True):
    """Per row: the summed log-probability of its supervised tokens, and their count.

    fast: the output layer only at the positions that predict a supervised token (as
    `summed_loss`; `check_fast_loss` decides once per run whether that is the model's own)."""
    import torch

    logits, targets, supervised = supervised_logits(model, batch, fast)
    token_logps = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    rows = supervised.nonzero()[:, 0]
    sums = torch.zeros(supervised.shape[0], dtype=torch.float32, device=supervised.device).index_add(
        0, rows, token_logps)
    return sums, supervised.sum(1)


def logps_module(model, fast: bool):
    """An nn.Module whose forward is `sequence_logps(model, batch, fast)`: DDP sees only the
    work inside the forward of the module it wraps, and the fast path calls the base model and
    the output layer separately. Call it as `module(**batch)` (extra keys ignored)."""
    import torch

    class SequenceLogps(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, labels, attention_mask=None, **_ignored):
            batch = {"input_ids": input_ids, "labels": labels}
            if attention_mask is not None:
                batch["attention_mask"] = attention_mask
            return sequence_logps(self.model, batch, fast)

    return SequenceLogps()
