"""Checkpoints of an adapter run: what one must match to be resumed (`fingerprint`), writing
them atomically, finding the latest, and putting adapter, optimiser, scheduler, loss scale and
each rank's random state back.

    OUT/checkpoints/step-000050/   adapter_model.safetensors (peft) + state.pt

Kill a run and rerun the same command: it resumes from the latest and ends with the weights
an uninterrupted run would have. One made from other data or settings is refused.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datagen.errors import DatagenError
from datagen.finetune.config import AdapterConfig
from datagen.io import write_dir_atomic

CHECKPOINT_PREFIX = "step-"
RNG_BY_RANK = "rng_by_rank"  # a checkpoint's per-rank `rng_state`s, in rank order


def fingerprint(config: AdapterConfig, data_ids: Sequence[Sequence[int]], base_path: str,
                world_size: int = 1) -> str:
    """What a checkpoint must match to be resumed: the settings that shape training and the data.

    The number of ranks shapes the global batch; ddp and fsdp train the same numbers but save
    the optimiser state in different layouts, so one does not resume the other."""
    from pydantic_core import to_json

    digest = hashlib.sha256()
    # pydantic's own JSON (its float spelling), as the checkpoints made before were hashed
    digest.update(to_json(config.fingerprint_settings()))
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
