"""Host memory per rank while FSDP2 + LoRA loads the student: every rank reading the whole
model (the old path, the baseline) vs rank 0 alone reading it and the others building it on
the meta device and receiving their shards from rank 0 (`distributed.wrap(from_main=True)`).

Each side is its own `torchrun --nproc-per-node N` launch (gloo on CPU), running exactly
`datagen finetune`'s loading steps: `load_student` (on the meta device for ranks >= 1 in the
new path), `loss_module`, `wrap`. Per rank it prints how much resident memory grew while
loading and sharding: all of it (ru_maxrss), anonymous memory (the process's own: its
shards, staging copies) and file-backed pages (the mmap'd safetensors file, i.e. page
cache, which every process mapping it shares), then the loss of one forward on the same
tokens, which must be equal on both sides (same weights on every rank, buffers included).

    .venv/bin/python bench/fsdp_load.py               # the embedded SmolLM2-135M, 2 ranks
    .venv/bin/python bench/fsdp_load.py --dtype bfloat16   # transformers converts (copies) fp32 weights
    .venv/bin/python bench/fsdp_load.py --base DIR --nproc 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def memory_mib() -> dict[str, float]:
    """This process's resident memory: all of it, anonymous (its own), file-backed (mapped
    files' pages, e.g. mmap'd safetensors: page cache, shared with other processes)."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) / 1024
    return found


class PeakSampler:
    """Samples `memory_mib` every few milliseconds on a thread; keeps each field's peak."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import threading

        self.peaks = memory_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            for key, value in memory_mib().items():
                self.peaks[key] = max(self.peaks[key], value)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in memory_mib().items():
            self.peaks[key] = max(self.peaks[key], value)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(base: str, dtype: str, from_main: bool, out: Path) -> None:
    """One rank: load and shard like `datagen finetune --distributed fsdp`, then report."""
    import torch

    from datagen.finetune.config import FinetuneConfig
    from datagen.finetune.distributed import start, wrap
    from datagen.finetune.losses import loss_module
    from datagen.finetune.model import load_student
    from datagen.model_paths import resolve_model

    context = start("cpu")
    try:
        config = FinetuneConfig(base=base, distributed="fsdp", dropout=0.0, dtype=dtype)
        base_path = resolve_model(base)
        _import_model_code(base_path)  # so that the figures below are loading alone
        context.barrier()
        before = memory_mib()
        torch.manual_seed(config.seed)
        with PeakSampler() as sampler:
            model = load_student(config, base_path, "cpu", empty=from_main and not context.is_main)
            wrapped = wrap(loss_module(model, True), model, "fsdp", context, from_main=from_main)
        loaded_peak, after = peak_rss_mib(), memory_mib()
        ids = torch.arange(1, 33).unsqueeze(0)
        with torch.no_grad():
            loss = float(wrapped(input_ids=ids, labels=ids))
        record = {"rank": context.rank, "before_mib": before, "after_load_mib": after,
                  "peak_during_load_mib": sampler.peaks, "load_cost_mib": round(loaded_peak - before["VmRSS"], 1),
                  "anon_cost_mib": round(sampler.peaks["RssAnon"] - before["RssAnon"], 1),
                  "file_cost_mib": round(sampler.peaks["RssFile"] - before["RssFile"], 1), "loss": loss}
        (out / f"rank{context.rank}.json").write_text(json.dumps(record))
    finally:
        context.close()


def launch(base: str, dtype: str, nproc: int, from_main: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   str(HERE), "--worker", "--base", base, "--dtype", dtype, "--out", folder]
        command += ["--from-main"] if from_main else []
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return [json.loads((Path(folder) / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="compute dtype (auto: float32 on CPU); one unlike the "
                        "checkpoint's makes transformers convert, i.e. copy, every weight it loads")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--from-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.base, args.dtype, args.from_main, Path(args.out))
        return
    weights = sum(f.stat().st_size for f in Path(_resolved(args.base)).glob("*.safetensors")) / 2**20
    print(f"{args.base}: {weights:.0f} MiB of safetensors, compute dtype {args.dtype}, {args.nproc} ranks, gloo")
    every = launch(args.base, args.dtype, args.nproc, from_main=False)
    only_main = launch(args.base, args.dtype, args.nproc, from_main=True)
    for field, what in (("load_cost_mib", "peak RSS (ru_maxrss) growth"),
                        ("anon_cost_mib", "peak anonymous RSS growth (the process's own memory)"),
                        ("file_cost_mib", "peak file-backed RSS growth (mmap'd safetensors pages, page cache)")):
        print(f"{what} while loading, MiB")
        print(f"{'rank':>6}  {'every rank loads':>18}  {'rank 0 loads':>14}  {'ratio':>6}")
        for old, new in zip(every, only_main, strict=True):
            ratio = new[field] / old[field] if old[field] > 0 else float("nan")
            print(f"{old['rank']:>6}  {old[field]:>18.0f}  {new[field]:>14.0f}  {ratio:>6.2f}")
        totals = [sum(r[field] for r in side) for side in (every, only_main)]
        print(f"{'sum':>6}  {totals[0]:>18.0f}  {totals[1]:>14.0f}  {totals[1] / max(totals[0], 1e-9):>6.2f}")
    same = all(abs(o["loss"] - n["loss"]) <= 1e-5 * abs(o["loss"]) for o, n in zip(every, only_main, strict=True))
    print(f"one forward's loss per rank: {[round(r['loss'], 6) for r in every]} vs "
          f"{[round(r['loss'], 6) for r in only_main]}: {'same' if same else 'DIFFERENT'}")
    print(json.dumps({"every_rank_loads": every, "rank0_loads": only_main}))


def _import_model_code(base_path: str) -> None:
    import peft  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(base_path))]


def _resolved(base: str) -> str:
    from datagen.model_paths import resolve_model

    return resolve_model(base)


if __name__ == "__main__":
    main()
