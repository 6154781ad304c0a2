"""One training run of a LoRA / QLoRA adapter, whatever its loss: what SFT and DPO share.

A recipe (`datagen.finetune.sft`, `datagen.finetune.dpo`) reads its data, then hands the run
its pieces in order and keeps the step loop itself:

    with TrainingRun(config, out_dir, "sft") as run:      # joins torchrun's ranks, if any
        run.plan(plan_epoch)                              # steps, warm-up, global batch
        model = run.load_student(base_path)               # seeded; FSDP: rank 0 reads it alone
        run.resume(fingerprint(...))                      # the latest checkpoint's adapter and step
        run.start_training(loss_module(model, fast))      # wrapped (DDP / FSDP2), optimiser, schedule
        with run.training(unit="sequences", shown=...):   # log, progress, clock
            while run.step < run.total_steps:
                loss = run.backward(micro_batches, loss_fn, over=count)
                run.end_step({"loss": loss}, {"tokens": n})   # optimiser step, log line, checkpoint
        summary = run.finish(...)                          # adapter, merged model, summary.json

Ranks: every rank runs the same code on its share of each global step; rank 0 alone writes
the log, checkpoints (with every rank's RNG state), adapter, merged model and summary, and
shows progress. Under FSDP with LoRA only rank 0 reads the student; the others build it on
the meta device and receive their shards from rank 0 (`datagen.finetune.distributed.wrap`).
What rank 0 alone runs goes through `on_main`, so its failure reaches every rank. A recipe
that cannot be sharded says why in its config (`fsdp_refusal`); the run refuses it here.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from datagen.errors import ConfigError, DatagenError
from datagen.finetune.checkpoints import (
    RNG_BY_RANK,
    latest_checkpoint,
    read_checkpoint,
    restore_adapter,
    restore_training_state,
    rng_state,
    save_checkpoint,
)
from datagen.finetune.config import AdapterConfig
from datagen.finetune.data import micro_batches
from datagen.finetune.distributed import (
    full_optimizer_state,
    load_full_optimizer_state,
    rank_share,
    start,
    sync_gradients,
    trainable_state_dict,
    wrap,
)
from datagen.finetune.losses import loss_path_name
from datagen.finetune.model import load_student, make_grad_scaler, merge_adapter, precision_for, require_qlora_support
from datagen.finetune.optim import accumulate_gradients, lr_factor, make_optimizer, optimizer_step
from datagen.io import atomic_write_json, write_dir_atomic

# how a progress field is shown, from a step's log record
Shown = dict[str, Callable[[dict[str, Any]], str]]


class TrainingRun:
    """Ranks, loading, resume, wrapping, optimiser, logging, checkpoints, save and merge of one
    run; the recipe gives it the module that computes its loss and drives the steps."""

    def __init__(self, config: AdapterConfig, out_dir: str | Path, name: str, *, show_progress: bool = True):
        self.config, self.out_dir, self.name, self.show_progress = config, Path(out_dir), name, show_progress
        self.step, self.resumed_from, self.tokens_seen, self.train_seconds = 0, None, 0, 0.0
        self.model = self.module = self.optimizer = self.scheduler = self.scaler = self.sync = None
        self.trainable: list = []
        self._resume_state: dict[str, Any] | None = None

    def __enter__(self) -> TrainingRun:
        self.context = start(self.config.device)
        try:
            self._check_settings()
        except BaseException:
            self.context.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.context.close()

    def _check_settings(self) -> None:
        config, context = self.config, self.context
        self.device, self.world, self.main = context.device, context.world_size, context.is_main
        self.say = printer(self.show_progress and self.main)
        config.check_distributed(context.distributed)
        if config.method == "qlora":
            require_qlora_support(self.device)
        self.precision = precision_for(config, self.device)
        self.sharded = context.distributed and config.distributed == "fsdp"
        if self.sharded and self.precision.loss_scaling:
            # a GradScaler would see only this rank's shard of the gradients when checking for overflow
            raise ConfigError("finetune.distributed: fsdp with float16 compute is not supported; use bfloat16 or ddp")
        # FSDP + LoRA: only rank 0 reads the student, into host memory; the other ranks build it
        # on the meta device (no memory) and, once sharded, receive their shards, the fresh
        # adapter and the buffers from rank 0. No GPU ever holds all of it, and host memory
        # holds it once, not once per rank. Rank 0 alone runs the start-up checks, which need
        # real weights. (QLoRA is never sharded: its config refuses it under FSDP.)
        self.from_main = self.sharded and config.method == "lora"
        self.load_device = "cpu" if self.from_main else self.device

    # ------------------------------------------------------------------------- before training

    def plan(self, plan_epoch: Callable[[int], list]) -> None:
        """The step plan: one optimiser step is grad_accum micro-batches on each rank, taken
        in order from the endless stream plan_epoch(0), plan_epoch(1), …"""
        config = self.config
        self.plan_epoch = plan_epoch
        self.per_step = config.grad_accum * self.world
        self.steps_per_epoch = max(1, math.ceil(len(plan_epoch(0)) / self.per_step))
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.warmup = int(config.warmup_ratio * self.total_steps)
        self.global_batch = config.batch_size * self.per_step

    def step_chunk(self, step: int) -> list[tuple[int, Any]]:
        """Every rank's micro-batches of optimiser step `step` (the same on every rank)."""
        return micro_batches(self.plan_epoch, step * self.per_step, self.per_step)

    def my_share(self, chunk: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """The micro-batches of `chunk` this rank trains on."""
        return rank_share(chunk, self.context.rank, self.world)

    def on_main(self, action: Callable[[], Any], share: bool = False) -> Any:
        """`action()`, on rank 0 alone where only it holds real weights (see `on_main`)."""
        return on_main(self.context, self.from_main, action, share)

    def load_student(self, base_path: str):
        """The base with a fresh adapter, the same on every rank, in train mode; each rank
        then draws its own dropout masks."""
        import torch

        config = self.config
        torch.manual_seed(config.seed)
        model = self.on_main(lambda: load_student(config, base_path, self.load_device, self.precision))
        if self.from_main and not self.main:
            model = load_student(config, base_path, self.load_device, self.precision, empty=True)
        model.train()
        if self.context.distributed:
            torch.manual_seed(config.seed + self.context.rank)
        self.model = model
        return model

    def resume(self, run_fingerprint: str) -> None:
        """Continue from the latest checkpoint made with this fingerprint: its adapter now, its
        optimiser, schedule and RNG state in `start_training`. Another fingerprint is refused."""
        self.fingerprint = run_fingerprint
        self.checkpoints = self.out_dir / "checkpoints"
        last = latest_checkpoint(self.checkpoints)
        if last is None:
            return
        self._resume_state = read_checkpoint(last, run_fingerprint)
        # an empty rank gets the restored adapter from rank 0 with its shards
        self.on_main(lambda: restore_adapter(last, self.model))
        self.step = self.resumed_from = self._resume_state["step"]
        self.say(f"resuming from {last} (step {self.step} of {self.total_steps})")

    def start_training(self, module) -> None:
        """Wrap `module` (whose forward computes the loss over all of the student's work),
        then build the optimiser, loss scaler and schedule, restored when resuming."""
        import torch

        config, context = self.config, self.context
        self.module = wrap(module, self.model, config.distributed, context, from_main=self.from_main)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # after sharding: its DTensors
        self.optimizer = make_optimizer(config, self.trainable, self.device)
        self.scaler = make_grad_scaler(self.precision, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, self.warmup, config.scheduler))
        if self._resume_state is not None:
            load_optimizer = ((lambda full: load_full_optimizer_state(self.module, self.optimizer, full))
                              if self.sharded else None)
            restore_training_state(self._resume_state, self.optimizer, self.scheduler, self.scaler, context.rank,
                                   load_optimizer, self.device)
            self._resume_state = None
        if context.distributed:
            self.sync = lambda last: sync_gradients(self.module, last)
        self.log_path = self.out_dir / "train_log.jsonl"
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            truncate_log(self.log_path, self.step)

    # ------------------------------------------------------------------------- training

    @contextlib.contextmanager
    def training(self, unit: str, shown: Shown) -> Iterator[None]:
        """The step loop's surroundings: the log file, progress (`shown` fields, then tokens/s)
        and the clock, which stops when the loop ends (before any final evaluation)."""
        config = self.config
        if self.context.distributed:
            self.say(f"{self.world} ranks ({config.distributed}, {self.context.backend}), global batch "
                     f"{self.global_batch} {unit} = {config.batch_size} x {config.grad_accum} accumulation "
                     f"x {self.world} ranks")
        self._started = time.monotonic()
        with progress_bar(self.show_progress and self.main, self.name, self.total_steps, self.step, self.world,
                          shown) as self._advance, \
                (self.log_path.open("a") if self.main else _NullLog()) as self._log:
            yield
        self.train_seconds = time.monotonic() - self._started

    def backward(self, batches: list[dict[str, Any]], loss_fn: Callable[[dict[str, Any]], Any], over: int) -> float:
        """Backpropagate this rank's micro-batches of a step, each loss sum divided by `over`
        (the step's count on all ranks); this rank's part of the step's loss."""
        return accumulate_gradients(self.model, batches, scaler=self.scaler, loss_fn=loss_fn, supervised=over,
                                    scale=self.world, sync=self.sync)

    def end_step(self, figures: dict[str, float], counts: dict[str, int]) -> None:
        """Clip and step, log the step's `figures` (over all ranks) and `counts` (with "tokens"),
        show progress, checkpoint when due."""
        grad_norm = optimizer_step(self.optimizer, self.trainable, self.config.max_grad_norm, self.scaler)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += counts["tokens"]
        elapsed = time.monotonic() - self._started
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                  **{key: round(value, 6) for key, value in figures.items()},
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 4), **counts,
                  "tokens_per_s": round(self.tokens_seen / elapsed, 1), "elapsed_s": round(elapsed, 2)}
        if self.context.distributed:
            record["tokens_per_s_per_rank"] = round(self.tokens_seen / elapsed / self.world, 1)
        if self.main:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()
        self._advance(record)
        if self.step % self.config.save_every == 0 or self.step == self.total_steps:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save a checkpoint (collective: gathering shards and RNG states; rank 0 writes)."""
        context = self.context
        model_state = adapter_state(trainable_state_dict(self.module, context, self.config.distributed))
        optimizer_state = full_optimizer_state(self.module, self.optimizer) if self.sharded else None
        rngs = context.gather(rng_state(self.device))  # each rank's own, CUDA's included
        if self.main:
            save_checkpoint(self.checkpoints, self.step, self.model, self.optimizer, self.scheduler,
                            {"fingerprint": self.fingerprint, "world_size": self.world, RNG_BY_RANK: rngs},
                            self.config.keep_checkpoints, self.scaler, model_state=model_state,
                            optimizer_state=optimizer_state)
        context.barrier()

    # ------------------------------------------------------------------------- after training

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def finish(self, *, tokenizer, base_path: str, data: str | Path, about: dict[str, Any],
               data_facts: dict[str, Any], results: dict[str, Any] | None = None, fast_loss: bool | None,
               loss_note: str | None) -> dict[str, Any]:
        """The summary (also `OUT/summary.json`); a finished run first saves its adapter and,
        with `merge`, the merged model. `about` names the run (method, base), `data_facts`
        describes its data, `results` its own figures after training."""
        config, context, world = self.config, self.context, self.world
        peaks = context.gather(peak_memory_mib(self.device))
        seconds = self.train_seconds
        summary: dict[str, Any] = {
            "finished": self.finished, "step": self.step, "total_steps": self.total_steps,
            "resumed_from_step": self.resumed_from, **about, "base_path": base_path, "device": self.device,
            "world_size": world, "distributed": config.distributed if context.distributed else None,
            "global_batch": self.global_batch,
            "compute_dtype": self.precision.dtype, "loss_scaling": self.precision.loss_scaling,
            "loss_path": loss_path_name(fast_loss), "loss_path_note": loss_note,
            "data": str(data), **data_facts,
            "trainable_parameters": sum(p.numel() for p in self.trainable) if not self.sharded else None,
            "tokens_this_run": self.tokens_seen, "train_seconds_this_run": round(seconds, 2),
            "tokens_per_s": round(self.tokens_seen / seconds, 1) if seconds > 0 else None,
            "tokens_per_s_per_rank": round(self.tokens_seen / seconds / world, 1) if seconds > 0 else None,
            "peak_memory_mib": max(peaks), "peak_memory_mib_per_rank": peaks,
            "final_loss": last_logged_loss(self.log_path) if self.main else None,
            **(results or {}),
            "config": config.model_dump(mode="json"),
        }
        if self.sharded:
            summary["trainable_parameters"] = int(context.sum([sum(
                p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.trainable)])[0])
        if self.finished:
            summary["adapter"] = str(self._save_adapter(tokenizer))
            # the student's memory goes before the merge loads the base again
            self.model = self.module = self.optimizer = self.scheduler = None
            self.trainable = []
            context.barrier()
            if config.merge and self.main:
                summary["merged"] = str(merge_adapter(base_path, self.out_dir / "adapter", self.out_dir / "merged"))
        if self.main:
            atomic_write_json(self.out_dir / "summary.json", summary)
        return summary

    def _save_adapter(self, tokenizer) -> Path:
        adapter_dir = self.out_dir / "adapter"
        model_state = adapter_state(trainable_state_dict(self.module, self.context, self.config.distributed))
        if self.main:
            write_dir_atomic(adapter_dir, lambda target: (self.model.save_pretrained(target, state_dict=model_state),
                                                          tokenizer.save_pretrained(target)))
        return adapter_dir


def on_main(context, only_main: bool, action: Callable[[], Any], share: bool = False) -> Any:
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


def adapter_state(full: dict[str, Any] | None) -> dict[str, Any] | None:
    """The peft model's keys of the loss module's gathered state dict (its `model.` prefix off)."""
    if full is None:
        return None
    prefix = "model."
    return {key[len(prefix):]: value for key, value in full.items() if key.startswith(prefix)}


def peak_memory_mib(device: str) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on CPU."""
    import resource

    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (a resumed run rewrites the ones after it)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def last_logged_loss(path: Path) -> float | None:
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["loss"] if lines else None


def printer(enabled: bool) -> Callable[[str], None]:
    """A line on stderr, or nothing (ranks other than 0, or quiet runs)."""
    return (lambda text: print(text, file=sys.stderr)) if enabled else (lambda text: None)


@contextlib.contextmanager
def progress_bar(enabled: bool, name: str, total: int, done: int, world_size: int,
                 shown: Shown) -> Iterator[Callable[[dict[str, Any]], None]]:
    """`advance(record)` for each step: the `shown` fields, tokens/s (and per rank when there
    are several) and ETA (datagen.progress); silent when disabled."""
    if not enabled:
        yield lambda record: None
        return
    from datagen.progress import progress

    several = world_size > 1
    label = f"{name} x{world_size} ranks" if several else name
    fields = (*shown, "tok/s", *(("tok/s/rank",) if several else ()))
    with progress(label, total=total, done=done, fields=fields) as bar:
        def advance(record: dict[str, Any]) -> None:
            values = {field: show(record) for field, show in shown.items()}
            values["tok/s"] = f"{record['tokens_per_s']:.0f}"
            if several:
                values["tok/s/rank"] = f"{record['tokens_per_s_per_rank']:.0f}"
            bar.advance(1, **values)

        yield advance


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
