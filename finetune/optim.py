"""One optimiser step's pieces: AdamW (paged on a GPU for QLoRA), the learning-rate schedule
(warm-up then cosine / linear / constant), gradient accumulation with a loss weighted across
micro-batches (and ranks), clipping, and fp16 loss scaling.

    optimizer = make_optimizer(config, trainable, device)
    loss = accumulate_gradients(model, micro_batches)        # backward on each, summed loss back
    grad_norm = optimizer_step(optimizer, trainable, config.max_grad_norm)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from datagen.finetune.config import AdapterConfig
from datagen.finetune.losses import summed_loss, supervised_count


def make_optimizer(config: AdapterConfig, parameters: list, device: str):
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
