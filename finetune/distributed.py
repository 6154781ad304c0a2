"""Several processes for one SFT or DPO run: torchrun's environment, DDP / FSDP2 wrapping,
the share of each global batch a rank trains on, and the torchrun command line.

`datagen finetune --nproc N` runs `python -m torch.distributed.run --nproc_per_node N
-m datagen.finetune ARGS` (see `torchrun_command`); each worker then calls `start()`, which
reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and joins the process group (nccl on
CUDA, gloo on CPU). Without torchrun `start()` returns a one-process context and touches
nothing, so the single-process path is the same code.

Batches: every rank plans the SAME epoch (same seed, same length-grouped or packed
batches) and one optimiser step consumes `grad_accum * world_size` consecutive
micro-batches of that stream; rank r takes micro-batches r, r + W, r + 2W, ...
(`rank_share`). So N ranks with accumulation k train on exactly the batches of one
process with accumulation k * N, and the loss (summed over supervised tokens, divided by
the step's supervised tokens over all ranks) is the same global token mean. DPO
(`datagen.finetune.dpo`, DDP only) shares the same pieces; its loss is summed over pairs
and divided by the step's pairs over all ranks.

    from datagen.finetune.distributed import start
    context = start("auto")
    try:
        ...
    finally:
        context.close()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from datagen.errors import ConfigError

Strategy = Literal["ddp", "fsdp"]
# torchrun's launcher, run as a module so the console script's location never matters
TORCHRUN_MODULE = "torch.distributed.run"
WORKER_MODULE = "datagen.finetune"

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run: its rank, how many there are, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64, so token counts stay exact)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64,
                              device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, value)
        return found

    def from_main(self, value: T) -> T:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def world_from_env(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    env = os.environ if env is None else env
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def start(device_setting: str) -> DistContext:
    """This process's context; joins torchrun's process group when there are several ranks.

    Device "auto": cuda:LOCAL_RANK where CUDA exists, else cpu. Backend: nccl on CUDA, gloo on CPU.
    """
    import torch

    rank, world, local = world_from_env()
    cuda = torch.cuda.is_available()
    if world == 1:
        return DistContext(device=("cuda" if cuda else "cpu") if device_setting == "auto" else device_setting)
    if device_setting == "cuda" or (device_setting == "auto" and cuda):
        device = f"cuda:{local}"  # one GPU per rank
    else:
        device = "cpu" if device_setting == "auto" else device_setting
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local, device, backend)


def rank_share(chunk: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The micro-batches of one optimiser step's global chunk that `rank` trains on."""
    if len(chunk) % world_size:
        raise ValueError(f"{len(chunk)} micro-batches do not split evenly over {world_size} ranks")
    return list(chunk[rank::world_size])


def wrap(module, model, strategy: str, context: DistContext, from_main: bool = False):
    """`module` (whose forward runs all of `model`'s training work) as a run calls it:
    plain, DDP-wrapped or FSDP2-sharded (each decoder block, then the whole).

    from_main (fsdp): only rank 0's module holds weights; the others were built on the meta
    device. After sharding, every rank's shards, and its buffers, are filled from rank 0's
    (`load_from_main`), so no rank but 0 ever reads or holds the whole model."""
    if not context.distributed:
        return module
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            import torch

            raise ConfigError(f"finetune.distributed: fsdp needs torch >= 2.6 (FSDP2 fully_shard); this is "
                              f"{torch.__version__}: upgrade it or use ddp") from None

        from torch.distributed.device_mesh import init_device_mesh

        # the mesh's device is where the shards live: this rank's GPU, or the CPU under gloo
        mesh = init_device_mesh("cuda" if context.device.startswith("cuda") else "cpu", (context.world_size,))
        # rank 0's whole state, taken before sharding swaps its parameters for shards
        whole = module.state_dict() if from_main and context.is_main else {}
        for block in decoder_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        if from_main:
            load_from_main(module, whole, context)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.local_rank] if context.device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=device_ids)


def load_from_main(sharded, whole: dict[str, Any], context: DistContext) -> None:
    """Rank 0's `whole` state dict (taken before sharding; `{}` on the other ranks) into
    every rank's FSDP2 shards of `sharded`, and rank 0's buffers into every rank's
    (collective). Ranks built on the meta device get real, uninitialised memory first.

    Buffers are not sharded, and non-persistent ones (rotary `inv_freq`) are in no state
    dict, so a meta-built rank would otherwise keep them uninitialised: they are broadcast
    one by one, in the module's own (identical) order."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not context.is_main:
        sharded.to_empty(device=torch.device(context.device))
    for _name, buffer in sharded.named_buffers():
        staging = buffer if buffer.is_contiguous() else buffer.contiguous()
        dist.broadcast(staging, src=0)
        if staging is not buffer:
            buffer.copy_(staging)
    set_model_state_dict(sharded, whole,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def decoder_blocks(model) -> list:
    """The repeated transformer blocks (what FSDP shards one by one): transformers names
    their classes in `_no_split_modules`."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    blocks = [m for m in causal_lm.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"finetune.distributed: fsdp: {type(causal_lm).__name__} names no decoder block class "
                          "to shard (_no_split_modules); use distributed: ddp")
    return blocks


def sync_gradients(wrapped, enabled: bool) -> None:
    """Whether the next backward all-reduces gradients: only the last micro-batch of a step
    needs to (the others only accumulate locally)."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    elif hasattr(wrapped, "require_backward_grad_sync"):  # DDP (what no_sync() toggles)
        wrapped.require_backward_grad_sync = enabled


def trainable_state_dict(wrapped, context: DistContext, strategy: str) -> dict[str, Any] | None:
    """The wrapped module's trainable (adapter) parameters, whole, gathered from FSDP2's shards
    into rank 0's host memory (collective: every rank calls it); None when nothing is sharded
    (the live model's own state is whole).

    Only what a checkpoint or the adapter saves: gathering the frozen base as well would put
    all of it on rank 0's host at every checkpoint (~140 GB for a 70B student in bf16)."""
    if strategy != "fsdp" or not context.distributed:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=True))


def full_optimizer_state(wrapped, optimizer) -> dict[str, Any]:
    """The optimiser's state gathered from FSDP2's shards, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer, options=_full_options())


def load_full_optimizer_state(wrapped, optimizer, state: dict[str, Any]) -> None:
    """`full_optimizer_state`'s result back into this rank's shards (collective)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, state, options=_full_options(loading=True))


def _full_options(loading: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=not loading)


def torchrun_command(
    python: str,
    nproc: int,
    worker_args: Sequence[str],
    *,
    nnodes: str | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    """`python -m torch.distributed.run ... -m datagen.finetune ARGS`.

    One node: a free local port is picked by torchrun (`--standalone`). Several nodes:
    either the static master address/port with `--node-rank`, or a c10d rendezvous endpoint.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc: must be at least 1 (got {nproc})")
    command = [python, "-m", TORCHRUN_MODULE, "--nproc-per-node", str(nproc)]
    several_nodes = nnodes not in (None, "1")
    if nnodes is not None:
        command += ["--nnodes", nnodes]
    if rdzv_endpoint:
        command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
    elif several_nodes or master_addr or master_port is not None or node_rank is not None:
        if node_rank is not None:
            command += ["--node-rank", str(node_rank)]
        if master_addr:
            command += ["--master-addr", master_addr]
        if master_port is not None:
            command += ["--master-port", str(master_port)]
    else:
        command += ["--standalone"]
    return command + ["-m", WORKER_MODULE, *worker_args]
